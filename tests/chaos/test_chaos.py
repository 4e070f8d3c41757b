"""Chaos: real simulator processes killed, stopped, failing and overloaded under live traffic.

Each scenario runs the gateway as a process in front of simulator replicas, drives it with an asyncio
load client over HTTP, and breaks a replica for real (SIGKILL mid-stream, SIGSTOP, injected 503s).
What is asserted is what a client sees (statuses, complete or error-ended streams, never a hang or a
silent truncation) and what the replicas saw (request counts at the simulator).
"""

from __future__ import annotations

import asyncio
import signal
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from load import Result, call, chat_body, open_loop
from procs import (
    ADMIN_KEY,
    Proc,
    gateway_config,
    http_get,
    http_post,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)

RESILIENCE = {
    "retries": 2,
    "backoff": {"base_s": 0.05, "max_s": 0.5},
    "breaker": {"failures": 3, "window_s": 10, "open_s": 1.5, "half_open_probes": 1, "close_after": 1},
    "retry_budget": {"ratio": 0.2, "window_s": 10, "min_per_s": 1},
}
# Tiers without quota limits: these tests are about capacity, not rate limits.
TIERS = {"free": {"priority": 0}, "premium": {"priority": 1}}


def _backend(gw: Proc, model: str, replica: str) -> dict[str, Any]:
    status, raw = http_get(gw.url + "/admin/backends")
    assert status == 200, raw
    for m in orjson.loads(raw)["data"]:
        if m["model"] == model:
            for r in m["replicas"]:
                if r["name"] == replica:
                    return r
    raise AssertionError(f"{model}/{replica} not in /admin/backends")


def _metric(gw: Proc, name: str, **labels: str) -> float:
    _, raw = http_get(gw.url + "/metrics")
    total = 0.0
    for line in raw.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _sims(tmp: Path, n: int, *args: str) -> list[Proc]:
    return [start_sim("--slots", "4", *args, log_dir=tmp) for _ in range(n)]


@pytest.fixture
def two_sims(tmp_path: Path) -> Iterator[list[Proc]]:
    sims = _sims(tmp_path, 2, "--tokens-per-s", "40")
    yield sims
    for s in sims:
        s.stop()


def _gateway(tmp: Path, sims: list[Proc], **sections: Any) -> Proc:
    deployments = [{"url": s.url, "name": f"r{i}"} for i, s in enumerate(sims)]
    cfg = gateway_config({"m": deployments}, resilience=RESILIENCE, tiers=TIERS, **sections)
    return start_gateway(cfg, tmp, ready_path="/readyz")


def _restart(sim: Proc, tmp: Path, *args: str) -> Proc:
    return start_sim("--slots", "4", *args, log_dir=tmp, port=sim.port)


def test_one_of_two_replicas_killed_mid_stream(tmp_path: Path, two_sims: list[Proc]) -> None:
    """SIGKILL one replica under mixed load: no non-streamed request fails; streams on it end with an
    error event (never a hang or a silent cut); its breaker opens, and closes once it is back."""
    gw = _gateway(tmp_path, two_sims)
    victim = two_sims[0]
    try:

        async def run() -> tuple[list[Result], list[Result]]:
            stop = asyncio.Event()
            plain: list[Result] = []
            streams: list[Result] = []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

                async def worker(stream: bool, out: list[Result]) -> None:
                    # Streams are long (~1 s) and plain requests short, so most of what is in flight on a
                    # replica at any moment is streams.
                    while not stop.is_set():
                        out.append(await call(s, gw.url, chat_body(stream=stream, max_tokens=40 if stream else 4)))

                tasks = [asyncio.create_task(worker(False, plain)) for _ in range(2)]
                tasks += [asyncio.create_task(worker(True, streams)) for _ in range(6)]

                # Kill the victim while it is busy with streams and plain requests alike.
                # (Streams the victim has started generating: one killed before its first event is simply
                # retried elsewhere, which is right but not what this part checks.)
                def streaming_on_victim() -> bool:
                    stats = sim_stats(victim)
                    return stats["active"] >= 3 and stats["predicted_tokens"] >= 20

                await asyncio.to_thread(wait_until, streaming_on_victim, timeout=10, interval=0.02)
                victim.signal(signal.SIGKILL)
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*tasks)
            return plain, streams

        plain, streams = asyncio.run(run())
        assert plain and streams
        assert [r.status for r in plain if r.status != 200] == []
        assert not any(r.hung for r in plain + streams)
        assert not any(r.truncated for r in streams)
        cut = [r for r in streams if r.stream_error is not None]
        assert cut, "streams were generating on the killed replica when it died"
        assert {r.stream_error["code"] for r in cut} == {"upstream_stream_truncated"}
        assert any(r.attempts >= 2 for r in plain), "non-streamed requests on the dead replica were retried"
        assert _metric(gw, "portcullis_breaker_transitions_total", replica="r0", to="open") >= 1

        # Back on its port: the prober sees it ready, the breaker half-opens after open_s, a probe closes it.
        revived = _restart(victim, tmp_path, "--tokens-per-s", "40")
        two_sims[0] = revived

        def closed_and_serving() -> bool:
            http_post(gw.url + "/v1/chat/completions", chat_body(max_tokens=2))
            return _backend(gw, "m", "r0")["breaker"]["state"] == "closed" and sim_stats(revived)["completed"] > 0

        wait_until(closed_and_serving, timeout=20, interval=0.1, what="the revived replica's breaker to close")
        assert _metric(gw, "portcullis_breaker_transitions_total", replica="r0", to="closed") >= 1
    finally:
        gw.stop()


