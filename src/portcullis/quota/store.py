"""Where quota counters live, behind one small interface, and the in-process implementation.

    QuotaStore.admit(ask)            check every window, the concurrency slot and every budget, and
                                     take them all, or take nothing: one atomic step
    QuotaStore.settle(ask, ...)      the real numbers are in: correct the token windows and budgets,
                                     free the slot; returns the budget alert thresholds newly crossed
    QuotaStore.extend(ask, more)     a stream outgrew its reservation: reserve up to `more` budget
                                     (what every budget has room for); 0 when one is spent

`MemoryQuotaStore` is exact within one process (the event loop runs each call to the end without
interruption). `RedisQuotaStore` (redis_store.py) runs the same algorithm as Lua scripts, shared by
every process. The conformance tests run one suite against both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from portcullis.quota import window
from portcullis.quota.plan import Plan

# Why an ask was refused (Verdict.failed).
OK, WINDOW, CONCURRENCY, BUDGET, TOO_LARGE = 0, 1, 2, 3, 4
# A refused concurrency slot frees when some other request ends: nobody knows when. Ask again soon.
CONCURRENCY_RETRY_S = 1.0


@dataclass(slots=True)
class Ask:
    """One request's claim on a plan."""

    plan: Plan
    tokens: int  # reserved: prompt estimate + completion allowance
    cost: int  # reserved, micro-units
    lease: str  # names this request's concurrency slot
    periods: tuple[str, ...]  # for each plan budget, the period it is charged to ("d20261126", "m202611")
    period_ends_s: tuple[float, ...]  # for each plan budget, seconds until its period ends
    now: float | None = None  # tests drive the clock; None: the store's own clock
    # Filled in by admit: each window's bucket at admission (settle corrects that bucket).
    buckets: list[int] = field(default_factory=list)
    # Budget reserved beyond `cost` by extend().
    extra_cost: int = 0


@dataclass(slots=True)
class Verdict:
    failed: int  # OK or the kind of limit that refused
    index: int  # which window / budget refused (0-based)
    retry_after_s: float  # until the ask would be admitted (0 when admitted)
    remaining: list[int]  # per window, after this ask
    reset_s: list[float]  # per window

    @property
    def admitted(self) -> bool:
        return self.failed == OK


@dataclass(frozen=True, slots=True)
class Alert:
    budget: int  # index into plan.budgets
    threshold: float  # 0.5, 0.8, 1.0 ...
    spent: int  # micro-units, after the settlement that crossed it


