"""Retries, timeouts, failover, degradation and admission, each seen from a client over HTTP.

Faults are injected deterministically at the simulator (`fail_next` answers the next N requests with
a chosen status and Retry-After), so every count below is exact.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
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
    "backoff": {"base_s": 0.05, "max_s": 1.0},
    "breaker": {"failures": 50, "window_s": 10, "open_s": 1},
    "retry_budget": {"ratio": 0.5, "window_s": 10, "min_per_s": 1},
}
TIERS = {"free": {"priority": 0}, "premium": {"priority": 1}}


def one(gw: Proc, body: dict[str, Any], key: str = ADMIN_KEY) -> Result:
    async def run() -> Result:
        async with aiohttp.ClientSession() as s:
            return await call(s, gw.url, body, key=key)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[list[Proc]]:
    procs = [start_sim("--slots", "4", "--tokens-per-s", "200", log_dir=module_tmp) for _ in range(2)]
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def gw(sims: list[Proc], module_tmp: Path) -> Iterator[Proc]:
    """Model `m` on sims[0] only, falling back to `backup` on sims[1]; `solo` on sims[0] with no fallback;
    `slowstart` with short first-token and idle limits."""
    cfg = gateway_config(
        {"m": [{"url": sims[0].url, "name": "a"}], "backup": [{"url": sims[1].url, "name": "b"}]},
        resilience=RESILIENCE,
        tiers=TIERS,
    )
    cfg["models"]["m"]["fallbacks"] = ["backup"]
    cfg["models"]["solo"] = {"deployments": [{"url": sims[0].url, "name": "a"}]}
    cfg["models"]["cooled"] = {"deployments": [{"url": sims[0].url, "name": "a"}]}  # its replica cools down 30 s
    cfg["models"]["slowstart"] = {
        "deployments": [{"url": sims[1].url, "name": "b"}],
        "timeouts": {"ttft_s": 0.3, "idle_s": 0.3},
    }
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _reset(sims: list[Proc]) -> None:
    for s in sims:
        sim_control(s, fail_next=0, fail_retry_after=None, tokens_per_s=200, ttft_ms=0, drop_rate=0)


def test_a_503_is_retried_on_the_fallback_which_answers_under_its_own_name(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[0], fail_next=1, fail_status=503)
    before = [sim_stats(s)["requests"] for s in sims]
    r = one(gw, chat_body(model="m"))
    assert r.status == 200 and r.attempts == 2
    assert r.body["model"] == "backup"  # the fallback served it, and says so
    after = [sim_stats(s)["requests"] for s in sims]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_statuses_are_retried_on_the_same_replica_when_it_is_the_only_one(
    gw: Proc, sims: list[Proc], status: int
) -> None:
    sim_control(sims[0], fail_next=2, fail_status=status)
    before = sim_stats(sims[0])["requests"]
    r = one(gw, chat_body(model="solo"))
    assert r.status == 200 and r.attempts == 3
    assert sim_stats(sims[0])["requests"] - before == 3


def test_a_500_or_a_client_error_is_not_retried(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[0], fail_next=1, fail_status=500)
    r = one(gw, chat_body(model="solo"))
    assert r.status == 500 and r.attempts == 1
    sim_control(sims[0], fail_next=1, fail_status=400)
    r = one(gw, chat_body(model="solo"))
    assert r.status == 400 and r.attempts == 1


def test_attempts_stop_at_the_configured_number(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[0], fail_next=10, fail_status=503)
    before = sim_stats(sims[0])["requests"]
    r = one(gw, chat_body(model="solo"))
    assert r.status == 503 and r.attempts == 3
    assert sim_stats(sims[0])["requests"] - before == 3


def test_an_upstream_429_is_retried_after_its_retry_after(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[0], fail_next=1, fail_status=429, fail_retry_after=0.6)
    started = time.monotonic()
    r = one(gw, chat_body(model="solo"))
    assert r.status == 200 and r.attempts == 2
    assert time.monotonic() - started >= 0.6


def test_an_upstream_429_longer_than_the_backoff_cap_goes_back_to_the_client(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[0], fail_next=1, fail_status=429, fail_retry_after=30)
    r = one(gw, chat_body(model="cooled"))
    assert r.status == 429 and r.attempts == 1
    assert r.headers["retry-after"] == "30"
    assert r.body["error"]["type"] == "rate_limit_error"
    sim_control(sims[0], fail_next=0)
    # The replica cools down for those 30 s: the model has nothing else, so it says when to come back.
    r = one(gw, chat_body(model="cooled"))
    assert r.status == 503 and 25 <= int(r.headers["retry-after"]) <= 30


def test_a_stream_is_never_retried_once_it_has_started(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[0], drop_rate=1.0, fault_after_tokens=2)
    before = sim_stats(sims[0])["requests"]
    r = one(gw, chat_body(model="solo", stream=True, max_tokens=8))
    assert r.status == 200 and r.attempts == 1
    assert r.stream_error is not None and r.stream_error["code"] == "upstream_stream_truncated"
    assert sim_stats(sims[0])["requests"] - before == 1


def test_stream_idle_timeout_ends_the_stream_and_cancels_the_upstream(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[1], tokens_per_s=1.0)  # the role chunk at once, then one token a second
    before = sim_stats(sims[1])["cancelled"]
    started = time.monotonic()
    r = one(gw, chat_body(model="slowstart", stream=True, max_tokens=5))
    assert time.monotonic() - started < 2.0
    assert r.status == 200 and not r.stream_complete
    assert r.stream_error is not None and r.stream_error["code"] == "upstream_timeout"
    assert "sent nothing for 0.3 s" in r.stream_error["message"]
    wait_until(lambda: sim_stats(sims[1])["cancelled"] == before + 1, timeout=5, what="the upstream to be cancelled")


def test_time_to_first_token_timeout_is_a_clear_504(gw: Proc, sims: list[Proc]) -> None:
    sim_control(sims[1], ttft_ms=2000)
    started = time.monotonic()
    r = one(gw, chat_body(model="slowstart", stream=True))
    elapsed = time.monotonic() - started
    assert r.status == 504 and r.body["error"]["code"] == "upstream_timeout"
    assert "did not start answering within 0.3 s" in r.body["error"]["message"]
    assert r.attempts == 3 and elapsed < 2.0  # every attempt timed out before its first event


def test_admin_backends_shows_breakers_and_needs_admin_read(gw: Proc, sims: list[Proc]) -> None:
    status, raw = http_get(gw.url + "/admin/backends")
    assert status == 200
    models = {m["model"]: m for m in orjson.loads(raw)["data"]}
    m = models["m"]
    assert m["fallbacks"] == ["backup"] and m["slots"]["capacity"] == 4
    replica = m["replicas"][0]
    assert replica["state"] == "ready" and replica["slots"] == 4
    assert set(replica["breaker"]) == {
        "state",
        "requests_in_window",
        "failures_in_window",
        "retry_in_s",
        "half_open_probes_in_flight",
    }
    status, raw = http_post(gw.url + "/admin/keys", {"user": "plain", "tier": "free"})
    plain = orjson.loads(raw)["key"]
    status, raw = http_get(gw.url + "/admin/backends", headers={"authorization": f"Bearer {plain}"})
    assert status == 403
    _, metrics = http_get(gw.url + "/metrics")
    for name in (
        "portcullis_breaker_state",
        "portcullis_queue_depth",
        "portcullis_slots_capacity",
        "portcullis_retries_total",
    ):
        assert name.encode() in metrics


def test_breaker_opens_takes_the_model_out_of_readyz_and_recovers(tmp_path: Path) -> None:
    sim = start_sim("--slots", "2", log_dir=tmp_path)
    cfg = gateway_config(
        {"m": [{"url": sim.url, "name": "a"}]},
        resilience={"retries": 0, "breaker": {"failures": 2, "window_s": 10, "open_s": 1.0}},
        health={"interval_s": 0.1, "timeout_s": 1},
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        sim_control(sim, fail_next=2, fail_status=502)
        assert [one(gw, chat_body()).status for _ in range(2)] == [502, 502]
        r = one(gw, chat_body())
        assert r.status == 503 and r.body["error"]["code"] == "no_ready_replica"
        assert r.headers["retry-after"] == "1"
        assert http_get(gw.url + "/readyz")[0] == 503
        wait_until(lambda: one(gw, chat_body()).status == 200, timeout=5, what="the half-open probe to close it")
        assert http_get(gw.url + "/readyz")[0] == 200
        wait_until(
            lambda: all(f'"new":"{state}"' in gw.log() for state in ("open", "half_open", "closed")),
            what="the breaker's transitions in the log",
        )
    finally:
        gw.stop()
        sim.stop()


def test_reject_mode_answers_503_with_retry_after_at_once(tmp_path: Path) -> None:
    sim = start_sim("--slots", "1", "--tokens-per-s", "20", log_dir=tmp_path)
    cfg = gateway_config({"m": [sim.url]}, admission={"when_full": "reject"})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        results = asyncio.run(open_loop(gw.url, [(chat_body(max_tokens=10), ADMIN_KEY)] * 4, rate=100))
        assert sorted(r.status for r in results) == [200, 503, 503, 503]
        for r in results:
            if r.status == 503:
                assert r.body["error"]["code"] == "overloaded" and r.latency < 0.3
                assert int(r.headers["retry-after-ms"]) > 0
        assert sim_stats(sim)["max_waiting"] == 0
    finally:
        gw.stop()
        sim.stop()


def _raw_request(url: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a raw socket and leave it waiting (closing the socket is a client disconnect)."""
    host, port = url.removeprefix("http://").split(":")
    data = orjson.dumps(body)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {ADMIN_KEY}\r\ncontent-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _backend(gw: Proc, model: str = "m") -> dict[str, Any]:
    """The model's entry in GET /admin/backends: its slots, queue and degradation as the gateway sees them."""
    return next(m for m in orjson.loads(http_get(gw.url + "/admin/backends")[1])["data"] if m["model"] == model)


