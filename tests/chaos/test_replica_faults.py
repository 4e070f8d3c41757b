"""Replica faults as real servers make them: keep-alive connections the server closes, a replica killed under
mixed load, thousands of open streams, error events in streams, a full connection pool.

The simulator closes idle keep-alive connections as llama-server does (5 s by default; 1 s here, so the
race a pooled connection runs against its server comes every second); with LLAMA_SERVER_BIN set, the kill
runs against two real llama-server replicas too (whose 5 s keep-alive is compiled in).
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from load import Result, call, chat_body
from procs import (
    LLAMA_BIN,
    LlamaServer,
    Proc,
    gateway_config,
    http_get,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)

RESILIENCE = {
    "retries": 2,
    "backoff": {"base_s": 0.05, "max_s": 0.5},
    "breaker": {"failures": 3, "window_s": 30, "open_s": 1.5},
    "retry_budget": {"ratio": 0.5, "window_s": 10, "min_per_s": 2},
}
TIERS = {"free": {"priority": 0}, "premium": {"priority": 1}}


def _backends(gw: Proc) -> dict[str, dict[str, Any]]:
    status, raw = http_get(gw.url + "/admin/backends")
    assert status == 200, raw
    return {r["name"]: r for m in orjson.loads(raw)["data"] for r in m["replicas"]}


def _metric(gw: Proc, name: str, **labels: str) -> float:
    _, raw = http_get(gw.url + "/metrics")
    total = 0.0
    for line in raw.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Watch:
    """Samples /admin/backends every 50 ms in a thread: each replica's health and breaker states seen."""

    def __init__(self, gw: Proc) -> None:
        self.gw = gw
        self.seen: dict[str, set[tuple[str, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for name, r in _backends(self.gw).items():
                    self.seen.setdefault(name, set()).add((r["state"], r["breaker"]["state"]))
            except OSError:
                pass
            self._stop.wait(0.05)

    def stop(self) -> dict[str, set[tuple[str, str]]]:
        self._stop.set()
        self._thread.join()
        return self.seen


# -- a replica killed under mixed load ------------------------------------------------------------


class _Sims:
    """Two simulator replicas; keep-alive 0.5 s (llama-server's habit, ten times as often). Bursts come every
    0.75 s, so the connections a burst opened are reused after the replicas consider them dead."""

    burst_period_s = 0.75
    model = "m"

    def __init__(self, tmp: Path) -> None:
        self.procs: list[Any] = [
            start_sim("--slots", "8", "--tokens-per-s", "80", "--keep-alive-s", "0.5", log_dir=tmp) for _ in range(2)
        ]

    def body(self, *, stream: bool, max_tokens: int) -> dict[str, Any]:
        return chat_body(stream=stream, max_tokens=max_tokens)

    def slow_body(self) -> dict[str, Any]:
        """A non-streamed request whose answer takes about 3 s."""
        return chat_body(max_tokens=240)


class _Llamas:
    """Two real llama-server replicas of the tiny random-weight model. Bursts every 5 s, its keep-alive: a
    burst's connections are reused as the server closes them."""

    burst_period_s = 5.0
    model = "m"

    def __init__(self, tmp: Path) -> None:
        from llama.tiny_gguf import write_tiny_llama

        model = write_tiny_llama(tmp / "tiny.gguf")
        self.procs = [LlamaServer(model, slots=4, ctx=2048, log_dir=tmp) for _ in range(2)]

    def body(self, *, stream: bool, max_tokens: int) -> dict[str, Any]:
        # The tiny model decodes thousands of tokens a second; ignore_eos makes every answer its full length.
        return {**chat_body(stream=stream, max_tokens=max_tokens * 8), "ignore_eos": True}

    def slow_body(self) -> dict[str, Any]:
        """A non-streamed request whose answer takes about 3 s (on one CPU thread; 2,048 tokens of context)."""
        return {**chat_body(max_tokens=1900), "ignore_eos": True}


needs_llama = pytest.mark.skipif(not LLAMA_BIN, reason="LLAMA_SERVER_BIN is not set (a real llama-server is optional)")


@pytest.fixture(params=["simulator", pytest.param("llama-server", marks=[pytest.mark.llama, needs_llama])])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Sims | _Llamas]:
    fleet = _Sims(tmp_path) if request.param == "simulator" else _Llamas(tmp_path)
    yield fleet
    for p in fleet.procs:
        p.stop()


def test_a_killed_replica_never_opens_the_survivors_breaker(
    tmp_path: Path, reaper: Callable[[Any], Any], fleet: _Sims | _Llamas
) -> None:
    """SIGKILL one of two replicas under mixed load (streams; plain requests with think time and in bursts,
    so pooled connections go idle as long as the replicas' keep-alive and meet servers closing them): no non-streamed
    request fails, every stream cut on the victim ends with an error event, and the survivor stays ready
    with its breaker closed throughout. (Before: reused connections the survivor had closed were counted as
    its connect failures, and its breaker opened: 503 no_ready_replica for everyone.)"""
    deployments = [{"url": p.url, "name": f"r{i}"} for i, p in enumerate(fleet.procs)]
    cfg = gateway_config({"m": deployments}, resilience=RESILIENCE, tiers=TIERS, admission={"max_wait_s": 15})
    gw = reaper(start_gateway(cfg, tmp_path, ready_path="/readyz"))
    victim = fleet.procs[0]
    period = fleet.burst_period_s
    try:

        async def run() -> tuple[list[Result], list[Result]]:
            stop = asyncio.Event()
            plain: list[Result] = []
            streams: list[Result] = []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

                async def worker(stream: bool, out: list[Result]) -> None:
                    body = fleet.body(stream=stream, max_tokens=40 if stream else 4)
                    while not stop.is_set():
                        out.append(await call(s, gw.url, body, limit_s=30))
                        if not stream:  # users think between requests: pooled connections go idle
                            await asyncio.sleep(random.uniform(0, 2 * period))

                async def bursts() -> None:
                    while not stop.is_set():
                        started = time.monotonic()
                        body = fleet.body(stream=False, max_tokens=2)
                        plain.extend(await asyncio.gather(*(call(s, gw.url, body, limit_s=30) for _ in range(16))))
                        await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

                tasks = [asyncio.create_task(worker(False, plain)) for _ in range(4)]
                tasks += [asyncio.create_task(worker(True, streams)) for _ in range(3)]
                tasks.append(asyncio.create_task(bursts()))
                await asyncio.sleep(max(2.0, 2 * period))  # a few bursts against both replicas first

                def busy_victim() -> bool:
                    return _backends(gw)["r0"]["in_flight"] >= 2

                await asyncio.to_thread(wait_until, busy_victim, timeout=10, interval=0.02)
                victim.signal(signal.SIGKILL)
                await asyncio.sleep(max(4.0, 3 * period))  # bursts against the survivor alone
                stop.set()
                await asyncio.gather(*tasks)
            return plain, streams

        watch = Watch(gw)
        try:
            plain, streams = asyncio.run(run())
        finally:
            seen = watch.stop()
        assert plain and streams
        assert [(r.status, r.body) for r in plain if r.status != 200] == []
        assert not any(r.hung for r in plain + streams)
        assert not any(r.truncated for r in streams)
        assert {r.stream_error["code"] for r in streams if r.stream_error is not None} <= {"upstream_stream_truncated"}
        assert seen["r1"] == {("ready", "closed")}, seen["r1"]
        assert _metric(gw, "portcullis_breaker_transitions_total", replica="r1", to="open") == 0
        # The victim was found out: marked down by the refused connections, or its breaker opened.
        assert any(state == "down" or breaker == "open" for state, breaker in seen["r0"]), seen["r0"]
    finally:
        gw.stop()


def test_a_pooled_connection_the_server_closed_is_not_a_replica_failure(
    tmp_path: Path, reaper: Callable[[Any], Any]
) -> None:
    """The replica closes each connection used before just as the next request arrives on it (llama-server's
    keep-alive timer firing under the request; the simulator does it on demand): each such request goes
    again at once on a fresh connection. Every answer is 200 on the first attempt, the replica's breaker
    counts nothing and it stays ready. (Before: ClientOSError / ServerDisconnectedError counted as the
    replica's connect failures; five opened its breaker.)"""
    sim = reaper(start_sim("--slots", "4", log_dir=tmp_path))
    cfg = gateway_config({"m": [{"url": sim.url, "name": "r0"}]}, tiers=TIERS)
    gw = reaper(start_gateway(cfg, tmp_path, ready_path="/readyz"))
    try:

        async def run(n: int) -> list[Result]:
            async with aiohttp.ClientSession() as s:
                return [await call(s, gw.url, chat_body(max_tokens=2)) for _ in range(n)]

        assert all(r.status == 200 for r in asyncio.run(run(2)))  # the gateway's pool holds a connection now
        sim_control(sim, drop_reused_next=6)
        results = asyncio.run(run(16))
        assert [(r.status, r.body) for r in results if r.status != 200] == []
        assert {r.attempts for r in results} == {1}
        assert sim_stats(sim)["dropped_reused"] == 6
        replica = _backends(gw)["r0"]
        assert replica["breaker"]["failures_in_window"] == 0 and replica["state"] == "ready"
        assert _metric(gw, "portcullis_upstream_fresh_connection_retries_total", replica="r0") == 6
    finally:
        gw.stop()
        sim.stop()


def test_requests_waiting_on_a_hung_replica_are_retried_once_probes_find_it_dead(
    tmp_path: Path, reaper: Callable[[Any], Any], fleet: _Sims | _Llamas
) -> None:
    """SIGSTOP one of two replicas while non-streamed requests wait on it (each answer takes about 3 s): its
    probes fail, it is marked down after `down_after` of them, and the requests waiting on it go to the other
    replica at once: every one is answered 200 as soon as the survivor's slots allow, not after `total_s` (the
    only limit a non-streamed answer has otherwise)."""
    deployments = [{"url": p.url, "name": f"r{i}"} for i, p in enumerate(fleet.procs)]
    cfg = gateway_config({"m": deployments}, tiers=TIERS, health={"interval_s": 0.3, "timeout_s": 0.5})
    gw = reaper(start_gateway(cfg, tmp_path, ready_path="/readyz"))
    hung = fleet.procs[0]
    try:

        async def run() -> list[Result]:
            async with aiohttp.ClientSession() as s:
                body = fleet.slow_body()
                tasks = [asyncio.create_task(call(s, gw.url, body, limit_s=40)) for _ in range(8)]
                await asyncio.to_thread(wait_until, lambda: _backends(gw)["r0"]["in_flight"] >= 2, timeout=10)
                hung.signal(signal.SIGSTOP)
                return list(await asyncio.gather(*tasks))

        results = asyncio.run(run())
        assert [(r.status, r.body) for r in results if r.status != 200] == []
        assert any(r.attempts == 2 for r in results)
        # Waiting out total_s would take 300 s; the retried requests wait only for the survivor's slots.
        assert max(r.latency for r in results) < 60.0
        assert _backends(gw)["r0"]["state"] == "down"
    finally:
        hung.signal(signal.SIGCONT)
        gw.stop()


# -- thousands of open streams ------------------------------------------------------------------


def test_1100_open_streams_never_mark_their_replica_down(tmp_path: Path, reaper: Callable[[Any], Any]) -> None:
    """1,100 streams open at once on one replica (a llama-server-like simulator with 1,200 slots): the
    probes have their own connections, so the replica stays ready with its breaker closed, and every
    stream completes. (Before: a 1,024-connection pool shared with the probes; the probe waited behind the
    streams, timed out, and the replica was marked down.)"""
    n = 1100
    sim = reaper(start_sim("--slots", "1200", "--tokens-per-s", "3", log_dir=tmp_path))
    cfg = gateway_config(
        {"m": [{"url": sim.url, "name": "r0"}]},
        tiers=TIERS,
        health={"interval_s": 0.5, "timeout_s": 1},
        server={"max_connections_per_client": 0},  # 1,100 streams from one address: lift the per-address cap
    )
    gw = reaper(start_gateway(cfg, tmp_path, ready_path="/readyz"))
    try:

        async def run() -> list[Result]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                body = chat_body(stream=True, max_tokens=15)  # 5 s each
                return list(await asyncio.gather(*(call(s, gw.url, body, limit_s=60) for _ in range(n))))

        watch = Watch(gw)
        try:
            results = asyncio.run(run())
        finally:
            seen = watch.stop()
        assert sum(r.stream_complete and r.stream_error is None for r in results) == n, [
            (r.status, r.body, r.stream_error) for r in results if not r.stream_complete
        ][:3]
        assert sim_stats(sim)["max_active"] >= 1000  # they really were open at once
        assert seen["r0"] == {("ready", "closed")}, seen["r0"]
    finally:
        gw.stop()
        sim.stop()


def test_waiting_for_a_pooled_connection_is_not_a_replica_failure(tmp_path: Path, reaper: Callable[[Any], Any]) -> None:
    """A backend without slot limits behind a pool of 4 connections: 16 streams at once, the pool wait
    limit 0.3 s. Those that find no connection in time get 503 upstream_pool_exhausted with Retry-After;
    the replica stays ready and its breaker counts nothing."""
    sim = reaper(start_sim("--slots", "64", "--tokens-per-s", "10", log_dir=tmp_path))
    deployment = {"url": sim.url, "name": "r0", "kind": "openai", "max_connections": 4}
    cfg = gateway_config(
        {"m": [deployment]},
        tiers=TIERS,
        resilience={"retries": 0, "breaker": {"failures": 2}},
        upstream={"timeouts": {"pool_s": 0.3}},
    )
    gw = reaper(start_gateway(cfg, tmp_path, ready_path="/readyz"))
    try:

        async def run() -> list[Result]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                body = chat_body(stream=True, max_tokens=10)
                return list(await asyncio.gather(*(call(s, gw.url, body) for _ in range(16))))

        results = asyncio.run(run())
        served = [r for r in results if r.status == 200]
        refused = [r for r in results if r.status == 503]
        assert len(served) >= 4 and refused and len(served) + len(refused) == 16
        assert all(r.stream_complete for r in served)
        assert {r.body["error"]["code"] for r in refused} == {"upstream_pool_exhausted"}
        assert all("retry-after" in r.headers for r in refused)
        replica = _backends(gw)["r0"]
        assert replica["state"] == "ready" and replica["breaker"]["state"] == "closed"
        assert replica["breaker"]["failures_in_window"] == 0
        assert _metric(gw, "portcullis_upstream_pool_timeouts_total", replica="r0") == len(refused)
    finally:
        gw.stop()
        sim.stop()


# -- error events inside streams ------------------------------------------------------------------


def test_error_events_in_streams_count_against_the_replica(tmp_path: Path, reaper: Callable[[Any], Any]) -> None:
    """A replica whose streams end with llama-server's `data: {"error": ...}` event after two tokens: each is
    a failure of the replica, and five open its breaker, so the next streams go to the healthy one. (Before:
    such streams counted as successes; 40 of them in 15 s never moved the breaker.)"""
    sims = [reaper(start_sim("--slots", "4", "--tokens-per-s", "100", log_dir=tmp_path)) for _ in range(2)]
    sim_control(sims[0], stream_error_rate=1.0)
    deployments = [{"url": s.url, "name": f"r{i}"} for i, s in enumerate(sims)]
    cfg = gateway_config({"m": deployments}, tiers=TIERS, resilience={"breaker": {"failures": 5, "open_s": 30}})
    gw = reaper(start_gateway(cfg, tmp_path, ready_path="/readyz"))
    try:

        async def run(n: int) -> list[Result]:
            async with aiohttp.ClientSession() as s:
                return [await call(s, gw.url, chat_body(stream=True, max_tokens=6)) for _ in range(n)]

        first = asyncio.run(run(20))
        failed = [r for r in first if r.stream_error is not None]
        assert failed and {r.stream_error["type"] for r in failed} == {"server_error"}
        assert _backends(gw)["r0"]["breaker"]["state"] == "open"
        later = asyncio.run(run(10))
        assert all(r.stream_complete and r.stream_error is None for r in later)  # all on the healthy one
    finally:
        gw.stop()
        for s in sims:
            s.stop()
