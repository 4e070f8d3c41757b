"""The sliding-window counter, in Python. `admit.lua` is the same algorithm for Redis, line for line.

A window of T seconds keeps two counts: the current fixed bucket (`c`, bucket index `b = floor(now/T)`)
and the one before it (`p`). The estimate of use over the last T seconds weighs the previous bucket by
how much of it still overlaps: `p * (1 - frac) + c`, where `frac` is how far we are into the current
bucket. A request costing `cost` is admitted when `estimate + cost <= limit`.

Unlike a fixed window, a burst at a bucket boundary cannot double the rate; unlike a log of
timestamps, the state is three integers. The estimate never rises without new admissions, so the
time until a refused request would be admitted is exact (`wait`): the moment the previous bucket's
weight has decayed enough, or, when the current bucket alone is too full, the matching moment in the
next bucket.
"""

from __future__ import annotations

import math

NEVER = math.inf


def roll(b: int, c: int, p: int, idx: int) -> tuple[int, int, int]:
    """The state as of bucket `idx` (the stored bucket is `b`)."""
    if idx == b:
        return b, c, p
    if idx == b + 1:
        return idx, 0, c
    return idx, 0, 0


def estimate(c: int, p: int, frac: float) -> float:
    return p * (1.0 - frac) + c


def wait(c: int, p: int, frac: float, cost: int, limit: int, seconds: int) -> float:
    """Seconds until `cost` more fits, if nothing else is admitted meanwhile (0: fits now)."""
    if cost > limit:
        return NEVER
    if estimate(c, p, frac) + cost <= limit:
        return 0.0
    if c + cost <= limit:  # fits in this bucket once the previous one has decayed enough (p > 0 here)
        return max(0.0, (1.0 - (limit - c - cost) / p - frac) * seconds)
    # Only in the next bucket, where this bucket's count becomes the decaying one.
    return (1.0 - frac) * seconds + (1.0 - (limit - cost) / c) * seconds


def reset(c: int, p: int, frac: float, seconds: int) -> float:
    """Seconds until the window is back to its full limit (OpenAI's x-ratelimit-reset-*)."""
    if c > 0:
        return (1.0 - frac) * seconds + seconds
    if p > 0:
        return (1.0 - frac) * seconds
    return 0.0
