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
    """Counts requests and retries in one-second buckets over `window_s`; a retry is allowed while
    retries < ratio * requests + min_per_s * window_s."""

    __slots__ = ("_buckets", "config", "denied")

    def __init__(self, config: RetryBudgetConfig) -> None:
        self.config = config
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries]
        self.denied = 0

    def _bucket(self) -> list[int]:
        second = int(time.monotonic())
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            return buckets[-1]
        bucket = [second, 0, 0]
        buckets.append(bucket)
        horizon = second - self.config.window_s
        while buckets[0][0] <= horizon:
            buckets.popleft()
        return bucket

    def request(self) -> None:
        self._bucket()[1] += 1

    def try_retry(self) -> bool:
        bucket = self._bucket()
        requests = retries = 0
        for _, n, r in self._buckets:
            requests += n
            retries += r
        c = self.config
        if retries >= c.ratio * requests + c.min_per_s * c.window_s:
            self.denied += 1
            return False
        bucket[2] += 1
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
