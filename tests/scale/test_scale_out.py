"""Scale-out: two gateway processes on one Redis and one PostgreSQL behave as one gateway. Limits are global
and exact, a revocation reaches both within a second, the cache and the coalescing of identical requests
are shared, batch lines run once, usage is complete; and `serve --workers 2` supervises its workers."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from conftest import scratch_postgres
from procs import (
    ADMIN_KEY,
    KEY_SECRET,
    Proc,
    create_key,
    gateway_config,
    http_get,
    http_post,
    new_key,
    sim_stats,
    start_gateway,
)
from procs import wait_until as wait_for

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


SLOW_SIM = ("--slots", "8", "--ttft-ms", "400", "--tokens-per-s", "200")  # conftest's slow_sim


@pytest.fixture(scope="module")
def pair(slow_sim: Proc, redis_url: str, module_tmp: Path) -> Iterator[tuple[Proc, Proc]]:
    with scratch_postgres("portcullis_scale") as database_url:
        cfg = gateway_config(
            {"m": [slow_sim.url]},
            store={"database_url": database_url, "redis_url": redis_url, "auto_migrate": True},
            cache={"enabled": True, "backend": "redis"},
            quota={"usage": {"flush_interval_s": 0.1}},
            batch={"poll_s": 0.2},
        )
        a = start_gateway(cfg, module_tmp, ready_path="/readyz")  # migrates and creates the admin key first
        b = start_gateway(cfg, module_tmp, ready_path="/readyz")
        yield a, b
        a.stop()
        b.stop()


async def _post(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, str]]:
    async with session.post(
        url + "/v1/chat/completions", data=orjson.dumps(body), headers={"authorization": f"Bearer {key}"}
    ) as resp:
        await resp.read()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def test_limits_are_global_and_exact(pair: tuple[Proc, Proc]) -> None:
    a, b = pair
    key = new_key(a, limits={"requests": {"minute": 10}})

    async def burst() -> list[int]:
        async with aiohttp.ClientSession() as session:
            calls = [_post(session, (a, b)[i % 2].url, key, _chat(f"burst {i}")) for i in range(30)]
            return [status for status, _ in await asyncio.gather(*calls)]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 10 and statuses.count(429) == 20


def test_a_revocation_reaches_the_other_process_within_a_second(pair: tuple[Proc, Proc]) -> None:
    a, b = pair
    key = new_key(a)
    key_id = key.split("-")[1]
    for gw in (a, b):  # both have verified (and cached) the key
        assert http_get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})[0] == 200
    revoked_at = time.monotonic()
    assert http_post(a.url + f"/admin/keys/{key_id}/revoke", {}, headers=AUTH)[0] == 200
    while http_get(b.url + "/v1/models", headers={"authorization": f"Bearer {key}"})[0] != 401:
        assert time.monotonic() - revoked_at < 1.0, "process B still accepts the revoked key after 1 s"
        time.sleep(0.02)


def test_the_cache_and_coalescing_are_shared(pair: tuple[Proc, Proc], slow_sim: Proc) -> None:
    a, b = pair
    key = new_key(a)
    body = _chat(f"the same question {secrets.token_hex(4)}", temperature=0)
    before = sim_stats(slow_sim)["requests"]

    async def together() -> list[tuple[int, dict[str, str]]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[_post(session, (a, b)[i % 2].url, key, body) for i in range(6)])

    answers = asyncio.run(together())
    assert all(status == 200 for status, _ in answers)
    assert sim_stats(slow_sim)["requests"] == before + 1  # six requests over two processes, one upstream call
    how = sorted(headers["x-portcullis-cache"] for _, headers in answers)
    assert how == ["coalesced"] * 5 + ["miss"]
    status, headers = asyncio.run(_single(b.url, key, body))
    assert status == 200 and headers["x-portcullis-cache"] == "hit"
    assert sim_stats(slow_sim)["requests"] == before + 1


async def _single(url: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        return await _post(session, url, key, body)


def test_usage_from_both_processes_is_complete(pair: tuple[Proc, Proc]) -> None:
    a, b = pair
    made = create_key(a)
    key, user = made["key"], made["user"]

    async def spread() -> list[int]:
        async with aiohttp.ClientSession() as session:
            calls = [_post(session, (a, b)[i % 2].url, key, _chat(f"usage {i}")) for i in range(12)]
            return [status for status, _ in await asyncio.gather(*calls)]

    assert asyncio.run(spread()) == [200] * 12

    def recorded() -> int:
        status, raw = http_get(a.url + f"/admin/usage?group_by=user&user={user}", headers=AUTH)
        rows = orjson.loads(raw)["data"] if status == 200 else []
        return sum(r["requests"] for r in rows)

    wait_for(lambda: recorded() == 12, what="12 usage records from two processes")


def test_batch_lines_run_once_across_both(pair: tuple[Proc, Proc]) -> None:
    a, b = pair
    lines = [
        {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": _chat(f"batch {i}")}
        for i in range(24)
    ]
    data = aiohttp.FormData()
    data.add_field("purpose", "batch")
    data.add_field("file", b"\n".join(orjson.dumps(x) for x in lines), filename="in.jsonl")

    async def submit() -> str:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(a.url + "/v1/files", data=data) as resp:
                file_id = (await resp.json())["id"]
            async with session.post(
                a.url + "/v1/batches",
                json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            ) as resp:
                return (await resp.json())["id"]

    batch_id = asyncio.run(submit())

    def state() -> dict[str, Any]:
        return orjson.loads(http_get(b.url + f"/v1/batches/{batch_id}", headers=AUTH)[1])

    wait_for(lambda: state()["status"] == "completed", timeout=60, what="the batch")
    _, raw = http_get(b.url + f"/v1/files/{state()['output_file_id']}/content", headers=AUTH)
    ids = [orjson.loads(x)["custom_id"] for x in raw.splitlines() if x.strip()]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(24))  # each exactly once


def test_serve_workers_supervises_its_processes(slow_sim: Proc, redis_url: str, tmp_path: Path) -> None:
    cfg = gateway_config({"m": [slow_sim.url]}, store={"redis_url": redis_url, "auto_migrate": True})
    cfg["store"]["database_url"] = f"sqlite+aiosqlite:///{tmp_path}/workers.db"
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"PORTCULLIS_KEY_SECRET": KEY_SECRET, "PORTCULLIS_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY}
    proc = Proc(["serve", "--config", str(path), "--workers", "2"], ready_path="/readyz", env=env, log_dir=tmp_path)
    try:

        def children() -> list[int]:
            pid = proc.popen.pid
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
            return [int(x) for x in text.split()]

        wait_for(lambda: len(children()) == 2, what="two workers")
        first = children()
        assert asyncio.run(_single(proc.url, ADMIN_KEY, _chat("hello")))[0] == 200
        os.kill(first[0], signal.SIGKILL)  # a worker dies: another takes its place
        wait_for(lambda: len(children()) == 2 and first[0] not in children(), timeout=15, what="a replacement worker")
        assert "exited with -9; starting another" in proc.log()
        wait_for(lambda: asyncio.run(_single(proc.url, ADMIN_KEY, _chat("again")))[0] == 200, what="served again")
        workers = children()
        proc.signal(signal.SIGTERM)  # every worker drains, then the supervisor exits
        assert proc.wait(30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        proc.stop()


def test_workers_need_redis(tmp_path: Path, slow_sim: Proc) -> None:
    cfg = gateway_config({"m": [slow_sim.url]})
    path = tmp_path / "no-redis.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "portcullis", "serve", "--config", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PORTCULLIS_KEY_SECRET": KEY_SECRET},
    )
    assert out.returncode == 2 and "store.redis_url must be set" in out.stderr
