"""Admission control: the gateway, not llama-server, decides what runs, what waits and what is refused.

llama-server takes every request and queues beyond its slots silently and without bound. So each
model has a gate here: it knows the model's capacity (the slots of its usable replicas: ready, breaker
closed; a half-open replica counts its probes) and the requests holding one. A request takes a slot
if one is free and nobody waits; otherwise `admission.when_full` decides:

  queue   wait in a bounded queue, ordered by tier priority and, within a tier, round-robin between
          keys (one heavy key cannot starve the others), until a slot frees or `max_wait_s` passes;
          when it is full, a higher tier's request takes the place of the newest lower-tier waiter;
  reject  answer 503 `overloaded` at once (when batch lines hold slots, the newest gives one up instead).

Every refusal says when to come back: Retry-After estimated from the work queued ahead and the
observed service time (an EWMA of how long a slot is held), `retry-after-ms` with the precision.

Degradation: while a model's observed time to first token (p95 over a window) exceeds
`degrade.ttft_p95_s`, requests of the chosen tiers get `max_tokens` capped and/or go to a cheaper
model, and the response says so in `x-portcullis-degraded`.

Overflow: a model with `spill_to_fallbacks` sends a request that would queue to the first fallback with
a free slot instead (told in `x-portcullis-route`).

Background work (batch lines, jobs/runner.py) takes a slot only when nobody waits and more than
`batch.reserve_slots` are free, never queues, and is preempted: an interactive request that would have
to wait cancels the newest background holder and takes its slot (the line runs again later).
Low-priority requests (`x-portcullis-priority: low`) queue behind every tier.

The slot is held for the whole upstream part (retries included) and given straight to the next waiter
when released. Per process: N gateway processes in front of one fleet each admit up to its capacity
(docs/resilience.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from portcullis.config import Config, DegradeConfig, UpstreamTimeouts
from portcullis.errors import ServiceUnavailable, retry_after_headers
from portcullis.exchange import Abort
from portcullis.obs.logging import bind_model
from portcullis.routing.balancer import unavailable
from portcullis.routing.catalog import Catalog, Replica, ReplicaState
from portcullis.routing.retry import RetryBudget

if TYPE_CHECKING:
    from portcullis.exchange import Exchange
    from portcullis.http import Request
    from portcullis.identity.principal import Principal
    from portcullis.obs.metrics import Metrics

_EWMA_ALPHA = 0.1
_DEGRADE_EVAL_S = 1.0  # how often a model's TTFT p95 is recomputed
_SHARE_WINDOW_S = 10.0  # the recent grants that say how much of a model higher tiers take


@dataclass(slots=True, eq=False)
class Target:
    """Where the upstream stage sends a request: a model's replicas, its fallbacks, its limits."""

    model: str
    replicas: list[Replica]
    # Fallback models in order, with their replicas (skip those in `catalog.disabled` when used).
    fallbacks: list[tuple[str, list[Replica]]]
    timeouts: UpstreamTimeouts
    budget: RetryBudget
    catalog: Catalog


class _Waiter:
    __slots__ = ("fut", "key", "priority")

    def __init__(self, fut: asyncio.Future[None], priority: int, key: str) -> None:
        self.fut = fut
        self.priority = priority
        self.key = key


