"""The breaker's state machine, the retry budget, backoff bounds and the admission queue's order.

These run in process with the clock stepped by hand (a Clock given to the breaker and the budget), so
every transition is asserted exactly, without sleeping.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from portcullis.config import BackoffConfig, BreakerConfig, RetryBudgetConfig, build_config
from portcullis.obs.metrics import Metrics
from portcullis.routing.admission import Gate, _Waiter
from portcullis.routing.breaker import Breaker, BreakerState
from portcullis.routing.catalog import Catalog, Replica, ReplicaState
from portcullis.routing.retry import RetryBudget, backoff_delay


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _breaker(clock: Clock, **settings: object) -> tuple[Breaker, list[tuple[str, str]]]:
    moves: list[tuple[str, str]] = []
    b = Breaker(
        "m/r", BreakerConfig(**settings), lambda _b, old, new, _why: moves.append((old.value, new.value)), clock=clock
    )
    return b, moves


def test_opens_after_n_failures_in_the_window_and_not_for_old_ones(clock: Clock) -> None:
    b, moves = _breaker(clock, failures=3, window_s=10, open_s=5)
    b.record(False, "5xx")
    b.record(False, "5xx")
    clock.now += 11  # those two fall out of the window
    b.record(False, "5xx")
    b.record(True)
    b.record(False, "timeout")
    assert b.state is BreakerState.CLOSED
    b.record(False, "connect")
    assert b.state is BreakerState.OPEN and moves == [("closed", "open")]
    assert not b.allows() and b.capacity(4) == 0
    assert b.retry_in() == pytest.approx(5.0)


def test_client_errors_and_uncounted_kinds_never_open_it(clock: Clock) -> None:
    b, _ = _breaker(clock, failures=2, count=["connect"])
    for _ in range(10):
        b.record(False, None)  # a client 4xx
        b.record(False, "5xx")  # not counted by this configuration
        b.record(None)
    assert b.state is BreakerState.CLOSED
    assert b.window() == (0, 0)


def test_failure_rate_needs_min_requests(clock: Clock) -> None:
    b, _ = _breaker(clock, failures=100, failure_rate=0.5, min_requests=10)
    for _ in range(4):
        b.record(False, "5xx")  # 4 of 4 failed, but fewer than min_requests
    assert b.state is BreakerState.CLOSED
    for _ in range(5):
        b.record(True)
    b.record(False, "5xx")  # 5 of 10
    assert b.state is BreakerState.OPEN


def test_half_open_admits_probes_closes_after_successes_reopens_on_failure(clock: Clock) -> None:
    b, moves = _breaker(clock, failures=1, open_s=5, half_open_probes=2, close_after=2)
    b.record(False, "5xx")
    clock.now += 5
    assert b.allows() and b.capacity(8) == 2
    assert b.acquire() is True and b.state is BreakerState.HALF_OPEN
    assert b.acquire() is True
    assert not b.allows()  # both probes out
    b.record(True, probe=True)
    assert b.state is BreakerState.HALF_OPEN and b.allows()
    b.record(True, probe=True)
    assert b.state is BreakerState.CLOSED
    b.record(False, "timeout")
    clock.now += 5
    probe = b.acquire()
    b.record(False, "timeout", probe=probe)
    assert b.state is BreakerState.OPEN and b.retry_in() == pytest.approx(5.0)
    assert moves == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
    ]


def test_a_probe_without_verdict_frees_its_place(clock: Clock) -> None:
    b, _ = _breaker(clock, failures=1, open_s=1, half_open_probes=1)
    b.record(False, "5xx")
    clock.now += 1
    probe = b.acquire()
    assert not b.allows()
    b.record(None, probe=probe)  # the client went away
    assert b.allows() and b.state is BreakerState.HALF_OPEN


def test_retry_budget_bounds_retries_to_a_fraction_of_requests(clock: Clock) -> None:
    budget = RetryBudget(RetryBudgetConfig(ratio=0.2, window_s=10, min_per_s=0), clock=clock)
    budget.mark()
    granted = 0
    for _ in range(100):
        budget.request()
        granted += budget.try_retry()
    assert granted == 20
    for _ in range(11):  # the ticker's snapshots, one a second: those 100 requests leave the window
        clock.now += 1
        budget.mark()
    budget.request()
    assert budget.try_retry() is True  # 0 retries < 0.2 * 1
    assert budget.try_retry() is False  # 1 retry is not < 0.2 * 1
    for _ in range(5):
        budget.request()
    assert budget.try_retry() is True  # 1 < 0.2 * 6
    assert budget.denied == 80 + 1  # the 80 refused in the first burst, and one since


def test_retry_budget_floor_lets_a_quiet_model_retry(clock: Clock) -> None:
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, window_s=10, min_per_s=0.3), clock=clock)
    budget.request()
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]


def test_full_jitter_backoff_stays_within_its_cap() -> None:
    random.seed(7)
    config = BackoffConfig(base_s=0.1, max_s=1.0)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (9, 1.0)):
        delays = [backoff_delay(config, retry) for _ in range(500)]
        assert 0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > ceiling * 0.9 and min(delays) < ceiling * 0.1  # spread over the whole range
    assert backoff_delay(BackoffConfig(base_s=0.1, max_s=1.0, jitter="none"), 3) == pytest.approx(0.4)


def _gate(slots: int) -> Gate:
    config = build_config({"models": {"m": {"deployments": [{"url": "http://127.0.0.1:9"}]}}}, source="test")
    replica = Replica(model="m", name="r", url="http://r", kind="llama_cpp", upstream_model=None, weight=1)
    replica.state, replica.slots = ReplicaState.READY, slots
    return Gate("m", [replica], config, Metrics(Catalog({"m": [replica]})))


def test_queue_serves_higher_tiers_first_and_rotates_between_keys_of_a_tier() -> None:
    async def run() -> list[str]:
        gate = _gate(slots=1)
        gate.holding = 1  # the only slot is taken
        loop = asyncio.get_running_loop()
        order: list[str] = []
        arrivals = [(0, "heavy")] * 4 + [(0, "light"), (1, "vip"), (0, "other"), (1, "vip")]
        for i, (priority, key) in enumerate(arrivals):
            waiter = _Waiter(loop.create_future(), priority, key)
            waiter.fut.add_done_callback(lambda _f, name=f"{key}{i}": order.append(name))
            gate.enqueue(waiter)
        assert gate.depth == 8 and gate.ahead_of(1) == 2 and gate.ahead_of(0) == 8
        for _ in range(8):
            gate.release(0.1)  # one finishes; its slot goes to the next waiter
            await asyncio.sleep(0)
        return order

    order = asyncio.run(run())
    assert order == ["vip5", "vip7", "heavy0", "light4", "other6", "heavy1", "heavy2", "heavy3"]


def test_a_waiter_that_left_is_skipped_and_its_slot_goes_on() -> None:
    async def run() -> None:
        gate = _gate(slots=1)
        gate.holding = 1
        loop = asyncio.get_running_loop()
        gone, staying = _Waiter(loop.create_future(), 0, "a"), _Waiter(loop.create_future(), 0, "b")
        gate.enqueue(gone)
        gate.enqueue(staying)
        gate.remove(gone)  # the client disconnected
        assert gate.depth == 1
        gate.release(0.2)
        assert staying.fut.done() and gate.holding == 1 and gate.depth == 0

    asyncio.run(run())


def test_wait_estimate_follows_the_observed_service_time() -> None:
    gate = _gate(slots=4)
    for _ in range(50):
        gate.holding += 1
        gate.release(0.5)
    assert gate.service_s == pytest.approx(0.5)
    assert gate.estimate_wait(8) == pytest.approx(8 * 0.5 / 4)


def test_a_wait_that_runs_out_as_it_is_granted_keeps_the_slot_and_leaks_nothing() -> None:
    """The queue timeout and the grant can land in the same loop iteration; the slot must be used
    (or given back), never lost. The wait is given a deadline that runs out right after the grant."""
    from types import SimpleNamespace

    from portcullis.routing.admission import Admission

    gate = _gate(slots=1)
    gate.holding = 1

    class RunsOutAfterGrant:
        def __init__(self, _delay: float) -> None:
            pass

        async def __aenter__(self) -> None:
            asyncio.get_running_loop().call_soon(gate.release, 0.1)  # the holder finishes: our turn

        async def __aexit__(self, *exc: object) -> None:
            raise TimeoutError  # ... and the wait runs out in the same instant

    config = build_config({"models": {"m": {"deployments": [{"url": "http://127.0.0.1:9"}]}}}, source="test")
    adm = Admission.__new__(Admission)
    adm.settings, adm.metrics = config.admission, gate.metrics
    req = SimpleNamespace(wait_disconnect=lambda: asyncio.sleep(3600), response_headers=[])
    ex = SimpleNamespace(principal=None, queue_s=0.0, watch_disconnect=lambda _w: None)

    async def run() -> None:
        await adm.wait(req, ex, gate, 0, deadline=RunsOutAfterGrant)  # type: ignore[arg-type]

    asyncio.run(run())
    assert gate.holding == 1 and gate.depth == 0  # ours now; release it and nothing is left over
    gate.release(None)
    assert gate.holding == 0


# -- health probes: hysteresis ---------------------------------------------------------------------


def _probed(replica: Replica, results: list[ReplicaState], **health: int) -> list[ReplicaState]:
    """The replica's state after each probe result (the prober's rule, without the network)."""
    from portcullis.config import HealthConfig
    from portcullis.upstream.probe import _with_hysteresis

    config = HealthConfig(**health)
    states = []
    for seen in results:
        replica.state = _with_hysteresis(replica, seen, config)
        states.append(replica.state)
    return states


def test_a_ready_replica_is_marked_down_only_after_down_after_failed_probes_in_a_row() -> None:
    R, D = ReplicaState.READY, ReplicaState.DOWN
    replica = Replica("m", "r", "http://x", "llama_cpp", None, 1)
    assert _probed(replica, [R, D, D, R, D, D, D, D], down_after=3, up_after=2) == [R, R, R, R, R, R, D, D]


def test_a_down_replica_comes_back_after_up_after_good_probes_and_loading_applies_at_once() -> None:
    R, D, W = ReplicaState.READY, ReplicaState.DOWN, ReplicaState.WARMING
    replica = Replica("m", "r", "http://x", "llama_cpp", None, 1)
    # The first probe decides at once (the state was unknown); a 503 "Loading model" is an answer.
    assert _probed(replica, [D, R, D, R, R, W, R], down_after=3, up_after=2) == [D, D, D, D, R, W, R]


def test_a_refused_connection_marks_down_at_once_and_probes_must_see_it_back_up_after_times() -> None:
    R = ReplicaState.READY
    replica = Replica("m", "r", "http://x", "llama_cpp", None, 1)
    _probed(replica, [R] * 5)
    replica.mark_down("connect failed")
    assert _probed(replica, [R, R], up_after=2) == [ReplicaState.DOWN, R]


def test_what_a_streams_error_event_says_about_the_replica() -> None:
    from portcullis.upstream.relay import replica_fault

    assert replica_fault(b'{"error": {"code": 500, "message": "decode failed", "type": "server_error"}}') == "5xx"
    assert replica_fault(b'{"error": {"message": "boom"}}') == "5xx"
    assert replica_fault(b"not json") == "5xx"
    assert replica_fault(b'{"error": {"code": 400, "type": "exceed_context_size_error", "message": "x"}}') is None
    assert replica_fault(b'{"error": {"code": 400, "type": "invalid_request_error", "message": "x"}}') is None
    assert replica_fault(b'{"error": {"code": "context_length_exceeded", "message": "x"}}') is None
    # A native stream's own error events: the Responses API's (code beside the type, or in the failed response)
    # and the Messages API's.
    assert replica_fault(b'{"type": "error", "code": "context_length_exceeded", "message": "x"}') is None
    assert replica_fault(b'{"type": "error", "code": "server_error", "message": "x"}') == "5xx"
    failed = b'{"type": "response.failed", "response": {"error": {"code": "%s", "message": "x"}}}'
    assert replica_fault(failed % b"invalid_request_error") is None
    assert replica_fault(failed % b"server_error") == "5xx"
    assert replica_fault(b'{"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}') is None
    assert replica_fault(b'{"type": "error", "error": {"type": "overloaded_error", "message": "x"}}') == "5xx"
