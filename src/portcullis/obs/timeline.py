"""The dashboard's time series: requests/s, server errors/s and latency percentiles, every two seconds.

Read from the request metrics the gateway keeps anyway (obs/metrics.py): counts and histogram buckets are
differenced between samples, so the hot path pays nothing for the dashboard. Percentiles are interpolated
within the histogram's buckets (as Prometheus's histogram_quantile does). Kept for the last ten minutes.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from portcullis.obs.metrics import LATENCY_BUCKETS, Metrics

_QUANTILES = (0.5, 0.95, 0.99)


class Timeline:
    def __init__(self, metrics: Metrics, interval_s: float = 2.0, keep: int = 300) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.samples: collections.deque[tuple[float, float, float, tuple[float | None, ...]]] = collections.deque(
            maxlen=keep
        )
        self._last: tuple[float, float, float, list[int]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            self.sample(time.time())
            await asyncio.sleep(self.interval_s)

    def _totals(self) -> tuple[float, float, list[int]]:
        requests = errors = 0.0
        for (_route, _model, status), count in list(self.metrics.requests.items()):
            requests += count
            if status.startswith("5"):
                errors += count
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        for histogram in list(self.metrics.latency.values()):
            for i, count in enumerate(histogram.counts):
                buckets[i] += count
        return requests, errors, buckets

    def sample(self, now: float) -> None:
        requests, errors, buckets = self._totals()
        last = self._last
        self._last = (now, requests, errors, buckets)
        if last is None:
            return
        elapsed = max(now - last[0], 1e-9)
        delta = [b - a for a, b in zip(last[3], buckets, strict=True)]
        quantiles = tuple(quantile(delta, q) for q in _QUANTILES)
        self.samples.append(((requests - last[1]) / elapsed, (errors - last[2]) / elapsed, now, quantiles))

    def series(self) -> dict[str, Any]:
        return {
            "t": [round(s[2], 3) for s in self.samples],
            "rps": [round(s[0], 3) for s in self.samples],
            "errors": [round(s[1], 3) for s in self.samples],
            **{
                f"p{round(q * 100)}": [
                    None if (seconds := s[3][i]) is None else round(seconds * 1000, 2) for s in self.samples
                ]
                for i, q in enumerate(_QUANTILES)
            },
        }


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (seconds) of one interval's bucket counts (not cumulative; the last is +Inf)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
            if i >= len(LATENCY_BUCKETS):  # beyond the last bound: all we know is "more than"
                return LATENCY_BUCKETS[-1]
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]
