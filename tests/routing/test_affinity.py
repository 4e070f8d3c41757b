"""Prefix affinity under mixed load: multi-turn conversations with long system prompts, interleaved with
one-off short requests, over three simulator replicas whose slots cache prompts as llama-server's do.

The same load runs through a gateway with affinity and one without (same replicas): with it, the
follow-up turns land where their prefix is cached and the replicas reuse far more prompt tokens.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_get, sim_stats, start_gateway, start_sim

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
CONVERSATIONS = 12
TURNS = 4
AT_ONCE = 6


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[list[Proc]]:
    # 12 slots in all; at most AT_ONCE conversations and one stream of one-offs in flight: within capacity.
    args = ("--slots", "4", "--n-ctx", "8192", "--tokens-per-s", "400", "--prompt-ms-per-token", "0.02")
    procs = [start_sim(*args, log_dir=module_tmp) for _ in range(3)]
    yield procs
    for p in procs:
        p.stop()


def _gateway(sims: list[Proc], tmp: Path, *, affinity: bool) -> Proc:
    cfg = gateway_config(
        {"chat": [{"url": s.url, "name": f"r{i}"} for i, s in enumerate(sims)]},
        routing={"affinity": {"enabled": affinity}},
    )
    return start_gateway(cfg, tmp, ready_path="/readyz")


async def _chat(session: aiohttp.ClientSession, gw: Proc, messages: list[dict[str, str]]) -> str:
    body = {"model": "chat", "messages": messages, "max_tokens": 16, "temperature": 0.7}
    async with session.post(
        gw.url + "/v1/chat/completions", data=orjson.dumps(body), headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["choices"][0]["message"]["content"]


async def _load(gw: Proc, seed: int) -> None:
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(250)) for _ in range(CONVERSATIONS)]
    gate = asyncio.Semaphore(AT_ONCE)
    async with aiohttp.ClientSession() as session:

        async def conversation(system: str) -> None:
            async with gate:
                messages = [{"role": "system", "content": system}]
                for turn in range(TURNS):
                    messages.append({"role": "user", "content": f"Question {turn}: {rng.choice(WORDS)}?"})
                    messages.append({"role": "assistant", "content": await _chat(session, gw, messages)})

        async def one_offs() -> None:
            for i in range(20):
                await _chat(session, gw, [{"role": "user", "content": f"one-off {i} {rng.choice(WORDS)}"}])

        await asyncio.gather(*(conversation(s) for s in systems), one_offs())


def _cached_share(sims: list[Proc], before: list[dict[str, Any]]) -> float:
    after = [sim_stats(s) for s in sims]
    cached = sum(a["prompt_tokens_cached"] - b["prompt_tokens_cached"] for a, b in zip(after, before, strict=True))
    total = sum(a["prompt_tokens"] - b["prompt_tokens"] for a, b in zip(after, before, strict=True))
    return cached / total


def _placements(gw: Proc) -> dict[str, float]:
    _, raw = http_get(gw.url + "/metrics")
    out = {}
    for line in raw.decode().splitlines():
        if line.startswith("portcullis_affinity_placements_total{"):
            result = line.split('result="')[1].split('"')[0]
            out[result] = float(line.split()[-1])
    return out


def test_prefix_affinity_sends_follow_ups_where_their_prefix_is_cached(sims: list[Proc], module_tmp: Path) -> None:
    shares = {}
    for affinity in (True, False):
        gw = _gateway(sims, module_tmp, affinity=affinity)
        try:
            before = [sim_stats(s) for s in sims]
            asyncio.run(_load(gw, seed=7 if affinity else 8))  # (new prompts: nothing cached from the other run)
            shares[affinity] = _cached_share(sims, before)
            placements = _placements(gw)
        finally:
            gw.stop()
        if affinity:
            # Every conversation's first turn is new; each follow-up finds its prefix's replica (the
            # one-off requests are shorter than a block and are balanced by load alone).
            assert placements["new"] + placements["hit"] + placements["overflow"] == CONVERSATIONS * TURNS
            follow_ups = placements["hit"] + placements["overflow"]
            assert placements["hit"] / follow_ups >= 0.9, placements
        else:
            assert sum(placements.values()) == 0
    # Turn n's prompt is turn n-1's prompt and answer plus one question: with affinity most of it is
    # already in a slot (at most ~75%: first turns are never cached); without, only when load balancing
    # happens to pick the same replica (about a third of the time).
    print(f"cached prompt share: with affinity {shares[True]:.2f}, without {shares[False]:.2f}")
    assert shares[True] >= 0.6, shares
    assert shares[True] >= shares[False] + 0.1, shares
