"""The exact cache and coalescing, through a gateway process in front of the simulator.

Every hit or miss is checked twice: by the `x-portcullis-cache` header, and by the simulator's own
request count (a hit never reaches it). The Redis backend runs the same tests on the machine's Redis,
and a second gateway on the same Redis shows the cache is shared.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from load import post_chat
from procs import (
    ADMIN_KEY,
    Proc,
    gateway_config,
    http_post,
    new_key,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)

MSG = [{"role": "user", "content": "what is a llama"}]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, "max_tokens": 6, "temperature": 0, **extra}


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "8", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    return request.param


def _gateway(sim: Proc, tmp: Path, backend: str, redis_url: str | None = None, **cache: Any) -> Proc:
    sections: dict[str, Any] = {"cache": {"backend": backend, **cache}}
    if backend == "redis":
        sections["store"] = {"redis_url": redis_url}
    cfg = gateway_config({"m": [sim.url], "other": [sim.url]}, **sections)
    return start_gateway(cfg, tmp, ready_path="/readyz")


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Proc]:
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    proc = _gateway(sim, module_tmp, backend, redis_url)
    yield proc
    proc.stop()


def post(gw: Proc, payload: dict[str, Any], key: str = ADMIN_KEY, **headers: str) -> tuple[int, dict[str, str], Any]:
    return post_chat(gw.url, payload, key, **headers)


def upstream(sim: Proc) -> int:
    return sim_stats(sim)["requests"]


def fresh() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {secrets.token_hex(4)}"}]


def test_identical_deterministic_requests_hit_and_skip_the_upstream(gw: Proc, sim: Proc) -> None:
    payload = body(messages=fresh())
    before = upstream(sim)
    s1, h1, a1 = post(gw, payload)
    s2, h2, a2 = post(gw, payload)
    assert (s1, s2) == (200, 200)
    assert (h1["x-portcullis-cache"], h2["x-portcullis-cache"]) == ("miss", "hit")
    assert a1 == a2 and upstream(sim) == before + 1
    # stream, stream_options and user do not change the answer: still the same entry
    assert post(gw, {**payload, "user": "someone"})[1]["x-portcullis-cache"] == "hit"


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "something else"}]},
        {"max_tokens": 7},
        {"top_p": 0.5},
        {"stop": ["\n"]},
        {"seed": 7},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"n": 2},
        {"logit_bias": {"42": 1}},
        {"presence_penalty": 0.1},
        {"frequency_penalty": 0.1},
        {"model": "other"},
        {"top_k": 5},  # a llama-server field the gateway has never heard of still separates entries
    ],
    ids=lambda c: next(iter(c)),
)
def test_any_output_affecting_field_makes_another_entry(gw: Proc, sim: Proc, change: dict[str, Any]) -> None:
    payload = body(messages=fresh())
    post(gw, payload)
    if "messages" in change:  # (unique, as the Redis backend keeps entries between runs)
        change = {"messages": fresh()}
    before = upstream(sim)
    status, headers, _ = post(gw, {**payload, **change})
    assert status == 200 and headers["x-portcullis-cache"] == "miss"
    assert upstream(sim) == before + 1


def test_nondeterministic_requests_bypass(gw: Proc, sim: Proc) -> None:
    payload = {**body(messages=fresh()), "temperature": 0.7}
    before = upstream(sim)
    assert [post(gw, payload)[1]["x-portcullis-cache"] for _ in range(2)] == ["bypass", "bypass"]
    assert upstream(sim) == before + 2


def test_tenants_never_share_an_entry(gw: Proc, sim: Proc) -> None:
    alice, alice_again, bob = new_key(gw, user="alice"), new_key(gw, user="alice"), new_key(gw, user="bob")
    payload = body(messages=fresh())
    assert post(gw, payload, key=alice)[1]["x-portcullis-cache"] == "miss"
    assert post(gw, payload, key=bob)[1]["x-portcullis-cache"] == "miss"
    assert post(gw, payload, key=alice_again)[1]["x-portcullis-cache"] == "hit"  # per user, not per key


def test_a_streamed_hit_is_a_valid_stream_the_sdk_reads(gw: Proc) -> None:
    payload = body(messages=fresh())
    _, _, answer = post(gw, payload)
    status, headers, raw = post(gw, {**payload, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["x-portcullis-cache"] == "hit"
    assert headers["content-type"].startswith("text/event-stream")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]

    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    stream = client.chat.completions.create(**{**payload, "stream": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == answer["choices"][0]["message"]["content"]


def test_a_streamed_miss_fills_the_cache_for_both_forms(gw: Proc, sim: Proc) -> None:
    payload = body(messages=fresh(), stream=True)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    first = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**payload) if c.choices)
    before = upstream(sim)
    status, headers, answer = post(gw, {**payload, "stream": False})
    assert status == 200 and headers["x-portcullis-cache"] == "hit" and upstream(sim) == before
    assert answer["choices"][0]["message"]["content"] == first and answer["model"] == "m"


def test_errors_and_cut_streams_are_never_cached(gw: Proc, sim: Proc) -> None:
    payload = body(messages=fresh())
    sim_control(sim, fail_next=1, fail_status=500)
    assert post(gw, payload)[0] == 500
    assert post(gw, payload)[1]["x-portcullis-cache"] == "miss"  # the error was not kept
    streamed = body(messages=fresh(), stream=True, max_tokens=8)
    sim_control(sim, drop_rate=1.0, fault_after_tokens=2)
    try:
        assert b"upstream_stream_truncated" in post(gw, streamed)[2]
    finally:
        sim_control(sim, drop_rate=0.0)
    assert post(gw, streamed)[1]["x-portcullis-cache"] == "miss"


def test_cache_control_no_cache_and_no_store(gw: Proc, sim: Proc) -> None:
    payload = body(messages=fresh())
    assert post(gw, payload, **{"cache-control": "no-store"})[1]["x-portcullis-cache"] == "miss"
    assert post(gw, payload)[1]["x-portcullis-cache"] == "miss"  # nothing was stored
    before = upstream(sim)
    assert post(gw, payload, **{"cache-control": "no-cache"})[1]["x-portcullis-cache"] == "miss"
    assert upstream(sim) == before + 1


def test_identical_concurrent_requests_make_one_upstream_call(gw: Proc, sim: Proc) -> None:
    sim_control(sim, tokens_per_s=50)  # ~0.1 s an answer: they overlap
    try:
        for stream in (False, True):
            payload = body(messages=fresh(), stream=stream)
            before = upstream(sim)

            async def run(payload: dict[str, Any] = payload) -> list[tuple[int, str, bytes]]:
                async with aiohttp.ClientSession() as s:

                    async def one() -> tuple[int, str, bytes]:
                        async with s.post(
                            gw.url + "/v1/chat/completions",
                            data=orjson.dumps(payload),
                            headers={"authorization": f"Bearer {ADMIN_KEY}"},
                        ) as r:
                            return r.status, r.headers["x-portcullis-cache"], await r.read()

                    return list(await asyncio.gather(*(one() for _ in range(8))))

            results = asyncio.run(run())
            assert upstream(sim) == before + 1
            assert sorted(h for _, h, _ in results) == ["coalesced"] * 7 + ["miss"]
            assert all(status == 200 for status, _, _ in results)
            if stream:
                texts = {
                    "".join(
                        orjson.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                        for e in raw.split(b"\n\n")
                        if e.startswith(b"data: {") and orjson.loads(e[6:])["choices"]
                    )
                    for _, _, raw in results
                }
            else:
                texts = {orjson.loads(raw)["choices"][0]["message"]["content"] for _, _, raw in results}
            assert len(texts) == 1 and texts != {""}
    finally:
        sim_control(sim, tokens_per_s=0)


def test_a_waiter_leaving_or_the_leader_leaving_breaks_no_one_else(gw: Proc, sim: Proc) -> None:
    sim_control(sim, tokens_per_s=20)  # ~0.3 s an answer
    try:
        payload = body(messages=fresh())

        async def run() -> list[Any]:
            async with aiohttp.ClientSession() as s:

                async def one(give_up_after: float | None) -> Any:
                    try:
                        async with asyncio.timeout(give_up_after):
                            async with s.post(
                                gw.url + "/v1/chat/completions",
                                data=orjson.dumps(payload),
                                headers={"authorization": f"Bearer {ADMIN_KEY}"},
                            ) as r:
                                return orjson.loads(await r.read())
                    except TimeoutError:
                        return None

                leader = asyncio.create_task(one(0.15))  # leaves before its answer
                await asyncio.sleep(0.02)
                # One waiter leaves even earlier, while the leader still leads.
                waiters = [asyncio.create_task(one(0.05 if i == 0 else None)) for i in range(4)]
                return [await leader, *[await w for w in waiters]]

        before = upstream(sim)
        leader, quitter, *stayed = asyncio.run(run())
        assert leader is None and quitter is None
        assert all(a is not None and a["choices"][0]["message"]["content"] for a in stayed)
        assert len({a["choices"][0]["message"]["content"] for a in stayed}) == 1
        assert upstream(sim) == before + 2  # the leader's call was cancelled; one waiter led the retry
    finally:
        sim_control(sim, tokens_per_s=0)


def test_hits_count_against_request_limits_and_are_recorded_as_hits(gw: Proc) -> None:
    status, raw = http_post(
        gw.url + "/admin/keys",
        {"user": f"u{secrets.token_hex(3)}", "tier": "enterprise", "limits": {"requests": {"minute": 3}}},
    )
    assert status == 201
    key = orjson.loads(raw)["key"]
    payload = body(messages=fresh())
    results = [post(gw, payload, key=key) for _ in range(4)]
    assert [r[0] for r in results] == [200, 200, 200, 429]
    assert [r[1].get("x-portcullis-cache") for r in results[:3]] == ["miss", "hit", "hit"]
    db = gw.database_url.removeprefix("sqlite+aiosqlite:///")

    def recorded() -> list[tuple[int, float, int, int]]:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT cache_hit, cost, prompt_tokens, completion_tokens FROM usage WHERE key_id = ? AND status = 200",
                (key.split("-")[1],),
            ).fetchall()

    wait_until(lambda: len(recorded()) == 3, what="the usage records")
    rows = recorded()
    assert sorted(r[0] for r in rows) == [0, 1, 1]
    assert all(r[1:] == (0.0, 0, 0) for r in rows if r[0])


def test_entries_expire_after_their_ttl(
    sim: Proc, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    gw = _gateway(sim, tmp_path, backend, redis_url, ttl_s=0.5)
    try:
        payload = body(messages=fresh())
        assert post(gw, payload)[1]["x-portcullis-cache"] == "miss"
        assert post(gw, payload)[1]["x-portcullis-cache"] == "hit"
        time.sleep(0.6)  # past the TTL: the entry is gone whatever the clock's jitter
        assert post(gw, payload)[1]["x-portcullis-cache"] == "miss"
    finally:
        gw.stop()


def test_two_gateways_on_one_redis_share_the_cache(sim: Proc, tmp_path: Path, redis_url: str) -> None:
    first, second = (_gateway(sim, tmp_path, "redis", redis_url) for _ in range(2))
    try:
        payload = body(messages=fresh())
        assert post(first, payload)[1]["x-portcullis-cache"] == "miss"
        wait_until(lambda: post(second, payload)[1]["x-portcullis-cache"] == "hit", what="the shared entry")
    finally:
        first.stop()
        second.stop()


def test_global_scope_shares_between_tenants_and_seeded_requests_are_opt_in(sim: Proc, tmp_path: Path) -> None:
    gw = _gateway(sim, tmp_path, "memory", scope="global", seeded=True)
    try:
        alice, bob = new_key(gw, user="alice"), new_key(gw, user="bob")
        payload = body(messages=fresh())
        assert post(gw, payload, key=alice)[1]["x-portcullis-cache"] == "miss"
        assert post(gw, payload, key=bob)[1]["x-portcullis-cache"] == "hit"  # the operator chose to share
        seeded = {**payload, "temperature": 0.9, "seed": 11}
        assert [post(gw, seeded)[1]["x-portcullis-cache"] for _ in range(2)] == ["miss", "hit"]
    finally:
        gw.stop()
