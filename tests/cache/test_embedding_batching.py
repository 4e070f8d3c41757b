"""Embedding micro-batching: concurrent requests merged into one upstream call, each answered exactly its
own vectors, in order, with its share of the usage. The simulator's vectors are a pure function of the
text, so every answer is checked against the simulator asked directly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_post, sim_stats, start_gateway, start_sim


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "4", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config({"e": [sim.url]}, embedding_batching={"enabled": True, "max_wait_ms": 50})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def direct(sim: Proc, item: Any) -> list[float]:
    status, raw = http_post(sim.url + "/v1/embeddings", {"model": "x", "input": item})
    assert status == 200
    return orjson.loads(raw)["data"][0]["embedding"]


async def concurrently(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    async with aiohttp.ClientSession() as s:

        async def one(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            async with s.post(
                url + "/v1/embeddings", data=orjson.dumps(body), headers={"authorization": f"Bearer {ADMIN_KEY}"}
            ) as r:
                return r.status, orjson.loads(await r.read())

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def test_concurrent_requests_share_one_call_and_get_exactly_their_own_vectors(gw: Proc, sim: Proc) -> None:
    requests: list[Any] = [
        f"single text {i}" if i % 3 else [f"list {i} a", f"list {i} bb", f"list {i} ccc"] for i in range(10)
    ]
    before = sim_stats(sim)
    results = asyncio.run(concurrently(gw.url, [{"model": "e", "input": r} for r in requests]))
    after = sim_stats(sim)
    assert after["embedding_calls"] - before["embedding_calls"] == 1  # all ten in one upstream call
    assert after["embedding_inputs"] - before["embedding_inputs"] == sum(
        1 if isinstance(r, str) else len(r) for r in requests
    )
    total_prompt = 0
    for request, (status, answer) in zip(requests, results, strict=True):
        assert status == 200 and answer["model"] == "e"
        items = [request] if isinstance(request, str) else request
        assert [d["index"] for d in answer["data"]] == list(range(len(items)))
        assert [d["embedding"] for d in answer["data"]] == [direct(sim, item) for item in items]
        assert answer["usage"]["prompt_tokens"] > 0
        total_prompt += answer["usage"]["prompt_tokens"]
    # The shares sum exactly to what the upstream counted for the merged call.
    assert total_prompt == after["prompt_tokens"] - before["prompt_tokens"]


def test_different_parameters_are_not_merged(gw: Proc, sim: Proc) -> None:
    bodies = [
        {"model": "e", "input": "plain"},
        {"model": "e", "input": "with dims", "dimensions": 8},
        {"model": "e", "input": [1, 2, 3]},  # token ids: another kind of input
    ]
    before = sim_stats(sim)["embedding_calls"]
    results = asyncio.run(concurrently(gw.url, bodies))
    assert [status for status, _ in results] == [200, 200, 200]
    assert sim_stats(sim)["embedding_calls"] - before == 3


def test_when_the_leader_leaves_the_others_are_still_answered(sim: Proc, tmp_path: Path) -> None:
    cfg = gateway_config({"e": [sim.url]}, embedding_batching={"enabled": True, "max_wait_ms": 300})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:

        async def run() -> list[Any]:
            async with aiohttp.ClientSession() as s:

                async def one(text: str, give_up_after: float | None) -> Any:
                    try:
                        async with asyncio.timeout(give_up_after):
                            async with s.post(
                                gw.url + "/v1/embeddings",
                                data=orjson.dumps({"model": "e", "input": text}),
                                headers={"authorization": f"Bearer {ADMIN_KEY}"},
                            ) as r:
                                return orjson.loads(await r.read())
                    except TimeoutError:
                        return None

                leader = asyncio.create_task(one("the leader", 0.1))  # leaves while the batch gathers
                await asyncio.sleep(0.02)
                members = [asyncio.create_task(one(f"member {i}", None)) for i in range(3)]
                return [await leader, *[await m for m in members]]

        leader, *members = asyncio.run(run())
        assert leader is None
        for i, answer in enumerate(members):
            assert [d["embedding"] for d in answer["data"]] == [direct(sim, f"member {i}")]
    finally:
        gw.stop()
