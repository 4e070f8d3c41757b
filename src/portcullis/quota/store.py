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
    index: int  # which window / budget refused (0-based); for CONCURRENCY, which level (0: the principal)
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
    who = budget.who or (plan.subject if budget.subject == "key" else "u")
    return f"{budget.tag or plan.tag}:b:{who}:{period}"


class MemoryQuotaStore:
    """In-process counters. `share` scales every limit (a fail-open fallback takes this process's share)."""

    def __init__(self, *, share: float = 1.0) -> None:
        self.share = share
        # "<tag>:<subject>" (a principal, a team, an organisation) -> window field -> [b, c, p]
        self._windows: dict[str, dict[str, list[int]]] = {}
        self._in_flight: dict[str, set[str]] = {}  # "<tag>:<subject>" -> leases
        self._budgets: dict[str, list[int]] = {}  # budget key -> [spent, reserved]
        self._alerted: set[tuple[str, float]] = set()
        self._swept_at = time.time()

    def _limit(self, limit: int) -> int:
        return limit if self.share >= 1.0 else max(1, math.floor(limit * self.share))

    async def admit(self, ask: Ask) -> Verdict:
        return self.admit_now(ask)

    def admit_now(self, ask: Ask) -> Verdict:
        # window.py's functions, inlined: this runs on every request (bench/quota_cost.py).
        now = time.time() if ask.now is None else ask.now
        plan = ask.plan
        if now - self._swept_at > 60:
            self._sweep(now)
        owners = plan.owners
        windows = self._windows.get(plan.owner)
        if windows is None:
            windows = self._windows[plan.owner] = {}
        tables = None  # one per level, when there are levels above the principal
        if plan.levels:
            tables = [windows]
            for owner in owners[1:]:
                level_windows = self._windows.get(owner)
                if level_windows is None:
                    level_windows = self._windows[owner] = {}
                tables.append(level_windows)
        scaled = self.share < 1.0
        failed, index, retry = OK, 0, 0.0
        states = []
        for i, w in enumerate(plan.windows):
            seconds = w.seconds
            idx = int(now // seconds)
            table = windows if tables is None else tables[w.level]
            stored = table.get(w.field)
            if stored is None:
                stored = table[w.field] = [idx, 0, 0]
            b, c, p = stored
            if idx > b:
                p = c if idx == b + 1 else 0
                c = 0
                b = idx
            frac = (now - b * seconds) / seconds
            if frac < 0.0:
                frac = 0.0
            cost = ask.tokens if w.kind == "tokens" else 1
            limit = self._limit(w.limit) if scaled else w.limit
            states.append((stored, b, c, p, frac, cost, limit))
            if p * (1.0 - frac) + c + cost > limit:
                wait = window.wait(c, p, frac, cost, limit, seconds)
                if failed == OK or wait > retry:
                    failed, index, retry = (TOO_LARGE if wait == window.NEVER else WINDOW), i, wait
        holds = plan.holds_leases
        if holds:
            for level, most in enumerate(plan.concurrencies):
                if most is None:
                    continue
                leases = self._in_flight.get(owners[level])
                if leases is not None and len(leases) >= self._limit(most):
                    if failed == OK or CONCURRENCY_RETRY_S > retry:
                        failed, index, retry = CONCURRENCY, level, max(retry, CONCURRENCY_RETRY_S)
        for i, (budget, period) in enumerate(zip(plan.budgets, ask.periods, strict=True)):
            spent, reserved = self._budgets.get(budget_key(plan, i, period), (0, 0))
            if spent + reserved + ask.cost > budget.limit:
                wait = ask.period_ends_s[i]
                if failed == OK or wait > retry:
                    failed, index, retry = BUDGET, i, wait
        admitted = failed == OK
        remaining: list[int] = []
        resets: list[float] = []
        buckets: list[int] = []
        for w, (stored, b, c, p, frac, cost, limit) in zip(plan.windows, states, strict=True):
            if admitted:
                c += cost
                stored[0] = b
                stored[1] = c
                stored[2] = p
            buckets.append(b)
            left = limit - (p * (1.0 - frac) + c)
            remaining.append(int(left) if left > 0 else 0)
            resets.append((2.0 - frac) * w.seconds if c else (1.0 - frac) * w.seconds if p else 0.0)
        ask.buckets = buckets
        if admitted:
            if holds:
                for level, most in enumerate(plan.concurrencies):
                    if most is not None:
                        self._in_flight.setdefault(owners[level], set()).add(ask.lease)
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
                windows = self._windows.get(plan.owners[w.level]) if w.kind == "tokens" else None
                stored = windows.get(w.field) if windows is not None else None
                if stored is None:
                    continue
                if stored[0] == bucket:
                    stored[1] = max(0, stored[1] + delta)
                elif stored[0] == bucket + 1:
                    stored[2] = max(0, stored[2] + delta)
        if plan.holds_leases:
            for owner, most in zip(plan.owners, plan.concurrencies, strict=True):
                leases = self._in_flight.get(owner) if most is not None else None
                if leases is not None:
                    leases.discard(ask.lease)
                    if not leases:
                        del self._in_flight[owner]
        if not plan.budgets:
            return []
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
        """Forget principals whose windows have all decayed to nothing and who hold no slot."""
        self._swept_at = now
        stale = [
            owner
            for owner, windows in self._windows.items()
            if owner not in self._in_flight
            and all(now - b * int(field[1:]) > 2 * int(field[1:]) for field, (b, _, _) in windows.items())
        ]
        for owner in stale:
            del self._windows[owner]