class Samples:
    """The last `size` (time, value) samples, in two arrays allocated once.

    Recording one allocates nothing. A deque of tuples did, for every request: thousands of small objects
    that outlived a burst, scattered over the memory the burst had used, and kept the allocator from
    giving any of it back to the system (bench/spike.py)."""

    __slots__ = ("count", "next", "size", "times", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.times = array("d", bytes(8 * size))
        self.values = array("d", bytes(8 * size))
        self.next = 0
        self.count = 0

    def add(self, when: float, value: float) -> None:
        i = self.next
        self.times[i] = when
        self.values[i] = value
        self.next = (i + 1) % self.size
        if self.count < self.size:
            self.count += 1

    def since(self, horizon: float) -> list[float]:
        """The values recorded at or after `horizon`."""
        times, values = self.times, self.values
        return [values[i] for i in range(self.count) if times[i] >= horizon]

    def __len__(self) -> int:
        return self.count


class Gate:
    """One model's slots and queue."""

    def __init__(self, model: str, replicas: list[Replica], config: Config, metrics: Metrics) -> None:
        self.model = model
        self.metrics = metrics
        self.replicas = replicas
        self.holding = 0  # requests holding a slot
        # priority → key → that key's waiters in arrival order (dicts keep the round-robin order)
        self._queue: dict[int, dict[str, deque[_Waiter]]] = {}
        self.depth = 0
        self.service_s: float | None = None  # EWMA of how long a slot is held
        # (monotonic time, priority) of recent grants: a tier waits behind the higher tiers' arrivals too
        self.grants = Samples(1024)
        self.budget = RetryBudget(config.resilience.retry_budget)
        self.timeouts = config.timeouts_for(model)
        self.degrade = config.degrade_for(model)
        self.target: Target  # set by Admission, which knows the other gates
        # (monotonic time, seconds to first token) of recent requests, for degradation
        self.ttft = Samples(4096)
        self.ttft_p95: float | None = None
        self._evaluated_at = 0.0
        # Background holders (batch lines) in the order they took their slot, and how many were told to
        # give theirs up and have not yet.
        self.background: dict[Exchange, None] = {}
        self.preempting = 0
        self.preempted = 0

    # -- capacity ---------------------------------------------------------------------------------

    def capacity(self) -> float:
        """Slots of the usable replicas; math.inf when one of them has no slot count (it takes any number)."""
        total = 0
        now = time.monotonic()
        for r in self.replicas:
            if r.state is not ReplicaState.READY:
                continue
            if r.host is not None and not r.loaded:
                # Its model waits at its host to be loaded (hosts/schedule.py): no slots to count. A model that is
                # only on hosts takes any number (they wait there); beside replicas of its own, it adds nothing.
                if all(x.host is not None for x in self.replicas):
                    return math.inf
                continue
            limit = r.limit
            if limit is None:
                return math.inf
            # Slots other clients hold (the server's own reading) are not ours to give; but never all of them: a
            # replica that is up takes at least one request (it waits in the server's queue, not refused here).
            own = r.breaker.capacity(limit)
            total += max(min(own, 1), own - r.external(now))
        return total

    def estimate_wait(self, position: int, priority: int | None = None) -> float:
        """Seconds until a request at `position` (1 = next) among the waiters of its priority and above
        gets a slot: position / (the rate slots free up, minus the share recently taken by higher tiers)."""
        capacity = max(1, self.capacity())  # (unbounded: no wait)
        service = self.service_s if self.service_s is not None else 1.0
        wait = position * service / capacity
        if priority is not None and self.grants:
            horizon = time.monotonic() - _SHARE_WINDOW_S
            recent = higher = 0
            for p in self.grants.since(horizon):
                recent += 1
                higher += p > priority
            if recent:
                wait /= max(0.05, 1 - higher / recent)
        return wait

    def ahead_of(self, priority: int) -> int:
        return sum(len(d) for p, keys in self._queue.items() if p >= priority for d in keys.values())

    # -- queue ------------------------------------------------------------------------------------

    def enqueue(self, waiter: _Waiter) -> None:
        keys = self._queue.setdefault(waiter.priority, {})
        line = keys.get(waiter.key)
        if line is None:
            keys[waiter.key] = line = deque()
        line.append(waiter)
        self.depth += 1

    def remove(self, waiter: _Waiter) -> None:
        keys = self._queue.get(waiter.priority)
        line = keys.get(waiter.key) if keys else None
        if line is None or waiter not in line:
            return
        line.remove(waiter)
        self.depth -= 1
        if not line:
            del keys[waiter.key]  # type: ignore[union-attr]

    def evict_below(self, priority: int) -> _Waiter | None:
        """Make room for a higher tier: take out the newest waiter of the lowest tier below `priority`,
        from its key with the most waiters (the heaviest user of that tier gives way first)."""
        for p in sorted(self._queue):
            if p >= priority:
                return None
            keys = self._queue[p]
            live = [k for k, line in keys.items() if line]
            if not live:
                continue
            key = max(live, key=lambda k: len(keys[k]))
            line = keys[key]
            waiter = line.pop()
            if not line:
                del keys[key]
            self.depth -= 1
            return waiter
        return None

    def _next(self) -> _Waiter | None:
        for priority in sorted(self._queue, reverse=True):
            keys = self._queue[priority]
            if not keys:
                continue
            key = next(iter(keys))
            line = keys.pop(key)
            waiter = line.popleft()
            if line:
                keys[key] = line  # to the back of the round
            self.depth -= 1
            return waiter
        return None

    def grant(self) -> None:
        """Hand free slots to waiters, highest priority first. With no usable replica left, waiting is
        pointless: every waiter is answered 503 now, with the time its breakers or probes name."""
        capacity = self.capacity()
        if capacity == 0:
            self.metrics.admission_rejections.labels(self.model, "no_replica").inc(self.depth)
            self.drain(lambda _wait: unavailable(self.replicas))
            return
        while self.depth and self.holding < capacity:
            waiter = self._next()
            if waiter is None:
                return
            if waiter.fut.done():
                continue
            self.holding += 1
            self.grants.add(time.monotonic(), waiter.priority)
            waiter.fut.set_result(None)

    def idle(self, reserve: int) -> float:
        """Slots background work may take now: none while anyone waits, and `reserve` left free (math.inf: any)."""
        if self.depth:
            return 0
        return max(0, self.capacity() - reserve - self.holding)

    def preempt(self) -> None:
        """A request waits: if background work holds slots, the newest gives one up (once per waiter)."""
        if self.depth <= self.preempting:
            return
        for ex in reversed(self.background):
            if ex.abort_reason is None or not ex.abort_reason.final:
                ex.abort(Abort.PREEMPTED)
                if ex.abort_reason is Abort.PREEMPTED:  # (one that is finishing anyway frees its slot soon)
                    self.preempting += 1
                    self.preempted += 1
                    return

    def release(self, held_s: float | None) -> None:
        self.holding -= 1
        if held_s is not None:
            s = self.service_s
            self.service_s = held_s if s is None else s + _EWMA_ALPHA * (held_s - s)
        if self.depth:
            self.grant()

    def drain(self, error_for: Any) -> None:
        """Answer every waiter with the error `error_for(position)` gives (shutdown)."""
        position = 0
        while self.depth:
            waiter = self._next()
            if waiter is None:
                break
            position += 1
            if not waiter.fut.done():
                waiter.fut.set_exception(error_for(self.estimate_wait(position)))

    # -- degradation --------------------------------------------------------------------------------

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.add(time.monotonic(), seconds)

    def slow(self, degrade: DegradeConfig) -> bool:
        threshold = degrade.ttft_p95_s
        if threshold is None:
            return False
        now = time.monotonic()
        if now - self._evaluated_at >= _DEGRADE_EVAL_S:
            self._evaluated_at = now
            horizon = now - degrade.window_s
            recent = sorted(self.ttft.since(horizon))
            self.ttft_p95 = (
                recent[min(len(recent) - 1, math.ceil(0.95 * len(recent)) - 1)]
                if (len(recent) >= degrade.min_samples)
                else None
            )
        return self.ttft_p95 is not None and self.ttft_p95 > threshold


@dataclass(frozen=True, slots=True)
class Outlook:
    """A model's slots and queue as they stand: what the admin API, the dashboard, the metrics and the batch
    runner read of admission (none of them touches a gate; the router asks `free_slot` and `expected_wait`)."""

    model: str
    capacity: int | None  # slots of its usable replicas; None: unbounded (a backend without a slot count)
    in_use: int  # slots held
    depth: int  # requests waiting for one
    background: int  # slots held by background work (batch lines)
    preempted: int  # background requests that gave their slot up, since start
    idle: float  # slots background work may take now (nobody waits; batch.reserve_slots kept free); math.inf: any
    service_s: float | None  # how long a slot is held (EWMA); None until measured
    ttft_p95_s: float | None
    degraded: bool  # answering slowly enough that requests are degraded
    enabled: bool
    retries_denied: int  # retries its retry budget refused, since start


class Admission:
    def __init__(self, config: Config, catalog: Catalog, metrics: Metrics) -> None:
        self.config = config
        self.settings = config.admission
        self.catalog = catalog
        self.metrics = metrics
        self.gates = {model: Gate(model, replicas, config, metrics) for model, replicas in catalog.models.items()}
        for gate in self.gates.values():
            fallbacks = [(name, catalog.models[name]) for name in catalog.fallbacks.get(gate.model, ())]
            gate.target = Target(gate.model, gate.replicas, fallbacks, gate.timeouts, gate.budget, catalog)
        self.priorities = {name: tier.priority for name, tier in config.tiers.items()}
        self.low_priority = min(self.priorities.values()) - 1  # behind every tier
        self.reserve = config.batch.reserve_slots
        self.spills = {name: m.spill_to_fallbacks for name, m in config.models.items()}
        self.closed = False
        self._ticker: asyncio.Task[None] | None = None

    def slot(self, req: Request, ex: Exchange, model: str, payload: dict[str, Any]) -> Slot:
        """`async with admission.slot(...) as target:` holds one of the model's slots for the upstream call."""
        if ex.trace is not None:
            ex.trace.stage("queue")
        return Slot(self, req, ex, model, payload)

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _tick(self) -> None:
        """Once a second: snapshot every model's retry budget (its window is made of these)."""
        while True:
            for gate in self.gates.values():
                gate.budget.mark()
            await asyncio.sleep(1.0)

    def kick(self, model: str) -> None:
        """Capacity may have grown (a replica came back, a breaker half-opened): let waiters in."""
        gate = self.gates.get(model)
        if gate is not None and gate.depth:
            gate.grant()

    def priority_of(self, principal: Principal | None, *, low: bool = False) -> int:
        """A request's place in the queue: its tier's priority, or behind every tier when sent as low."""
        if low:
            return self.low_priority
        return self.priorities.get(principal.tier, 0) if principal is not None else 0

    # -- what the rest of the gateway reads ----------------------------------------------------------

    def outlook(self, model: str) -> Outlook | None:
        """The model's slots and queue now (None: not a model of this gateway)."""
        gate = self.gates.get(model)
        if gate is None:
            return None
        capacity = gate.capacity()
        enabled = model not in self.catalog.disabled
        return Outlook(
            model=model,
            capacity=int(capacity) if capacity != math.inf else None,
            in_use=gate.holding,
            depth=gate.depth,
            background=len(gate.background),
            preempted=gate.preempted,
            idle=gate.idle(self.reserve) if enabled and not self.closed else 0,
            service_s=gate.service_s,
            ttft_p95_s=gate.ttft_p95,
            degraded=gate.slow(gate.degrade),
            enabled=enabled,
            retries_denied=gate.budget.denied,
        )

    def outlooks(self) -> list[Outlook]:
        """Every model's, in the catalog's order."""
        return [o for model in self.gates if (o := self.outlook(model)) is not None]

    def free_slot(self, model: str) -> bool:
        """Would a request get a slot of `model` now, without queueing?"""
        gate = self.gates[model]
        return gate.depth == 0 and gate.holding < gate.capacity()

    def expected_wait(self, model: str, priority: int | None = None) -> float:
        """Seconds a request of `priority` would wait for a slot of `model` now (0 with a free slot): the
        waiters of its priority and above ahead of it, at the rate slots free up (estimate_wait)."""
        if self.free_slot(model):
            return 0.0
        gate = self.gates[model]
        ahead = gate.ahead_of(priority) if priority is not None else gate.depth
        return gate.estimate_wait(ahead + 1, priority)

    def queue_wait(self, model: str) -> float:
        """Seconds the next request to join the back of `model`'s queue would wait, whatever its priority."""
        gate = self.gates[model]
        return gate.estimate_wait(gate.depth + 1)

    def collector(self) -> Collector:
        """Queues, slots and background work per model, read at scrape time."""
        return _AdmissionCollector(self)

    def kick_later(self, model: str, delay_s: float) -> None:
        """An open breaker half-opens by the clock alone: look at the queue again then."""
        asyncio.get_running_loop().call_later(delay_s, self.kick, model)

    def close(self) -> None:
        """Shutdown: every queued request is answered 503 with Retry-After now, and nothing queues again."""
        self.closed = True
        for gate in self.gates.values():
            if gate.depth:
                self.metrics.admission_rejections.labels(gate.model, "shutdown").inc(gate.depth)
                gate.drain(
                    lambda wait: ServiceUnavailable(
                        "The gateway is shutting down; this request was not started. Retry on another instance.",
                        code="server_shutting_down",
                        headers=retry_after_headers(min(wait, 5.0)),
                    )
                )

    # -- the slot's way in ----------------------------------------------------------------------

    def degrade(self, req: Request, ex: Exchange, gate: Gate, payload: dict[str, Any]) -> Gate:
        settings = gate.degrade
        if not gate.slow(settings):
            return gate
        principal = ex.principal
        if settings.tiers is not None and (principal is None or principal.tier not in settings.tiers):
            return gate
        actions = []
        if settings.max_tokens is not None:
            # Every length field the body carries is capped (validation left them one integer value):
            # a backend-native one left alone (llama-server's n_predict wins over max_tokens) would undo
            # the cap. A body with neither OpenAI field gets max_tokens.
            cap = settings.max_tokens
            for field in ("max_tokens", "max_completion_tokens", *self.config.validation.native_length_fields):
                asked = payload.get(field)
                if asked is not None and (not isinstance(asked, int) or asked > cap):
                    payload[field] = cap
            if payload.get("max_tokens") is None and payload.get("max_completion_tokens") is None:
                payload["max_tokens"] = cap
            actions.append(f"max_tokens={cap}")
        cheaper = settings.model
        if cheaper is not None and cheaper != gate.model and cheaper not in self.catalog.disabled:
            gate = self.gates[cheaper]
            actions.append(f"model={cheaper}")
        if actions:
            ex.degraded = ", ".join(actions)
            req.response_headers.append((b"x-portcullis-degraded", ex.degraded.encode()))
            for action in actions:
                self.metrics.degradations.labels(ex.model or gate.model, action.split("=")[0]).inc()
        return gate

    def refuse(self, gate: Gate, reason: str, priority: int) -> ServiceUnavailable:
        self.metrics.admission_rejections.labels(gate.model, reason).inc()
        wait = gate.estimate_wait(gate.ahead_of(priority) + 1, priority)
        message = {
            "reject": f"The model '{gate.model}' is at capacity; retry after the time in Retry-After.",
            "queue_full": f"The model '{gate.model}' is at capacity and its queue is full; retry later.",
            "queue_timeout": (
                f"The model '{gate.model}' stayed at capacity for {self.settings.max_wait_s:g} s while this "
                "request waited; retry later."
            ),
            "shutdown": "The gateway is shutting down; retry on another instance.",
        }[reason]
        if reason == "shutdown":  # another instance can take it now: not a wait for this one's capacity
            return ServiceUnavailable(message, code="server_shutting_down", headers=retry_after_headers(min(wait, 5.0)))
        return ServiceUnavailable(message, code="overloaded", headers=retry_after_headers(wait))

    def spill(self, req: Request, ex: Exchange, gate: Gate) -> Gate | None:
        """The model is full: the first fallback with a free slot and nobody waiting, if it may spill."""
        if not self.spills.get(gate.model):
            return None
        for model, _ in gate.target.fallbacks:
            other = self.gates[model]
            if model not in self.catalog.disabled and not other.depth and other.holding < other.capacity():
                reason = f"model={model}; reason={gate.model} full, spilled to its fallback".encode()
                req.response_headers.append((b"x-portcullis-route", reason))
                ex.route_reason = f"{gate.model} full, spilled"
                return other
        return None

    def take_background(self, ex: Exchange, gate: Gate) -> None:
        if gate.idle(self.reserve) <= 0:
            self.metrics.admission_rejections.labels(gate.model, "no_idle_capacity").inc()
            raise ServiceUnavailable(
                f"The model '{gate.model}' has no idle capacity for background work now.",
                code="no_idle_capacity",
                headers=retry_after_headers(gate.estimate_wait(1)),
            )
        gate.holding += 1
        gate.background[ex] = None

    async def wait(
        self, req: Request, ex: Exchange, gate: Gate, priority: int, *, deadline: Any = asyncio.timeout
    ) -> None:
        key = (ex.principal.key_id or ex.principal.user) if ex.principal is not None else "-"
        waiter = _Waiter(asyncio.get_running_loop().create_future(), priority, key or "-")
        gate.enqueue(waiter)
        if gate.background:
            gate.preempt()
        # A client that leaves while waiting leaves the queue at once (the abort cancels this task).
        ex.watch_disconnect(req)
        queued_at = time.perf_counter()
        fut = waiter.fut
        try:
            async with deadline(self.settings.max_wait_s):
                await fut
        except TimeoutError:
            granted = fut.done() and not fut.cancelled() and fut.exception() is None
            if not granted:  # (granted in the very instant the wait ran out: the slot is ours, keep it)
                gate.remove(waiter)
                raise self.refuse(gate, "queue_timeout", priority) from None
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                gate.release(None)  # granted in the same instant the client left: give the slot back
            else:
                gate.remove(waiter)
            raise
        finally:
            ex.queue_s = time.perf_counter() - queued_at
            self.metrics.queue_wait.labels(gate.model).observe(ex.queue_s)
            req.response_headers.append((b"x-portcullis-queue-wait-ms", str(round(ex.queue_s * 1000)).encode()))


class Slot:
    __slots__ = ("_admission", "_ex", "_gate", "_model", "_payload", "_req", "_since")

    def __init__(self, admission: Admission, req: Request, ex: Exchange, model: str, payload: dict[str, Any]) -> None:
        self._admission = admission
        self._req = req
        self._ex = ex
        self._model = model
        self._payload = payload
        self._gate: Gate | None = None
        self._since = 0.0

    async def __aenter__(self) -> Target:
        admission, ex = self._admission, self._ex
        gate = admission.gates[self._model]
        if gate.degrade.ttft_p95_s is not None:
            gate = admission.degrade(self._req, ex, gate, self._payload)
        capacity = gate.capacity()
        if ex.background:
            if capacity == 0:
                raise unavailable(gate.replicas)
            admission.take_background(ex, gate)
        elif gate.holding < capacity and not gate.depth:
            gate.holding += 1  # (grants are recorded only from the queue: they matter only under contention)
        elif capacity == 0:
            admission.metrics.admission_rejections.labels(gate.model, "no_replica").inc()
            raise unavailable(gate.replicas)
        elif (other := admission.spill(self._req, ex, gate)) is not None:
            gate = other
            gate.holding += 1
        else:
            priority = admission.priority_of(ex.principal, low=ex.low_priority)
            if admission.closed:
                raise admission.refuse(gate, "shutdown", priority)
            # (Slots held by batch lines are not taken: waiting makes the newest give its slot up at once.)
            if admission.settings.when_full == "reject" and not gate.background:
                raise admission.refuse(gate, "reject", priority)
            if gate.depth >= admission.settings.max_queue:
                evicted = gate.evict_below(priority)
                if evicted is None:
                    raise admission.refuse(gate, "queue_full", priority)
                if not evicted.fut.done():
                    evicted.fut.set_exception(admission.refuse(gate, "queue_full", evicted.priority))
            await admission.wait(self._req, ex, gate, priority)
        # The one place that says which model the request ends up on: degraded to a cheaper one, spilled to a
        # fallback, or the one routed to (the upstream stage may still fail over to a fallback: ex.replica).
        if ex.model != gate.model:
            ex.model = gate.model
            bind_model(gate.model)  # the lines logged from here on name it too
        self._gate = gate
        self._since = time.perf_counter()
        return gate.target

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gate = self._gate
        if gate is None:
            return
        ex = self._ex
        if ex.background:
            del gate.background[ex]
            if ex.abort_reason == Abort.PREEMPTED:
                gate.preempting -= 1
        gate.release(time.perf_counter() - self._since if ex.replica is not None else None)
        if ex.ttft_s is not None:
            gate.observe_ttft(ex.ttft_s)
        elif ex.prompt_s is not None:
            gate.observe_ttft(ex.queue_s + ex.prompt_s)


class _AdmissionCollector(Collector):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily("portcullis_queue_depth", "Requests waiting for a slot", labels=["model"])
        holding = GaugeMetricFamily("portcullis_slots_in_use", "Requests holding a slot of a model", labels=["model"])
        capacity = GaugeMetricFamily(
            "portcullis_slots_capacity",
            "Slots of a model's usable replicas (ready, breaker not open)",
            labels=["model"],
        )
        preempted = CounterMetricFamily(
            "portcullis_background_preempted", "Background (batch) requests that gave their slot up", labels=["model"]
        )
        background = GaugeMetricFamily(
            "portcullis_background_in_flight", "Background (batch) requests holding a slot", labels=["model"]
        )
        for o in self.admission.outlooks():
            depth.add_metric([o.model], o.depth)
            holding.add_metric([o.model], o.in_use)
            # An unbounded backend has no slot count: its gauge reads +Inf (it was a large sentinel before).
            capacity.add_metric([o.model], o.capacity if o.capacity is not None else float("inf"))
            preempted.add_metric([o.model], o.preempted)
            background.add_metric([o.model], o.background)
        yield depth
        yield holding
        yield capacity
        yield preempted
        yield background