def _depth(gw: Proc) -> int:
    return _backend(gw)["queue"]["depth"]


def test_a_client_that_disconnects_leaves_the_queue_at_once(tmp_path: Path) -> None:
    sim = start_sim("--slots", "1", "--tokens-per-s", "10", log_dir=tmp_path)
    gw = start_gateway(gateway_config({"m": [sim.url]}), tmp_path, ready_path="/readyz")
    try:
        socks = [_raw_request(gw.url, chat_body(max_tokens=20))]  # holds the slot for ~2 s
        wait_until(lambda: sim_stats(sim)["active"] == 1, what="the first request to run")
        socks += [_raw_request(gw.url, chat_body(max_tokens=2)) for _ in range(3)]
        wait_until(lambda: _depth(gw) == 3, what="three queued")
        socks.pop().close()
        wait_until(lambda: _depth(gw) == 2, timeout=1, what="the queue to lose the client that left")
        for s in socks[1:]:
            s.close()
        wait_until(lambda: _depth(gw) == 0, timeout=1, what="the queue to empty")
        # Then the running request's client leaves: once the replica has seen it cancelled and the gateway has
        # given its slot back, a queued request still alive would have been handed that slot (and sent). (Closed
        # last: a queued client that left a moment after the slot came free could be sent before its close is read.)
        socks[0].close()
        wait_until(
            lambda: sim_stats(sim)["cancelled"] == 1 and _backend(gw)["slots"]["in_use"] == 0,
            timeout=5,
            what="the running request to be cancelled and its slot freed",
        )
        assert sim_stats(sim)["requests"] == 1  # none of the queued ones ever reached the replica
    finally:
        gw.stop()
        sim.stop()


