"""Rate limits end to end: two gateway processes sharing real Redis, the openai SDK, real waits."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest
from procs import (
    Proc,
    gateway_config,
    http_get,
    new_key,
    openai_client,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)
from quota_helpers import MSG, away_from_minute_edge, burst, chat_body


@pytest.fixture(scope="module")
def wide_sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "64", "--n-ctx", "4096", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pair(wide_sim: Proc, redis_url: str, module_tmp: Path) -> Iterator[tuple[Proc, Proc]]:
    """Two gateways, one database, one Redis: what a deployment with N processes looks like."""
    db = f"sqlite+aiosqlite:///{module_tmp}/pair.db"
    cfg = gateway_config(
        {"tiny": [wide_sim.url]}, store={"database_url": db, "redis_url": redis_url}, quota={"backend": "redis"}
    )
    first = start_gateway(cfg, module_tmp, ready_path="/readyz")
    second = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def hanging(wide_sim: Proc) -> Iterator[None]:
    """Admitted requests hang at the upstream, so none finishes (and frees anything) during a burst."""
    sim_control(wide_sim, hang_rate=1.0)
    yield
    sim_control(wide_sim, hang_rate=0.0)


def statuses(results: list[tuple[int, dict[str, str], bytes]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for status, _, _ in results:
        out[status] = out.get(status, 0) + 1
    return out


def test_two_processes_admit_exactly_the_request_limit(pair: tuple[Proc, Proc]) -> None:
    key = new_key(pair[0], limits={"requests": {"minute": 100}})
    away_from_minute_edge()
    results = asyncio.run(burst([p.url for p in pair], key, 500, chat_body()))
    assert statuses(results) == {200: 100, 429: 400}
    refused = next(r for r in results if r[0] == 429)
    error = orjson.loads(refused[2])["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"]
    assert int(refused[1]["Retry-After"]) >= 1


async def _burst_until_decided(pair: tuple[Proc, Proc], sim: Proc, key: str, n: int, body: dict) -> tuple[int, int]:
    """Fire n requests whose admitted part hangs upstream; once every request is either refused or
    sitting at the upstream, return (admitted, refused) and let the rest go."""
    before = sim_stats(sim)["requests"]
    task = asyncio.create_task(burst([p.url for p in pair], key, n, body, limit_s=30))
    refused = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        arrived = sim_stats(sim)["requests"] - before
        # The gateway's own count of refusals (metrics of both processes).
        refused = sum(_refusals(p) for p in pair)
        if arrived + refused - _refusals_before.get(key, 0) >= n:
            break
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return sim_stats(sim)["requests"] - before, refused - _refusals_before.get(key, 0)


_refusals_before: dict[str, int] = {}


def _refusals(gw: Proc) -> int:
    text = http_get(gw.url + "/metrics")[1].decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("portcullis_quota_refusals_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_two_processes_admit_exactly_the_token_limit(pair: tuple[Proc, Proc], wide_sim: Proc, hanging: None) -> None:
    key = new_key(pair[0], limits={"tokens": {"minute": 1000}})
    # Each request reserves its prompt estimate (3 chars/4 -> 3, + 4 + 3 framing = 10) + 90 = 100 tokens.
    _refusals_before[key] = sum(_refusals(p) for p in pair)
    away_from_minute_edge()
    admitted, refused = asyncio.run(_burst_until_decided(pair, wide_sim, key, 300, chat_body(max_tokens=90)))
    assert (admitted, refused) == (10, 290)


def test_concurrency_limit_holds_across_processes(pair: tuple[Proc, Proc], wide_sim: Proc, hanging: None) -> None:
    key = new_key(pair[0], limits={"concurrency": 5})
    _refusals_before[key] = sum(_refusals(p) for p in pair)
    admitted, refused = asyncio.run(_burst_until_decided(pair, wide_sim, key, 100, chat_body()))
    assert (admitted, refused) == (5, 95)


def test_concurrency_under_load_never_exceeds_the_limit(pair: tuple[Proc, Proc], wide_sim: Proc) -> None:
    """Many short requests through both processes; the upstream never sees more than the limit at once."""
    key = new_key(pair[0], limits={"concurrency": 3})
    sim_control(wide_sim, tokens_per_s=400.0)
    try:
        base = sim_stats(wide_sim)
        for _ in range(3):
            results = asyncio.run(burst([p.url for p in pair], key, 60, chat_body(max_tokens=8)))
            assert set(statuses(results)) <= {200, 429} and statuses(results).get(200, 0) >= 3
        assert sim_stats(wide_sim)["max_active"] <= max(3, base["max_active"])
    finally:
        sim_control(wide_sim, tokens_per_s=0.0)
    # And the slots come back: a request after the bursts is admitted.
    client = openai.OpenAI(base_url=pair[1].url + "/v1", api_key=key, max_retries=0)
    wait_until(lambda: _admitted(client), what="a freed concurrency slot")


def _admitted(client: openai.OpenAI) -> bool:
    try:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        return True
    except openai.RateLimitError:
        return False


def test_every_response_carries_openai_rate_limit_headers(pair: tuple[Proc, Proc]) -> None:
    key = new_key(pair[0], limits={"requests": {"minute": 50, "day": 1000}, "tokens": {"minute": 5000}})
    client = openai.OpenAI(base_url=pair[0].url + "/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MSG, max_tokens=4)
    h = raw.headers
    assert h["x-ratelimit-limit-requests"] == "50"  # the minute window has the least room
    assert h["x-ratelimit-remaining-requests"] == "49"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert h["x-ratelimit-limit-tokens"] == "5000"
    assert int(h["x-ratelimit-remaining-tokens"]) < 5000


def test_sdk_raises_rate_limit_error_and_retry_after_is_the_real_wait(pair: tuple[Proc, Proc]) -> None:
    limit = 30
    key = new_key(pair[0], limits={"requests": {"minute": limit}})
    client = openai_client(pair[0], key)
    away_from_minute_edge(5)
    for _ in range(limit):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)
    answered_at = time.time()
    err = refused.value
    assert err.code == "rate_limit_exceeded"
    headers = err.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    wait_s = int(headers["retry-after-ms"]) / 1000
    assert int(headers["retry-after"]) == math.ceil(wait_s)
    # The window is 60 s; the wait is until this bucket ends plus 1/30 of the next, not a whole minute.
    into_minute = answered_at % 60
    assert wait_s == pytest.approx(60 - into_minute + 60 / limit, abs=0.5)
    ends_at = answered_at + wait_s
    other = openai_client(pair[1], key)  # the other process agrees: it refuses until the wait's last second

    def refused_in_the_last_second() -> bool:
        assert not _admitted(other), f"admitted {ends_at - time.time():.2f} s before the end of the wait"
        return time.time() >= ends_at - 1.0

    wait_until(refused_in_the_last_second, timeout=wait_s + 5, interval=0.25, what="a refusal in the last second")
    # ... and the wait is all it takes: admitted as soon as it is over.
    left = max(0.05, ends_at + 0.5 - time.time())  # (at least one ask, however late the last refusal came)
    wait_until(lambda: _admitted(client), timeout=left, what="admission at the end of the wait")


def test_in_process_backend_is_exact_within_one_process(wide_sim: Proc, module_tmp: Path) -> None:
    cfg = gateway_config({"tiny": [wide_sim.url]}, quota={"backend": "memory"})
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    try:
        key = new_key(gw, limits={"requests": {"minute": 50}, "concurrency": 200})
        away_from_minute_edge()
        results = asyncio.run(burst([gw.url], key, 300, chat_body()))
        assert statuses(results) == {200: 50, 429: 250}
    finally:
        gw.stop()
