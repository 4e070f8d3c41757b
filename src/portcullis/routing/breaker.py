"""A circuit breaker per replica: closed → open → half-open → closed.

Closed: every request goes through; outcomes are counted in a rolling window of one-second buckets.
Enough failures (a count, or a rate over a minimum number of requests) open it. Open: the replica
receives nothing for `open_s`. Then half-open: at most `half_open_probes` requests at a time are let
through; `close_after` successes close it, one failure opens it again for another `open_s`.

The breaker is per process (like Envoy's outlier detection): each gateway learns from its own traffic,
and a replica's health never waits on a shared store. What counts as a failure is configured
(`resilience.breaker.count`); a client's 4xx never does.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from portcullis.config import BreakerConfig


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Called on every transition: (breaker, old state, new state, reason).
Listener = Callable[["Breaker", BreakerState, BreakerState, str], None]


class Breaker:
    __slots__ = (
        "_buckets",
        "clock",
        "config",
        "count_requests",
        "counts",
        "listener",
        "name",
        "open_until",
        "probes",
        "state",
        "successes",
    )

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        listener: Listener | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.clock = clock  # seconds, monotonic (tests step one by hand)
        self.config = config
        self.counts = frozenset(config.count)
        # Successes need counting only for a failure rate; without one, a success costs nothing.
        self.count_requests = config.failure_rate is not None
        self.state = BreakerState.CLOSED
        self.open_until = 0.0
        self.probes = 0  # half-open requests in flight
        self.successes = 0  # half-open successes so far
        # [second, requests, failures], oldest first, covering the last window_s seconds.
        self._buckets: deque[list[int]] = deque()
        self.listener = listener

    # -- asking ---------------------------------------------------------------------------------

    def allows(self, now: float | None = None) -> bool:
        """Would a request be let through now? (Does not claim a half-open probe.)"""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return (now if now is not None else self.clock()) >= self.open_until
        return self.probes < self.config.half_open_probes

    def capacity(self, slots: int) -> int:
        """How many requests at once this replica may take now, out of its `slots`."""
        state = self.state
        if state is BreakerState.CLOSED:
            return slots
        if state is BreakerState.OPEN and self.clock() < self.open_until:
            return 0
        return min(slots, self.config.half_open_probes)

    def retry_in(self, now: float | None = None) -> float:
        """Seconds until the breaker lets a request through again (0 when it does now)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.open_until - (now if now is not None else self.clock()))

    # -- a request's life -------------------------------------------------------------------------

    def acquire(self) -> bool:
        """A request is sent to the replica. True if it is a half-open probe (pass it back to record)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN, f"open for {self.config.open_s:g} s")
        self.probes += 1
        return True

    def record(self, ok: bool | None, kind: str | None = None, *, probe: bool = False) -> None:
        """The outcome of a request: ok, failed (`kind`: connect, timeout, 5xx, 429), or None (no verdict:
        the client went away, or the failure is of a kind this breaker does not count)."""
        if probe:
            self.probes = max(0, self.probes - 1)
        failed = ok is False and kind in self.counts
        if ok is False and not failed:
            ok = None
        state = self.state
        if state is BreakerState.HALF_OPEN:
            if not probe or ok is None:
                return
            if failed:
                self._open(f"a half-open probe failed ({kind})")
                return
            self.successes += 1
            if self.successes >= self.config.close_after:
                self._buckets.clear()
                self._move(BreakerState.CLOSED, f"{self.successes} half-open probe(s) succeeded")
            return
        if state is BreakerState.OPEN or ok is None or (ok and not self.count_requests):
            return
        second = int(self.clock())
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
        else:
            bucket = [second, 0, 0]
            buckets.append(bucket)
            horizon = second - self.config.window_s
            while buckets[0][0] <= horizon:
                buckets.popleft()
        bucket[1] += 1
        if failed:
            bucket[2] += 1
            self._check_trip(kind)

    def window(self) -> tuple[int, int]:
        """(requests, failures) counted in the rolling window (requests: failures only, unless a
        failure rate is configured)."""
        horizon = int(self.clock()) - self.config.window_s
        requests = failures = 0
        for second, n, f in self._buckets:
            if second > horizon:
                requests += n
                failures += f
        return requests, failures

    # -- transitions ------------------------------------------------------------------------------

    def _check_trip(self, kind: str | None) -> None:
        requests, failures = self.window()
        c = self.config
        if failures >= c.failures:
            self._open(f"{failures} failures in {c.window_s:g} s (last: {kind})")
        elif c.failure_rate is not None and requests >= c.min_requests and failures / requests >= c.failure_rate:
            self._open(f"{failures} of {requests} requests failed in {c.window_s:g} s (last: {kind})")

    def _open(self, reason: str) -> None:
        self.open_until = self.clock() + self.config.open_s
        self.successes = 0
        self._move(BreakerState.OPEN, reason)

    def _move(self, state: BreakerState, reason: str) -> None:
        old, self.state = self.state, state
        if state is not BreakerState.HALF_OPEN:
            self.successes = 0
        if old is not state and self.listener is not None:
            self.listener(self, old, state, reason)
