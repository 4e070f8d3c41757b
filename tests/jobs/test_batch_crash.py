"""A batch of 1,000 lines survives its gateway being SIGKILLed midway (SQLite, restarted on the same
file), and runs on two gateway processes sharing PostgreSQL, one of them SIGKILLed midway: every input
line appears exactly once in the output, and has exactly one usage record (a line that ran again after the
crash replaces its earlier record; records the dead process had not written yet are replayed from its
spool).
"""

from __future__ import annotations

import asyncio
import io
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest
from procs import Proc, gateway_config, http_get, openai_client, start_gateway, start_sim, wait_until

LINES = 1000
LEASE_S = 2


def _content() -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8},
            }
        )
        + b"\n"
        for i in range(LINES)
    )


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    # 16 slots, ~40 ms a line: 1,000 lines take a few seconds, long enough to be cut in the middle.
    proc = start_sim("--slots", "16", "--tokens-per-s", "200", log_dir=module_tmp)
    yield proc
    proc.stop()


def _config(sim: Proc, database_url: str) -> dict[str, Any]:
    return gateway_config(
        {"m": [sim.url]},
        store={"database_url": database_url, "auto_migrate": True},
        batch={"poll_s": 0.1, "lease_s": LEASE_S, "reserve_slots": 0},
    )


def _completed(client: openai.OpenAI, batch_id: str) -> int:
    return client.batches.retrieve(batch_id).request_counts.completed


def _check_output(client: openai.OpenAI, batch_id: str) -> None:
    ended: dict[str, Any] = {}

    def done() -> bool:
        ended["b"] = client.batches.retrieve(batch_id)
        return ended["b"].status == "completed"

    wait_until(done, timeout=90, interval=0.2, what="the batch to complete")
    batch = ended["b"]
    assert batch.request_counts.completed == LINES and batch.request_counts.failed == 0
    assert batch.error_file_id is None
    lines = client.files.content(batch.output_file_id).text.splitlines()
    ids = [orjson.loads(x)["custom_id"] for x in lines]
    assert len(ids) == LINES and ids == [f"line-{i}" for i in range(LINES)]  # each once, in input order


def _usage_per_line(database_url: str, batch_id: str) -> dict[str, int]:
    """Usage records per batch line (its request id), read from the database directly."""
    prefix = f"batch_req_{batch_id[6:]}_"
    sql = "SELECT request_id, count(*) FROM usage WHERE request_id LIKE $1 GROUP BY request_id"
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.split(":///", 1)[1]) as db:
            return dict(db.execute(sql.replace("$1", "?"), (prefix + "%",)).fetchall())

    async def run() -> dict[str, int]:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
        try:
            return {r[0]: r[1] for r in await conn.fetch(sql, prefix + "%")}
        finally:
            await conn.close()

    return asyncio.run(run())


def _one_record_per_line(database_url: str, batch_id: str) -> None:
    def complete() -> bool:
        return len(_usage_per_line(database_url, batch_id)) == LINES

    wait_until(complete, timeout=30, interval=0.5, what="a usage record for every line")
    counts = _usage_per_line(database_url, batch_id)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}


def _lines_run(gw: Proc) -> float:
    _, raw = http_get(gw.url + "/metrics")
    return next(float(x.split()[-1]) for x in raw.decode().splitlines() if x.startswith("portcullis_batch_lines_total"))


def test_a_killed_gateway_restarted_finishes_the_batch(sim: Proc, module_tmp: Path) -> None:
    cfg = _config(sim, f"sqlite+aiosqlite:///{module_tmp}/crash.db")
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    try:
        client = openai_client(gw, max_retries=2)
        file = client.files.create(file=("in.jsonl", io.BytesIO(_content())), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        wait_until(lambda: _completed(client, batch.id) >= 200, timeout=60, what="200 lines done")
        gw.signal(signal.SIGKILL)
        gw.wait()
    finally:
        gw.stop()
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    try:
        client = openai_client(gw, max_retries=2)
        halfway = _completed(client, batch.id)
        assert 200 <= halfway < LINES  # it really was cut in the middle
        _check_output(client, batch.id)
        _one_record_per_line(cfg["store"]["database_url"], batch.id)
    finally:
        gw.stop()


def test_two_gateways_share_the_batch_on_postgres_and_survive_one_being_killed(
    sim: Proc, module_tmp: Path, postgres_url: str
) -> None:
    cfg = _config(sim, postgres_url)
    first = start_gateway(cfg, module_tmp, ready_path="/readyz")
    second = start_gateway(cfg, module_tmp, ready_path="/readyz")
    try:
        client = openai_client(first, max_retries=2)
        file = client.files.create(file=("in.jsonl", io.BytesIO(_content())), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        # Both processes take lines from the shared queue.
        wait_until(lambda: _lines_run(first) >= 50 and _lines_run(second) >= 50, timeout=60, what="both running")
        first.signal(signal.SIGKILL)
        first.wait()
        # The survivor takes over the dead one's leases once they expire, and finishes.
        _check_output(openai_client(second, max_retries=2), batch.id)
        _one_record_per_line(postgres_url, batch.id)
    finally:
        first.stop()
        second.stop()
