"""Streams are relayed as they arrive, keep-alives pass, and a client that leaves cancels the upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_get, sim_stats, start_gateway, start_sim, wait_until

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


# conftest's slow_sim: one chunk every 200 ms, each stamped with the time the simulator sent it; a ping every 150 ms.
SLOW_SIM = ("--tokens-per-s", "5", "--stamp-chunks", "--ping-interval-s", "0.15")


@pytest.fixture(scope="module")
def slow_gateway(slow_sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    proc = start_gateway(gateway_config({"slow": [slow_sim.url]}), module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


async def test_each_chunk_arrives_within_50ms_of_being_emitted(slow_gateway: Proc) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    lags = []
    pings = 0
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.post(slow_gateway.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.content:
            arrived = time.time()
            if line.startswith(b":"):
                pings += 1
            if not line.startswith(b"data: {"):
                continue
            chunk = orjson.loads(line[6:])
            lags.append(arrived - chunk["sim_emitted_at"])
    assert len(lags) >= 7  # role chunk, 6 tokens, finish chunk
    assert max(lags) < 0.050, lags
    assert pings >= 1  # llama-server's ':' keep-alive reached the client


async def test_client_disconnect_cancels_the_upstream_generation(slow_gateway: Proc, slow_sim: Proc) -> None:
    before = sim_stats(slow_sim)
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        resp = await session.post(slow_gateway.url + "/v1/chat/completions", json=body)
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                seen += 1
                if seen == 2:
                    break
        resp.close()  # drop the connection mid-stream (50 tokens would take 10 s)
    started = time.monotonic()
    await asyncio.to_thread(
        wait_until,
        lambda: sim_stats(slow_sim)["cancelled"] == before["cancelled"] + 1 and sim_stats(slow_sim)["active"] == 0,
        timeout=5,
        what="upstream generation cancelled",
    )
    assert time.monotonic() - started < 5
    # and the gateway released its in-flight count for the replica
    _, metrics = http_get(slow_gateway.url + "/metrics")
    assert 'portcullis_replica_in_flight{model="slow",replica=' in metrics.decode()
    line = next(x for x in metrics.decode().splitlines() if x.startswith("portcullis_replica_in_flight{"))
    assert float(line.split()[-1]) == 0.0


async def test_non_stream_client_disconnect_cancels_too(slow_gateway: Proc, slow_sim: Proc) -> None:
    before = sim_stats(slow_sim)
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.5):
                await session.post(slow_gateway.url + "/v1/chat/completions", json=body)
    await asyncio.to_thread(
        wait_until,
        lambda: sim_stats(slow_sim)["cancelled"] == before["cancelled"] + 1,
        timeout=5,
        what="upstream generation cancelled",
    )


def test_balancer_fills_replicas_by_free_slots(tmp_path: Path) -> None:
    """One replica with 1 slot, one with 3: four concurrent streams land 1 and 3 (slots from /props)."""
    one = start_sim("--slots", "1", "--tokens-per-s", "10", log_dir=tmp_path)
    three = start_sim("--slots", "3", "--tokens-per-s", "10", log_dir=tmp_path)
    gw = start_gateway(gateway_config({"m": [one.url, three.url]}), tmp_path, ready_path="/readyz")
    try:

        async def run() -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True}
            async with aiohttp.ClientSession(headers=AUTH) as session:
                responses = []
                for _ in range(4):  # one after another, each admitted before the next is sent
                    responses.append(await session.post(gw.url + "/v1/chat/completions", json=body))
                for r in responses:
                    await r.read()
                    r.close()

        asyncio.run(run())
        assert sim_stats(one)["max_active"] == 1
        assert sim_stats(three)["max_active"] == 3
        assert sim_stats(one)["waiting"] == 0 and sim_stats(three)["waiting"] == 0
    finally:
        gw.stop()
        one.stop()
        three.stop()
