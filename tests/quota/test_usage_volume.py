"""10,000 requests, then a graceful shutdown: exactly one usage record each, none lost, none doubled."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
from procs import ADMIN_KEY, Proc, gateway_config, sim_control, start_gateway
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from portcullis.store.schema import usage

REQUESTS = 10_000
CONCURRENCY = 64


async def _drive(url: str) -> dict[int, int]:
    body = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
    counts: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(REQUESTS):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    counts[r.status] = counts.get(r.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return counts


async def _written(database_url: str) -> tuple[int, int, int, datetime, datetime]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                select(
                    func.count(),
                    func.count(usage.c.request_id.distinct()),
                    func.sum(usage.c.prompt_tokens + usage.c.completion_tokens),
                    func.min(usage.c.at),  # typed: read back through the column's DateTime type
                    func.max(usage.c.at),
                )
            )
            return tuple(result.one())  # type: ignore[return-value]
    finally:
        await engine.dispose()


def test_every_request_leaves_one_record_after_graceful_shutdown(
    sim: Proc, database_url: str, module_tmp: Path
) -> None:
    """On SQLite and on PostgreSQL (the writer hands the driver plain rows, each dialect its own way)."""
    # Batches smaller than the burst and an interval longer than the test: the shutdown must flush.
    cfg = gateway_config(
        {"tiny": [sim.url]},
        store={"database_url": database_url},
        quota={"usage": {"batch_size": 700, "flush_interval_s": 3600}},
    )
    started = datetime.now(UTC)
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    sim_control(sim, fixed=True)
    try:
        counts = asyncio.run(_drive(gw.url))
        assert counts == {200: REQUESTS}
        gw.signal(signal.SIGTERM)
        assert gw.wait(60) == 0
    finally:
        sim_control(sim, fixed=False)
        gw.stop()
    rows, distinct, tokens, first, last = asyncio.run(_written(database_url))
    assert (rows, distinct) == (REQUESTS, REQUESTS)
    assert tokens == REQUESTS * 21  # the simulator's fixed answer reports 12 + 9 tokens
    # Timestamps read back as the moments they were (SQLite keeps them as text without a zone: UTC).
    first = first if first.tzinfo else first.replace(tzinfo=UTC)
    last = last if last.tzinfo else last.replace(tzinfo=UTC)
    assert started - timedelta(seconds=1) <= first <= last <= datetime.now(UTC)
