"""10,000 requests, then a graceful shutdown: exactly one usage record each, none lost, none doubled."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import aiohttp
import orjson
from procs import ADMIN_KEY, Proc, gateway_config, sim_control, start_gateway

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


def test_every_request_leaves_one_record_after_graceful_shutdown(sim: Proc, module_tmp: Path) -> None:
    db = module_tmp / "volume.db"
    # Batches smaller than the burst and an interval longer than the test: the shutdown must flush.
    cfg = gateway_config(
        {"tiny": [sim.url]},
        store={"database_url": f"sqlite+aiosqlite:///{db}"},
        quota={"usage": {"batch_size": 700, "flush_interval_s": 3600}},
    )
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
    with sqlite3.connect(db) as conn:
        rows, distinct, tokens = conn.execute(
            "SELECT count(*), count(DISTINCT request_id), sum(prompt_tokens + completion_tokens) FROM usage"
        ).fetchone()
    assert (rows, distinct) == (REQUESTS, REQUESTS)
    assert tokens == REQUESTS * 21  # the simulator's fixed answer reports 12 + 9 tokens
