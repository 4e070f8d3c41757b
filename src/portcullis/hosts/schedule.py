"""Swap-aware scheduling of a host's models: which model is loaded, when a switch happens, who waits.

A host holds `max_models` models at once (and at most one of each `exclusive` set). Each of its models has a
`Seat`: its state (unloaded, loading, loaded, unloading, failed), the requests it has in flight and the requests
waiting for it. The upstream stage calls `enter` before an attempt on a host's replica and `leave` after it;
`enter` returns once the model is loaded and the request may go, so nothing is ever sent to a model that is not
loaded, and a model is never unloaded while it has requests in flight or loading (they finish first: a switch
*drains* the model it replaces).

The policy (`scheduling.policy`):
  swap_aware  the loaded models' requests go first. A switch to a waiting model happens when the model it would
              replace is idle (nothing in flight or waiting for `idle_s`), or when the waiting model's oldest
              request has waited `max_wait_s` less the time the replaced model's requests need to finish
              (learned): so no request waits much past `max_wait_s` plus one load. Among waiting models the one
              whose requests have the highest tier priority goes first, then the one waiting longest. Batch
              lines (background) never cause a switch in peak hours: they load a model only into free room.
  fifo        strictly in arrival order: a request waits behind every earlier one, and a switch begins as soon
              as the oldest request wants a model that is not loaded. What a server's own queue does.

A load nobody waits for any more (every request that wanted it went away) is cancelled. Loads are timed per
model (Retry-After and the switch's timing use it); a model whose load failed is not tried again for
`failed_retry_s`. A loaded model unused for `ttl_s` is unloaded (not a swap).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from portcullis.errors import GatewayTimeout, ServiceUnavailable, retry_after_headers
from portcullis.obs.logging import get_logger

if TYPE_CHECKING:
    from portcullis.config import HostConfig
    from portcullis.exchange import Exchange
    from portcullis.offpeak import OffPeak
    from portcullis.routing.catalog import Replica

log = get_logger("portcullis.hosts")


class SeatState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    SLEEPING = "sleeping"  # llama-server's --sleep-idle-seconds: still there, a request wakes it
    UNLOADING = "unloading"
    FAILED = "failed"  # its last load failed; not tried again before `retry_at`


_HELD = (SeatState.LOADING, SeatState.LOADED, SeatState.SLEEPING, SeatState.UNLOADING)  # occupy the host's room
_SERVING = (SeatState.LOADED, SeatState.SLEEPING)


class LoadFailed(Exception):
    """A model did not load (the message says why)."""


class Driver(Protocol):
    """What loads and unloads models on a host: a router-mode llama-server (router.py), launched processes
    (launch.py). `load` returns when the model serves; cancelling it cancels the load."""

    async def start(self, host: Host) -> None: ...

    async def stop(self) -> None: ...

    async def load(self, seat: Seat) -> None: ...

    async def unload(self, seat: Seat) -> None: ...

    def lost(self, seat: Seat) -> bool:
        """A connection to the seat's server failed during a request: True when the driver takes it as the model's
        server gone (it is then reloaded on demand) rather than the whole host's."""
        ...

    def details(self, seat: Seat) -> dict[str, object]:
        """What the driver knows of the model beyond the scheduler (a launched process's pid, its restarts)."""
        ...


@dataclass(eq=False, slots=True)
class _Waiter:
    fut: asyncio.Future[None]
    arrived: float
    priority: int
    background: bool


@dataclass(eq=False, slots=True)
class Seat:
    """One model on a host."""

    model: str  # the gateway's name
    upstream: str  # the server's name for it (router mode) or the model name again (launched)
    replica: Replica
    state: SeatState = SeatState.UNLOADED
    in_flight: int = 0
    waiters: list[_Waiter] = field(default_factory=list)
    draining: bool = False  # chosen to make room: its new requests wait, it unloads once its in-flight are done
    drain_cutoff: float = 0.0  # while draining: requests that came before this still go (they are its last batch)
    last_used: float = 0.0  # monotonic time a request last entered or left
    load_s: float | None = None  # learned load time (EWMA)
    service_s: float | None = None  # learned time a request holds the model (EWMA)
    loads: int = 0
    load_failures: int = 0
    error: str | None = None
    retry_at: float = 0.0  # FAILED: not before this (monotonic)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def serving(self) -> bool:
        return self.state in _SERVING