def test_sigterm_answers_queued_requests_at_once_and_drains_the_running_one(tmp_path: Path) -> None:
    """Queued requests are answered 503 server_shutting_down at SIGTERM, and so is one that arrives during the
    drain's grace and finds every slot busy (it was told `overloaded` before: a reason to wait, not to go to
    another instance)."""
    sim = start_sim("--slots", "1", "--tokens-per-s", "10", log_dir=tmp_path)
    cfg = gateway_config({"m": [sim.url]})
    cfg["server"].update({"drain_grace_s": 1.0, "shutdown_timeout_s": 10})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:

        async def run() -> list[Result]:
            async with aiohttp.ClientSession() as s:
                running = asyncio.create_task(call(s, gw.url, chat_body(max_tokens=15)))
                await asyncio.to_thread(wait_until, lambda: sim_stats(sim)["active"] == 1)
                queued = [asyncio.create_task(call(s, gw.url, chat_body(max_tokens=2))) for _ in range(3)]
                await asyncio.to_thread(wait_until, lambda: _depth(gw) == 3)
                gw.signal(signal.SIGTERM)
                await asyncio.to_thread(wait_until, lambda: http_get(gw.url + "/readyz")[0] == 503)
                late = await call(s, gw.url, chat_body(max_tokens=2))  # within the grace: still accepted
                return [await running, *await asyncio.gather(*queued), late]

        running, *queued = asyncio.run(run())
        assert running.status == 200 and running.latency > 1.0
        for r in queued:
            assert r.status == 503 and r.body["error"]["code"] == "server_shutting_down"
            assert "retry-after" in r.headers and r.latency < running.latency
        assert gw.wait(15) == 0
    finally:
        gw.stop()
        sim.stop()


