"""Redis stopped mid-test: fail_open falls back to this process's share, fail_closed answers 503; both
come back by themselves when Redis returns. The test runs its own redis-server so it can kill it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from procs import (
    Proc,
    RedisServer,
    gateway_config,
    http_get,
    new_key,
    openai_client,
    start_gateway,
    wait_until,
)
from quota_helpers import MSG


@pytest.fixture(scope="module")
def redis_server(module_tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(module_tmp)
    yield server
    server.kill()


def _gateway(sim: Proc, redis: RedisServer, tmp: Path, policy: str) -> Proc:
    cfg = gateway_config(
        {"tiny": [sim.url]},
        store={"redis_url": redis.url},
        quota={"backend": "redis", "on_store_error": policy, "fallback_share": 0.5, "store_timeout_s": 0.5},
    )
    return start_gateway(cfg, tmp, ready_path="/readyz")


def _degraded(gw: Proc) -> float:
    for line in http_get(gw.url + "/metrics")[1].decode().splitlines():
        if line.startswith("portcullis_quota_store_degraded "):
            return float(line.split()[1])
    raise AssertionError("no portcullis_quota_store_degraded in /metrics")


def _outcomes(gw: Proc, key: str, n: int) -> list[str]:
    client = openai_client(gw, key, timeout=10)
    out = []
    for _ in range(n):
        try:
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)
            out.append("ok")
        except openai.RateLimitError:
            out.append("429")
        except openai.InternalServerError as exc:
            out.append(f"{exc.status_code}:{exc.code}")
    return out


def test_fail_open_and_fail_closed_then_recovery(sim: Proc, redis_server: RedisServer, module_tmp: Path) -> None:
    opened = _gateway(sim, redis_server, module_tmp, "fail_open")
    closed = _gateway(sim, redis_server, module_tmp, "fail_closed")
    try:
        limits = {"requests": {"minute": 10}}
        key_open = new_key(opened, limits=limits)
        key_closed = new_key(closed, limits=limits)
        assert _outcomes(opened, key_open, 4) == ["ok"] * 4  # counted in Redis
        assert _outcomes(closed, key_closed, 1) == ["ok"]

        redis_server.kill()
        # fail_open: this process's share (0.5) of the limit, counted afresh in memory.
        assert _outcomes(opened, key_open, 7) == ["ok"] * 5 + ["429"] * 2
        assert _degraded(opened) == 1.0
        wait_until(lambda: "quota_store_unavailable" in opened.log(), what="the log line (logs are buffered)")
        # fail_closed: 503 with the reason, until Redis is back.
        assert _outcomes(closed, key_closed, 2) == ["503:quota_store_unavailable"] * 2
        assert _degraded(closed) == 1.0

        redis_server.start()  # an empty Redis: the scripts are loaded again on the new connection
        wait_until(lambda: _degraded(opened) == 0.0 and _degraded(closed) == 0.0, what="recovery from Redis")
        wait_until(lambda: "quota_store_recovered" in opened.log() + closed.log(), what="the recovery log line")
        fresh = new_key(opened, limits=limits)
        assert _outcomes(opened, fresh, 11) == ["ok"] * 10 + ["429"]  # the whole limit again, in Redis
        assert _outcomes(closed, key_closed, 1) == ["ok"]
    finally:
        opened.stop()
        closed.stop()