class QuotaStore(Protocol):
    async def admit(self, ask: Ask) -> Verdict: ...

    async def settle(self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> list[Alert]: ...

    async def extend(self, ask: Ask, more: int) -> int: ...


def budget_key(plan: Plan, index: int, period: str) -> str:
    budget = plan.budgets[index]
    who = plan.subject if budget.subject == "key" else "u"
    return f"{plan.tag}:b:{who}:{period}"


class MemoryQuotaStore:
    """In-process counters. `share` scales every limit (a fail-open fallback takes this process's share)."""

    def __init__(self, *, share: float = 1.0) -> None:
        self.share = share
        self._windows: dict[str, list[int]] = {}  # "<tag>:<subject>:<field>" -> [b, c, p]
        self._in_flight: dict[str, set[str]] = {}  # "<tag>:<subject>" -> leases
        self._budgets: dict[str, list[int]] = {}  # budget key -> [spent, reserved]
        self._alerted: set[tuple[str, float]] = set()
        self._swept_at = time.time()

    def _limit(self, limit: int) -> int:
        return limit if self.share >= 1.0 else max(1, math.floor(limit * self.share))

    async def admit(self, ask: Ask) -> Verdict:
        return self.admit_now(ask)

    def admit_now(self, ask: Ask) -> Verdict:
        now = time.time() if ask.now is None else ask.now
        plan = ask.plan
        if now - self._swept_at > 60:
            self._sweep(now)
        failed, index, retry = OK, 0, 0.0
        states: list[tuple[list[int], int, int, int, float]] = []
        for i, w in enumerate(plan.windows):
            slot = f"{plan.tag}:{plan.subject}:{w.field}"
            stored = self._windows.get(slot)
            idx = math.floor(now / w.seconds)
            if stored is None:
                stored = self._windows[slot] = [idx, 0, 0]
            b, c, p = window.roll(*stored, max(idx, stored[0]))
            frac = max(0.0, (now - b * w.seconds) / w.seconds)
            cost = ask.tokens if w.kind == "tokens" else 1
            states.append((stored, b, c, p, frac))
            limit = self._limit(w.limit)
            wait = window.wait(c, p, frac, cost, limit, w.seconds)
            if wait > 0 and (failed == OK or wait > retry):
                failed, index, retry = (TOO_LARGE if wait == window.NEVER else WINDOW), i, wait
        owner = f"{plan.tag}:{plan.subject}"
        leases = self._in_flight.get(owner)
        if plan.concurrency is not None and leases is not None and len(leases) >= self._limit(plan.concurrency):
            if failed == OK or CONCURRENCY_RETRY_S > retry:
                failed, index, retry = CONCURRENCY, 0, max(retry, CONCURRENCY_RETRY_S)
        for i, (budget, period) in enumerate(zip(plan.budgets, ask.periods, strict=True)):
            spent, reserved = self._budgets.get(budget_key(plan, i, period), (0, 0))
            if spent + reserved + ask.cost > budget.limit:
                wait = ask.period_ends_s[i]
                if failed == OK or wait > retry:
                    failed, index, retry = BUDGET, i, wait
        remaining: list[int] = []
        resets: list[float] = []
        admitted = failed == OK
        ask.buckets = []
        for w, (stored, b, c, p, frac) in zip(plan.windows, states, strict=True):
            if admitted:
                c += ask.tokens if w.kind == "tokens" else 1
                stored[0], stored[1], stored[2] = b, c, p
            ask.buckets.append(b)
            remaining.append(max(0, math.floor(self._limit(w.limit) - window.estimate(c, p, frac))))
            resets.append(window.reset(c, p, frac, w.seconds))
        if admitted:
            if plan.concurrency is not None:
                self._in_flight.setdefault(owner, set()).add(ask.lease)
            for i, period in enumerate(ask.periods):
                self._budgets.setdefault(budget_key(plan, i, period), [0, 0])[1] += ask.cost
        return Verdict(failed, index, retry, remaining, resets)

    async def settle(self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> list[Alert]:
        return self.settle_now(ask, tokens, cost, thresholds)

    def settle_now(self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> list[Alert]:
        plan = ask.plan
        delta = tokens - ask.tokens
        if delta:
            for w, bucket in zip(plan.windows, ask.buckets, strict=True):
                if w.kind != "tokens":
                    continue
                stored = self._windows.get(f"{plan.tag}:{plan.subject}:{w.field}")
                if stored is None:
                    continue
                if stored[0] == bucket:
                    stored[1] = max(0, stored[1] + delta)
                elif stored[0] == bucket + 1:
                    stored[2] = max(0, stored[2] + delta)
        if plan.concurrency is not None:
            leases = self._in_flight.get(f"{plan.tag}:{plan.subject}")
            if leases is not None:
                leases.discard(ask.lease)
                if not leases:
                    del self._in_flight[f"{plan.tag}:{plan.subject}"]
        alerts: list[Alert] = []
        for i, (budget, period) in enumerate(zip(plan.budgets, ask.periods, strict=True)):
            key = budget_key(plan, i, period)
            counters = self._budgets.setdefault(key, [0, 0])
            counters[1] = max(0, counters[1] - ask.cost - ask.extra_cost)
            counters[0] += cost
            for threshold in thresholds:
                if counters[0] >= threshold * budget.limit and (key, threshold) not in self._alerted:
                    self._alerted.add((key, threshold))
                    alerts.append(Alert(i, threshold, counters[0]))
        return alerts

    async def extend(self, ask: Ask, more: int) -> int:
        plan = ask.plan
        keys = [budget_key(plan, i, period) for i, period in enumerate(ask.periods)]
        grant = more
        for key, budget in zip(keys, plan.budgets, strict=True):
            spent, reserved = self._budgets.get(key, (0, 0))
            grant = min(grant, budget.limit - spent - reserved)
        if grant <= 0:
            return 0
        for key in keys:
            self._budgets.setdefault(key, [0, 0])[1] += grant
        ask.extra_cost += grant
        return grant

    def _sweep(self, now: float) -> None:
        """Forget windows that have decayed to nothing (a long-running process meets many principals)."""
        self._swept_at = now
        for slot in [s for s, (b, _, _) in self._windows.items() if now - b * _seconds_of(s) > 2 * _seconds_of(s)]:
            del self._windows[slot]


def _seconds_of(slot: str) -> int:
    return int(slot.rsplit(":", 1)[1][1:])