def test_half_the_answers_of_one_replica_fail(tmp_path: Path, two_sims: list[Proc]) -> None:
    """One replica answers 503 half the time: with retries the client error rate stays under 1%."""
    sim_control(two_sims[0], unavailable_rate=0.5)
    # Retries hold their slot through the backoff: room to queue the 100 requests/s meanwhile (this is about
    # failures, not overload).
    gw = _gateway(tmp_path, two_sims, admission={"max_queue": 256, "max_wait_s": 10})
    try:
        bodies = [(chat_body(max_tokens=2), ADMIN_KEY)] * 400
        results = asyncio.run(open_loop(gw.url, bodies, rate=100))
        errors = [r for r in results if r.status != 200]
        assert len(errors) / len(results) < 0.01, [r.body for r in errors[:3]]
        assert sum(r.attempts >= 2 for r in results) > 0
        assert sim_stats(two_sims[0])["requests"] > 0
    finally:
        gw.stop()


def test_all_replicas_down_then_back(tmp_path: Path, two_sims: list[Proc]) -> None:
    """Every replica fails: clear 503s at once, upstream calls bounded by the retry budget (no storm),
    and traffic flows again by itself when they recover (answering 503, then killed and restarted)."""
    gw = _gateway(tmp_path, two_sims)
    try:
        for s in two_sims:
            sim_control(s, unavailable_rate=1.0)
        n = 200
        results = asyncio.run(open_loop(gw.url, [(chat_body(max_tokens=2), ADMIN_KEY)] * n, rate=100))
        assert {r.status for r in results} == {503}
        assert all("retry-after" in r.headers for r in results)
        assert max(r.latency for r in results) < 3.0  # backoff is capped and the budget runs out: no pile-up
        upstream_calls = sum(sim_stats(s)["requests"] for s in two_sims)
        budget = RESILIENCE["retry_budget"]
        allowed_retries = budget["ratio"] * n + budget["min_per_s"] * budget["window_s"]
        assert upstream_calls <= n + allowed_retries, upstream_calls
        assert upstream_calls < n, "open breakers kept most requests off the failing replicas"

        for s in two_sims:
            sim_control(s, unavailable_rate=0.0)
        wait_until(
            lambda: http_post(gw.url + "/v1/chat/completions", chat_body(max_tokens=2))[0] == 200,
            timeout=10,
            interval=0.2,
            what="recovery after the replicas answer again",
        )

        for s in two_sims:
            s.signal(signal.SIGKILL)
            s.wait(5)
        down = asyncio.run(open_loop(gw.url, [(chat_body(max_tokens=2), ADMIN_KEY)] * 20, rate=20))
        # The first one or two may learn it the hard way (502: the connection was refused); then the
        # replicas are known down and the answer is an immediate 503.
        assert max(r.latency for r in down) < 3.0
        assert sum(r.status == 503 for r in down) >= 18 and {r.status for r in down} <= {502, 503}
        assert {r.body["error"]["code"] for r in down} <= {"no_ready_replica", "upstream_unreachable"}
        wait_until(lambda: http_get(gw.url + "/readyz")[0] == 503, timeout=5, what="readyz to report no replica")
        for i, s in enumerate(two_sims):
            two_sims[i] = _restart(s, tmp_path, "--tokens-per-s", "40")
        wait_until(
            lambda: http_post(gw.url + "/v1/chat/completions", chat_body(max_tokens=2))[0] == 200,
            timeout=10,
            interval=0.2,
            what="recovery after the replicas restart",
        )
        assert http_get(gw.url + "/readyz")[0] == 200
    finally:
        gw.stop()


# conftest's slow_sim: 2 slots, 10 tokens at 100 tokens/s: ~0.1 s a request, a capacity of ~20 requests/s.
SLOW_SIM = ("--slots", "2", "--tokens-per-s", "100")