_EWMA = 0.3
_UNLOAD_TIMEOUT_S = 120.0  # an unload that has not ended by then is taken as done (the server is asked again later)


def _room(seat: Seat) -> float:
    """Requests the seat's model may have in flight: its slots once loaded (learned), else no limit known."""
    limit = seat.replica.slots if seat.replica.kind == "llama_cpp" else None
    configured = seat.replica.max_in_flight
    if configured is not None:
        return configured
    return limit if limit is not None and limit > 0 else float("inf")


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA * (new - old)


class Host:
    def __init__(
        self,
        name: str,
        config: HostConfig,
        seats: list[Seat],
        driver: Driver,
        *,
        offpeak: OffPeak | None = None,
        priority_of: Callable[[Exchange], int] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.settings = config.scheduling
        self.seats = {s.model: s for s in seats}
        self.driver = driver
        self.offpeak = offpeak
        self.priority_of = priority_of or (lambda ex: 0)
        # The room: configured, else what the server says (router mode: --models-max; 0 = unlimited), else one.
        self.server_max: int | None = None
        self.exclusive = [set(group) for group in config.exclusive]
        self.swaps = 0
        self.loads = 0
        self._swap_times: deque[float] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- the room ------------------------------------------------------------------------------------

    @property
    def max_models(self) -> int | None:
        """Models loaded at once (None: no limit)."""
        if self.config.max_models is not None:
            return self.config.max_models
        if self.server_max is not None:
            return self.server_max or None
        return 1 if self.config.kind == "launch" else None

    def _conflicts(self, seat: Seat, others: list[Seat]) -> list[Seat]:
        groups = [g for g in self.exclusive if seat.model in g]
        return [o for o in others if o is not seat and any(o.model in g for g in groups)]

    # -- the request path ----------------------------------------------------------------------------

    async def enter(self, replica: Replica, ex: Exchange | None, deadline: float) -> float:
        """Wait until the replica's model serves and this request may go (`deadline`: the loop's time); returns the
        seconds waited. Raises ServiceUnavailable (with Retry-After) or GatewayTimeout; a cancelled request leaves
        the queue. `ex` None: a side call of the gateway's own (a passthrough /tokenize, a guard model's verdict)."""
        seat = self.seats[replica.model]
        now = time.monotonic()
        if self._may_pass(seat):
            seat.in_flight += 1
            seat.last_used = now
            return 0.0
        if seat.state is SeatState.FAILED and now < seat.retry_at:
            raise self._failed(seat, now)
        waiting = sum(len(s.waiters) for s in self.seats.values())
        if waiting >= self.settings.max_queue:
            raise ServiceUnavailable(
                f"The host of model '{seat.model}' has {waiting} requests waiting for their models; retry later.",
                code="model_queue_full",
                headers=retry_after_headers(self.expected_wait(seat, now)),
            )
        background = ex is not None and ex.background
        if background and not self._off_peak() and not seat.serving and not self._free_room_for(seat):
            raise ServiceUnavailable(
                f"The model '{seat.model}' is not loaded and batch work does not swap models in peak hours.",
                code="no_idle_capacity",
                headers=retry_after_headers(self.expected_wait(seat, now)),
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), now, self.priority_of(ex) if ex is not None else 0, background)
        seat.waiters.append(waiter)
        self._schedule()
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(waiter.fut)
        except BaseException as exc:
            if waiter.fut.done() and not waiter.fut.cancelled() and waiter.fut.exception() is None:
                self._left(seat)  # let in at the moment it gave up: the place it was given goes back
            else:
                with contextlib.suppress(ValueError):
                    seat.waiters.remove(waiter)
                if not waiter.fut.done():
                    waiter.fut.cancel()
                self._schedule()
            if isinstance(exc, TimeoutError):
                raise GatewayTimeout(
                    f"The model '{seat.model}' did not load within this request's time limit.",
                    code="model_load_timeout",
                ) from None
            raise
        finally:
            waited = time.monotonic() - now
            if ex is not None:
                ex.queue_s += waited
        return waited

    def leave(self, replica: Replica, held_s: float) -> None:
        seat = self.seats[replica.model]
        seat.service_s = _ewma(seat.service_s, held_s)
        self._left(seat)

    def _left(self, seat: Seat) -> None:
        seat.in_flight -= 1
        seat.last_used = time.monotonic()
        self._schedule()

    def lost(self, replica: Replica) -> bool:
        """A request could not reach the replica's server: the driver judges (a launched process that died is
        reloaded for the retries)."""
        return self.driver.lost(self.seats[replica.model])

    def _may_pass(self, seat: Seat) -> bool:
        if not seat.serving or seat.draining or seat.waiters or seat.in_flight >= _room(seat):
            return False
        if self.settings.policy == "fifo":
            return not any(s.waiters for s in self.seats.values())
        return True

    def _off_peak(self) -> bool:
        return self.offpeak is not None and self.offpeak.active()

    def _failed(self, seat: Seat, now: float) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"The model '{seat.model}' failed to load ({seat.error}); it is tried again in a while.",
            code="model_load_failed",
            headers=retry_after_headers(max(1.0, seat.retry_at - now)),
        )

    def load_time(self, seat: Seat) -> float:
        """Its learned load time; before its first load, the mean of the host's other models', else the configured."""
        if seat.load_s is not None:
            return seat.load_s
        known = [s.load_s for s in self.seats.values() if s.load_s is not None]
        return sum(known) / len(known) if known else self.settings.load_s

    def expected_wait(self, seat: Seat, now: float | None = None) -> float:
        """An honest wait for a new request for this model: the switch's bound (or none when it serves or there is
        room), the replaced model's drain and one load."""
        now = time.monotonic() if now is None else now
        if seat.serving and not seat.draining:
            return 0.0
        if seat.state is SeatState.FAILED and now < seat.retry_at:
            return seat.retry_at - now
        if seat.state is SeatState.LOADING:
            started = seat.last_used
            return max(0.5, self.load_time(seat) - (now - started))
        wait = self.load_time(seat)
        if not self._free_room_for(seat):
            oldest = min((w.arrived for w in seat.waiters), default=now)
            wait += max(0.0, self.settings.max_wait_s - (now - oldest)) if self.settings.policy == "swap_aware" else 0.0
            wait += max((s.service_s or 0.0 for s in self.seats.values() if s.in_flight), default=0.0)
        return wait

    # -- the decisions ---------------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Look at everything and act: let waiters in, unload drained models, cancel loads nobody wants, begin a
        switch when one is due, and set a timer for the next moment something becomes due. Never waits."""
        if self.closed:
            return
        now = time.monotonic()
        seats = list(self.seats.values())
        wake: list[float] = []
        # 1. Waiters of serving models go in (fifo: in arrival order, up to the first that must wait for a switch).
        # At most the model's free slots at a time (the rest are let in as requests end), so a model that has just
        # loaded is not handed its whole queue at once to queue again inside the server.
        if self.settings.policy == "fifo":
            queue = sorted(((w.arrived, s, w) for s in seats for w in s.waiters), key=lambda t: t[0])
            for _, s, w in queue:
                if not s.serving or s.in_flight >= _room(s) or (s.draining and w.arrived >= s.drain_cutoff):
                    break
                self._admit(s, w)
        else:
            for s in seats:
                if s.waiters and s.serving:
                    for w in sorted(s.waiters, key=lambda w: (-w.priority, w.arrived)):
                        if s.in_flight >= _room(s):
                            break
                        if not s.draining or w.arrived < s.drain_cutoff:
                            self._admit(s, w)
        # 2. Loads nobody waits for are cancelled; drained models unload.
        for s in seats:
            if s.state is SeatState.LOADING and not s.waiters and not s.in_flight and s.task is not None:
                log.info("host_load_cancelled", host=self.name, model=s.model)
                s.task.cancel()
            elif s.draining and s.serving and s.in_flight == 0 and not self._last_batch(s):
                self._start_unload(s, swap=True)
        # 3. Idle models past their TTL unload.
        ttl = self.config.ttl_s
        if ttl is not None:
            for s in seats:
                if s.serving and not s.draining and not s.in_flight and not s.waiters:
                    due = s.last_used + ttl
                    if now >= due:
                        log.info("host_ttl_unload", host=self.name, model=s.model)
                        self._start_unload(s, swap=False)
                    else:
                        wake.append(due)
        # 4. The next model to load, and whether its switch is due. A switch whose requests all went away is undone:
        # the model that was draining for it serves again.
        candidate = self._candidate(seats, now)
        if candidate is None:
            for s in seats:
                if s.draining and s.serving:
                    log.info("host_switch_undone", host=self.name, model=s.model)
                    s.draining = False
                    self._set_replica(s)
                    for w in sorted(s.waiters, key=lambda w: (-w.priority, w.arrived)):
                        if s.in_flight >= _room(s):
                            break
                        self._admit(s, w)
        if candidate is not None:
            due_at = self._switch(candidate, seats, now)
            if due_at is not None:
                wake.append(due_at)
        for s in seats:
            if s.state is SeatState.FAILED and s.waiters and now < s.retry_at:
                wake.append(s.retry_at)
        self._set_timer(min(wake) if wake else None)

    def _last_batch(self, seat: Seat) -> list[_Waiter]:
        """A draining model's waiters that came before its switch was decided: served before it unloads."""
        return [w for w in seat.waiters if w.arrived < seat.drain_cutoff] if seat.draining else []

    def _admit(self, seat: Seat, waiter: _Waiter) -> None:
        seat.waiters.remove(waiter)
        if not waiter.fut.done():
            seat.in_flight += 1
            seat.last_used = time.monotonic()
            waiter.fut.set_result(None)

    def _candidate(self, seats: list[Seat], now: float) -> Seat | None:
        """The waiting model to load next (None: none waits for a model that is not there)."""
        waiting = [
            s
            for s in seats
            if s.waiters
            and (s.state is SeatState.UNLOADED or (s.state is SeatState.FAILED and now >= s.retry_at))
            and not s.draining
        ]
        # Batch lines in peak hours never cause a switch: a model only they wait for is a candidate only where it fits
        # without unloading anything (else it would block the switches other models' requests need).
        off_peak = self._off_peak()
        waiting = [s for s in waiting if off_peak or any(not w.background for w in s.waiters) or self._free_room_for(s)]
        if not waiting:
            return None
        if self.settings.policy == "fifo":
            return min(waiting, key=lambda s: s.waiters[0].arrived)
        # Interactive requests before batch lines (the room a switch made is theirs), then tiers, then the longest wait.
        return max(
            waiting,
            key=lambda s: (
                any(not w.background for w in s.waiters),
                max(w.priority for w in s.waiters),
                -min(w.arrived for w in s.waiters),
            ),
        )

    def _free_room_for(self, seat: Seat) -> bool:
        held = [s for s in self.seats.values() if s.state in _HELD and s is not seat]
        limit = self.max_models
        return (limit is None or len(held) < limit) and not self._conflicts(seat, held)

    def _switch(self, seat: Seat, seats: list[Seat], now: float) -> float | None:
        """Load `seat` now if there is room; else choose what it replaces and drain it when the switch is due.
        Returns when to look again (None: an event will make us look)."""
        held = [s for s in seats if s.state in _HELD and s is not seat]
        limit = self.max_models
        conflicts = self._conflicts(seat, held)
        over = (len(held) - limit + 1) if limit is not None else 0
        if not conflicts and over <= 0:
            self._start_load(seat)
            return None
        leaving = [s for s in held if s.draining or s.state is SeatState.UNLOADING]
        victims = [s for s in conflicts if s not in leaving]
        spare = [s for s in held if s not in leaving and s not in victims]
        needed = max(0, over - len(leaving) - len(victims))
        if needed:
            # Room by count: the ones nobody waits for, least in flight, least recently used.
            spare.sort(key=lambda s: (len(s.waiters), s.state is SeatState.LOADING, s.in_flight, s.last_used))
            victims += spare[:needed]
        if not victims:
            return None  # what must go is going already: its unload will make us look again
        if any(v.state is SeatState.LOADING for v in victims):
            return None  # a model still loading for its own waiters: the load ends first
        eligible = [w for w in seat.waiters if not w.background or self._off_peak()]
        if not eligible:
            return None  # batch lines in peak hours never cause a switch
        if self.settings.policy == "fifo":
            due_at = now
        else:
            idle_at = max(
                (v.last_used + self.settings.idle_s if not v.in_flight and not v.waiters else float("inf"))
                for v in victims
            )
            # What the replaced models still have to do: their requests in flight and queued, in rounds of their slots.
            drain = max(
                (
                    math.ceil((v.in_flight + len(v.waiters)) / _room(v)) * (v.service_s or 0.0)
                    for v in victims
                    if v.in_flight or v.waiters
                ),
                default=0.0,
            )
            due_at = min(idle_at, self._pressing_at(seat, seats, drain))
        if now < due_at:
            return due_at
        for v in victims:
            if not v.draining:
                log.info("host_switch", host=self.name, unload=v.model, load=seat.model, waiting=len(seat.waiters))
                v.draining = True
                # Its last batch: what came before the switch (fifo: before the request the switch is for).
                v.drain_cutoff = now if self.settings.policy == "swap_aware" else min(w.arrived for w in seat.waiters)
                self._set_replica(v)
            if v.in_flight == 0 and not self._last_batch(v):
                self._start_unload(v, swap=True)
        return None

    def _pressing_at(self, seat: Seat, seats: list[Seat], drain: float) -> float:
        """When the switch to `seat` must begin so that no waiting model's oldest request waits much past
        `max_wait_s`: the models waiting after it (in the order they will be served) need their switches too, each
        one load and the served model's requests later, so the first switch begins that much earlier."""
        after = [s for s in seats if s is not seat and s.waiters and not s.serving and s.state is not SeatState.LOADING]
        after.sort(key=lambda s: (-max(w.priority for w in s.waiters), min(w.arrived for w in s.waiters)))
        pressing = float("inf")
        ahead = drain  # what must happen before a model's load begins
        for s in (seat, *after):
            eligible = [w.arrived for w in s.waiters if not w.background or self._off_peak()]
            if eligible:
                pressing = min(pressing, min(eligible) + self.settings.max_wait_s - ahead)
            ahead += self.load_time(s) + self.serve_time(s)
        return pressing

    def serve_time(self, seat: Seat) -> float:
        """How long its waiting requests hold the model once it serves: rounds of its slots, each a request's time."""
        known = [s.service_s for s in self.seats.values() if s.service_s is not None]
        each = seat.service_s if seat.service_s is not None else (sum(known) / len(known) if known else 0.0)
        rounds = -(-len(seat.waiters) // max(1, seat.replica.slots))
        return rounds * each

    # -- loads and unloads -----------------------------------------------------------------------------

    def _start_load(self, seat: Seat) -> None:
        seat.state = SeatState.LOADING
        seat.last_used = time.monotonic()
        seat.error = None
        self._set_replica(seat)
        seat.task = asyncio.get_running_loop().create_task(self._load(seat), name=f"load {self.name}/{seat.model}")

    async def _load(self, seat: Seat) -> None:
        started = time.monotonic()
        log.info("host_load", host=self.name, model=seat.model)
        try:
            async with asyncio.timeout(self.settings.load_timeout_s):
                await self.driver.load(seat)
        except asyncio.CancelledError:
            # Nobody waits for it any more (or the gateway stops): the driver's own cancellation stopped the load.
            seat.state = SeatState.UNLOADED
            if self.closed:
                raise
        except Exception as exc:
            seat.state = SeatState.FAILED
            seat.load_failures += 1
            seat.error = "the load took too long" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            seat.retry_at = time.monotonic() + self.settings.failed_retry_s
            log.warning("host_load_failed", host=self.name, model=seat.model, error=seat.error)
            self._fail_waiters(seat)  # (at once: not after the clean-up below)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_UNLOAD_TIMEOUT_S):
                    await self.driver.unload(seat)
        else:
            took = time.monotonic() - started
            seat.load_s = _ewma(seat.load_s, took)
            seat.state = SeatState.LOADED
            seat.loads += 1
            self.loads += 1
            seat.last_used = time.monotonic()
            log.info("host_loaded", host=self.name, model=seat.model, seconds=round(took, 3))
        finally:
            seat.task = None
            self._set_replica(seat)
            self._schedule()

    def _start_unload(self, seat: Seat, *, swap: bool) -> None:
        seat.state = SeatState.UNLOADING
        self._set_replica(seat)
        if swap:
            self.swaps += 1
            self._swap_times.append(time.monotonic())
        seat.task = asyncio.get_running_loop().create_task(self._unload(seat), name=f"unload {self.name}/{seat.model}")

    async def _unload(self, seat: Seat) -> None:
        try:
            async with asyncio.timeout(_UNLOAD_TIMEOUT_S):
                await self.driver.unload(seat)
        except TimeoutError:
            log.warning("host_unload_timeout", host=self.name, model=seat.model, seconds=_UNLOAD_TIMEOUT_S)
        except asyncio.CancelledError:
            if self.closed:
                raise
        except Exception as exc:
            log.warning("host_unload_failed", host=self.name, model=seat.model, error=str(exc))
        finally:
            seat.task = None
            seat.draining = False
            seat.state = SeatState.UNLOADED
            self._set_replica(seat)
            self._schedule()

    # -- what the server says ----------------------------------------------------------------------------

    def observed(self, seat: Seat, state: SeatState, *, error: str | None = None) -> None:
        """The server's own view of a model (router mode's /models and its events; a launched process that ended):
        taken where it differs from ours and no load or unload of ours is under way."""
        if state is SeatState.FAILED:
            state = SeatState.UNLOADED  # not ours: it may load when asked
        if seat.task is not None or state is seat.state:
            return
        if state in (SeatState.LOADING, SeatState.UNLOADING):
            return  # someone else's load or unload: its end will be seen
        if state is SeatState.UNLOADED and seat.state is SeatState.FAILED and time.monotonic() < seat.retry_at:
            return  # our failed load, held off until retry_at (the server says only that nothing runs)
        log.info("host_model_changed", host=self.name, model=seat.model, old=seat.state.value, new=state.value)
        seat.state = state
        seat.error = error
        if not seat.serving:
            seat.draining = False
        self._set_replica(seat)
        self._schedule()

    def mark_failed(self, seat: Seat, error: str) -> None:
        """The model cannot serve (a launched process crash-looping): failed until `failed_retry_s` passes."""
        if seat.task is not None:
            return
        log.warning("host_model_failed", host=self.name, model=seat.model, error=error)
        seat.state = SeatState.FAILED
        seat.draining = False
        seat.error = error
        seat.load_failures += 1
        seat.retry_at = time.monotonic() + self.settings.failed_retry_s
        self._set_replica(seat)
        self._fail_waiters(seat)
        self._schedule()

    def _fail_waiters(self, seat: Seat) -> None:
        error = self._failed(seat, time.monotonic())
        for w in seat.waiters:
            if not w.fut.done():
                w.fut.set_exception(error)
        seat.waiters.clear()

    def _set_replica(self, seat: Seat) -> None:
        """The balancer and admission read the replica: a model not serving has no slots to count."""
        seat.replica.loaded = seat.serving and not seat.draining

    def _set_timer(self, at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, at - time.monotonic()) + 0.001
            self._timer = loop.call_later(delay, self._schedule)

    # -- life ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.driver.start(self)

    async def stop(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        error = ServiceUnavailable("The gateway is shutting down.", code="shutting_down")
        for s in self.seats.values():
            for w in s.waiters:
                if not w.fut.done():
                    w.fut.set_exception(error)
            s.waiters.clear()
            if s.task is not None:
                s.task.cancel()
        await asyncio.gather(*(s.task for s in self.seats.values() if s.task is not None), return_exceptions=True)
        await self.driver.stop()

    # -- what people read ------------------------------------------------------------------------------------

    def swaps_last_hour(self) -> int:
        cutoff = time.monotonic() - 3600
        while self._swap_times and self._swap_times[0] < cutoff:
            self._swap_times.popleft()
        return len(self._swap_times)

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "name": self.name,
            "kind": self.config.kind,
            "policy": self.settings.policy,
            "max_models": self.max_models,
            "exclusive": [sorted(g) for g in self.exclusive],
            "swaps": self.swaps,
            "swaps_last_hour": self.swaps_last_hour(),
            "loads": self.loads,
            "models": [
                {
                    "model": s.model,
                    "upstream_model": s.upstream,
                    "state": s.state.value,
                    "draining": s.draining,
                    "in_flight": s.in_flight,
                    "waiting": len(s.waiters),
                    "oldest_wait_s": round(now - min(w.arrived for w in s.waiters), 3) if s.waiters else None,
                    "load_s": round(s.load_s, 3) if s.load_s is not None else None,
                    "loads": s.loads,
                    "load_failures": s.load_failures,
                    "error": s.error,
                    "url": s.replica.url,
                    **self.driver.details(s),
                }
                for s in self.seats.values()
            ],
        }


class HostCollector(Collector):
    """Each host's models: state, requests in flight and waiting, learned load time; swaps and loads."""

    def __init__(self, hosts: dict[str, Host]) -> None:
        self.hosts = hosts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "portcullis_host_model_state",
            "A host's model state (1 for the current state)",
            labels=["host", "model", "state"],
        )
        waiting = GaugeMetricFamily(
            "portcullis_host_model_waiting", "Requests waiting for a host's model to load", labels=["host", "model"]
        )
        in_flight = GaugeMetricFamily(
            "portcullis_host_model_in_flight", "Requests a host's model is serving", labels=["host", "model"]
        )
        load = GaugeMetricFamily(
            "portcullis_host_model_load_seconds", "A model's learned load time on its host", labels=["host", "model"]
        )
        swaps = CounterMetricFamily(
            "portcullis_host_swaps", "Models unloaded to make room for another", labels=["host"]
        )
        loads = CounterMetricFamily("portcullis_host_loads", "Models loaded", labels=["host", "model"])
        for host in self.hosts.values():
            swaps.add_metric([host.name], host.swaps)
            for s in host.seats.values():
                for value in SeatState:
                    state.add_metric([host.name, s.model, value.value], 1.0 if s.state is value else 0.0)
                waiting.add_metric([host.name, s.model], len(s.waiters))
                in_flight.add_metric([host.name, s.model], s.in_flight)
                loads.add_metric([host.name, s.model], s.loads)
                if s.load_s is not None:
                    load.add_metric([host.name, s.model], s.load_s)
        yield from (state, waiting, in_flight, load, swaps, loads)