def test_degradation_caps_max_tokens_and_moves_chosen_tiers_to_a_cheaper_model(tmp_path: Path) -> None:
    slow = start_sim("--slots", "4", "--ttft-ms", "300", log_dir=tmp_path)
    cheap = start_sim("--slots", "4", log_dir=tmp_path)
    cfg = gateway_config(
        {"big": [{"url": slow.url, "name": "slow"}], "small": [{"url": cheap.url, "name": "cheap"}]},
        tiers=TIERS,
        admission={
            "degrade": {
                "ttft_p95_s": 0.2,
                "window_s": 30,
                "min_samples": 5,
                "max_tokens": 3,
                "model": "small",
                "tiers": ["free"],
            }
        },
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        _, raw = http_post(gw.url + "/admin/keys", {"user": "f", "tier": "free"})
        free = orjson.loads(raw)["key"]
        before = one(gw, chat_body(model="big", max_tokens=20), key=free)
        assert before.status == 200 and "x-portcullis-degraded" not in before.headers
        for _ in range(5):  # stream samples of the big model's time to first token (~0.3 s)
            assert one(gw, chat_body(model="big", stream=True, max_tokens=2)).stream_complete
        # The p95 is re-evaluated at most once a second: wait until the gateway judges the big model slow.
        wait_until(lambda: _backend(gw, "big")["degraded"], timeout=5, what="the big model to be judged slow")
        served_before = sim_stats(cheap)["requests"]
        r = one(gw, chat_body(model="big", max_tokens=20), key=free)
        assert r.status == 200
        assert r.headers["x-portcullis-degraded"] == "max_tokens=3, model=small"
        assert r.body["model"] == "small" and r.body["usage"]["completion_tokens"] <= 3
        assert sim_stats(cheap)["requests"] == served_before + 1
        premium = one(gw, chat_body(model="big", max_tokens=20))  # the admin key's tier is not degraded
        assert "x-portcullis-degraded" not in premium.headers and premium.body["model"] == "big"
        _, metrics = http_get(gw.url + "/metrics")
        assert b'portcullis_degradations_total{action="model",model="big"} 1.0' in metrics
    finally:
        gw.stop()
        slow.stop()
        cheap.stop()