def test_overload_three_times_capacity_with_a_queue(tmp_path: Path, slow_sim: Proc) -> None:
    """3x capacity: the queue stays bounded, the simulator never queues silently, the higher tier waits
    less, and Retry-After on refusals is within 25% of the wait of requests queued at that time."""
    max_queue = 16
    cfg = gateway_config(
        {"m": [{"url": slow_sim.url, "name": "r0"}]},
        resilience=RESILIENCE,
        tiers=TIERS,
        admission={"when_full": "queue", "max_queue": max_queue, "max_wait_s": 10},
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        status, raw = http_post(gw.url + "/admin/keys", {"user": "f", "tier": "free"})
        assert status == 201, raw
        free = orjson.loads(raw)["key"]
        # Warm the service-time estimate, then 60 requests/s for 5 s; one in six from the premium tier
        # (half the capacity).
        asyncio.run(open_loop(gw.url, [(chat_body(max_tokens=10), free)] * 10, rate=10))
        bodies = [(chat_body(max_tokens=10), ADMIN_KEY if i % 6 == 0 else free) for i in range(300)]

        depths: list[float] = []

        async def with_sampling() -> list[Result]:
            load = asyncio.create_task(open_loop(gw.url, bodies, rate=60))
            while not load.done():
                depths.append(await asyncio.to_thread(_metric, gw, "portcullis_queue_depth", model="m"))
                await asyncio.sleep(0.1)
            return await load

        results = asyncio.run(with_sampling())
        assert max(depths) <= max_queue and max(depths) >= max_queue - 2  # it filled, and stayed bounded
        stats = sim_stats(slow_sim)
        # Nothing queued silently upstream: at most the one request that arrives in the instant between
        # the gateway receiving an answer (freeing the slot) and the simulator freeing its own slot.
        assert stats["max_active"] <= 2 and stats["max_waiting"] <= 1
        refused = [r for r in results if r.status == 503]
        served = [r for r in results if r.status == 200]
        assert refused and served and len(refused) + len(served) == len(results)
        assert {r.body["error"]["code"] for r in refused} == {"overloaded"}
        # Every slot came back: none leaked through a wait that timed out as it was granted, or a refusal.
        gate = orjson.loads(http_get(gw.url + "/admin/backends")[1])["data"][0]
        assert gate["slots"]["in_use"] == 0 and gate["queue"]["depth"] == 0
        tiers = [key for _, key in bodies]
        premium = [r.latency for r, key in zip(results, tiers, strict=True) if r.status == 200 and key == ADMIN_KEY]
        lower = [r.latency for r, key in zip(results, tiers, strict=True) if r.status == 200 and key == free]
        assert premium and lower
        assert statistics.median(premium) < statistics.median(lower)
        assert len(premium) >= 0.95 * tiers.count(ADMIN_KEY)  # the higher tier is (nearly) never refused

        # Retry-After against the real wait: refusals of the lower tier vs the queue wait of lower-tier
        # requests queued in the same second (the queue is full and FIFO within a key).
        t0 = min(r.sent_at for r in results)
        paired = []
        for r, key in zip(results, tiers, strict=True):
            if r.status != 503 or key != free:
                continue
            second = int(r.sent_at - t0)
            waits = [
                int(q.headers["x-portcullis-queue-wait-ms"])
                for q, k in zip(results, tiers, strict=True)
                if q.status == 200
                and k == free
                and "x-portcullis-queue-wait-ms" in q.headers
                and int(q.sent_at - t0) == second
            ]
            if waits and second >= 1:
                paired.append((int(r.headers["retry-after-ms"]), statistics.median(waits)))
        assert len(paired) >= 20
        estimate = statistics.median(p for p, _ in paired)
        actual = statistics.median(w for _, w in paired)
        assert abs(estimate - actual) <= 0.25 * actual, (estimate, actual)
    finally:
        gw.stop()


def test_a_hung_replica_is_routed_around(tmp_path: Path, two_sims: list[Proc]) -> None:
    """SIGSTOP one replica: streams on it time out before their first event and are retried elsewhere
    (the client sees a complete stream); its breaker opens; SIGCONT brings it back."""
    deployments = [{"url": s.url, "name": f"r{i}"} for i, s in enumerate(two_sims)]
    cfg = gateway_config(
        {"m": deployments},
        resilience=RESILIENCE,
        tiers=TIERS,
        upstream={"timeouts": {"ttft_s": 0.5}},
        health={"interval_s": 5, "timeout_s": 1},  # let the breaker, not the prober, find it
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    hung = two_sims[0]
    try:
        hung.signal(signal.SIGSTOP)

        async def run() -> list[Result]:
            async with aiohttp.ClientSession() as s:
                return list(
                    await asyncio.gather(*(call(s, gw.url, chat_body(stream=True, max_tokens=4)) for _ in range(8)))
                )

        results = asyncio.run(run())
        assert all(r.stream_complete and r.stream_error is None for r in results), results
        assert any(r.attempts == 2 for r in results)
        assert _backend(gw, "m", "r0")["breaker"]["state"] == "open"
        later = asyncio.run(run())
        assert all(r.stream_complete and r.attempts == 1 for r in later)  # the open breaker keeps them off it
    finally:
        hung.signal(signal.SIGCONT)
        gw.stop()
