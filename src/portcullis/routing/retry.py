"""Retries: which failures may be retried, how long to wait, and a budget that prevents retry storms.

A failure is retryable only if nothing has reached the client yet and it says nothing about the
request itself: a connection that could not be made or broke before an answer, a timeout before the
first event, 502/503/504, or the upstream's 429 (after its Retry-After). Backoff is exponential with
full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): uniform in [0, min(cap, base·2ⁿ)],
so retrying clients do not synchronise. The budget (after Envoy's retry budgets, and gRPC's retry
throttling) keeps retries below a fraction of a model's requests: when every replica fails, the
upstreams see at most (1 + ratio) times the offered load, not (1 + retries) times.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from portcullis.config import BackoffConfig, RetryBudgetConfig
from portcullis.errors import GatewayError

RETRYABLE_STATUS = frozenset({502, 503, 504})


@dataclass(slots=True)
class AttemptFailed(Exception):
    """One attempt failed before anything reached the client.

    `kind` is what the breaker counts (connect, timeout, 5xx, 429; None for the client's 4xx),
    `retryable` whether another attempt may help, `retry_after` the upstream's own wait (429/503).
    """

    error: GatewayError
    kind: str | None
    retryable: bool
    retry_after: float | None = None


def backoff_delay(config: BackoffConfig, retry: int) -> float:
    """The wait before retry number `retry` (1 = the first retry)."""
    ceiling = min(config.max_s, config.base_s * (2 ** (retry - 1)))
    return random.uniform(0.0, ceiling) if config.jitter == "full" else ceiling


class RetryBudget:
    """A retry is allowed while retries < ratio * requests + min_per_s * window_s, both counted over the
    last `window_s` seconds.

    Counting a request is one integer increment (it happens on every request); the window comes from
    snapshots of the running totals that `mark()` takes once a second (Admission's ticker), so only a
    retry does arithmetic over it.
    """

    __slots__ = ("_marks", "clock", "config", "denied", "requests", "retries")

    def __init__(self, config: RetryBudgetConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock  # seconds, monotonic (tests step one by hand)
        self.requests = 0
        self.retries = 0
        self.denied = 0
        self._marks: deque[tuple[float, int, int]] = deque()  # (monotonic time, requests, retries)

    def request(self) -> None:
        self.requests += 1

    def mark(self) -> None:
        now = self.clock()
        marks = self._marks
        marks.append((now, self.requests, self.retries))
        horizon = now - self.config.window_s
        while len(marks) > 1 and marks[1][0] <= horizon:
            marks.popleft()  # marks[0] stays the last snapshot at or before the window's start

    def try_retry(self) -> bool:
        base_requests = base_retries = 0
        marks = self._marks
        if marks and marks[0][0] <= self.clock() - self.config.window_s:
            _, base_requests, base_retries = marks[0]
        c = self.config
        if self.retries - base_retries >= c.ratio * (self.requests - base_requests) + c.min_per_s * c.window_s:
            self.denied += 1
            return False
        self.retries += 1
        return True


def retry_after_of(value: str | None) -> float | None:
    """A Retry-After header in seconds (HTTP dates are not worth parsing for an upstream)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
