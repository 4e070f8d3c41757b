"""The batch runner: executes batch lines on the gateway's own backends, only with capacity to spare.

Every gateway process runs one. Each round (every `batch.poll_s`, and at once when a line ends or a
batch arrives) it looks at the live batches, nearest deadline first, and for each one it may run now:

  when     off-peak (`scheduling.off_peak`) always; in peak hours per `batch.in_peak`: `when_needed`
           runs a batch only if the off-peak time left before its deadline is too short for the lines
           left at the pace the model has shown (with a 1.5x margin), so it still finishes in time;
  how many the model's idle slots (the admission outlook's idle slots: nobody queued, `batch.reserve_slots` kept free)
           and this process's `batch.max_in_flight`; it leases that many lines (jobs/store.py);
  each     runs through the gateway's own request path as a background request of the batch's owner:
           validation, routing, quotas and budgets, usage records, retries, exactly as if the owner had
           sent it, except that it never queues and gives its slot up (preempted) when an interactive
           request would have to wait.

A line that was refused for a passing reason (no idle slot, preempted, overloaded, rate-limited, the
gateway stopping) goes back to pending and runs again after a delay; any other answer is its result:
2xx into the output file, errors into the error file. Results are written in batches, each only while
this process still holds the line's lease. Leases are renewed while lines run; a process that dies
leaves leases that expire, and whoever runs next takes those lines again (a request may then have run
twice upstream; its output line is still written exactly once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from portcullis.identity.auth import may_use
from portcullis.identity.keys import now as utc_now
from portcullis.identity.principal import Principal
from portcullis.jobs.store import BatchStore, Line
from portcullis.obs.logging import get_logger
from portcullis.offpeak import OffPeak

if TYPE_CHECKING:
    from portcullis.config import Config
    from portcullis.identity.keys import KeyStore
    from portcullis.routing.admission import Admission
    from portcullis.routing.catalog import Catalog

log = get_logger("portcullis.batch")

# Answers that say "not now" rather than "no": the line runs again later.
_TRANSIENT = frozenset(
    {
        "no_idle_capacity",
        "preempted",
        "overloaded",
        "no_ready_replica",
        "model_loading",
        "server_shutting_down",
        "quota_store_unavailable",
        "rate_limit_exceeded",
        "off_peak_only",
        "upstream_unavailable",
        "upstream_rate_limited",
    }
)
_FINALIZE_EVERY_S = 2.0
_SWEEP_MAX_S = 60.0  # the longest wait between two sweeps of expired files
_SAFETY = 1.5  # how much longer than the measured pace a batch is assumed to need


@dataclass(frozen=True, slots=True)
class Answer:
    """What a request the gateway made to itself got: the status and body as a client would have, and a
    refusal as a value (its code, and how long it asked us to wait), so nobody parses the body for them."""

    status: int
    body: bytes
    error: str | None = None  # the error code when status >= 400 (the exchange's error_code)
    retry_after_s: float = 0.0  # Retry-After of a refusal (0: none)


class InternalCall(Protocol):
    """One request through the whole request path as `principal`, in the background (app/internal.py)."""

    async def __call__(
        self, method: str, path: str, body: bytes, principal: Principal, *, request_id: str
    ) -> Answer: ...


@dataclass(slots=True)
class _Running:
    batch_id: str
    model: str
    owner: str  # the batch's key id (or user): concurrency limits are theirs
    task: asyncio.Task[None]


class BatchRunner:
    def __init__(
        self,
        config: Config,
        store: BatchStore,
        *,
        call: InternalCall,
        admission: Admission,
        catalog: Catalog,
        concurrency_of: Callable[[Principal], int | None],
        scope_of: Callable[[str], str],
        keys: Callable[[], KeyStore | None],
    ) -> None:
        self.store = store
        self.config = config.batch
        self.offpeak = OffPeak(config.scheduling.off_peak)
        self.call = call  # a line's request, through the whole request path
        self.admission = admission  # idle slots, and how fast lines run (its outlook)
        self.catalog = catalog  # a router's candidates
        self.concurrency_of = concurrency_of  # an owner's concurrency limit (the quota stage's plan)
        self.scope_of = scope_of  # the scope a client needs for an endpoint (the route table)
        self.keys = keys  # the key store, once the preflight made it (None: no API keys)
        self.owner = f"{os.uname().nodename[:40]}:{os.getpid()}:{os.urandom(3).hex()}"
        self.running: dict[int, _Running] = {}  # line id → its task
        self._finished: list[tuple[int, str, str, float]] = []
        self._released: list[tuple[int, float]] = []
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_finalize: dict[str, float] = {}
        self._principals: dict[str, tuple[Principal | None, float]] = {}
        self._held: dict[str, float] = {}  # batch id → not before (POSIX time), after a rate-limit refusal
        self.stopping = False
        self.lines_done = 0
        self._last_cleanup = 0.0
        # Expired files are deleted this often (they are unreadable from the moment they expire; this frees
        # their storage): every minute, or as often as files expire when they live shorter than that.
        self._sweep_s = min(_SWEEP_MAX_S, self.config.file_ttl_s or _SWEEP_MAX_S)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._rounds()),
            loop.create_task(self._writer()),
            loop.create_task(self._renew()),
        ]

    def collector(self) -> Collector:
        """The lines this process ran, read at scrape time."""
        return _LinesCollector(self)

    def wake(self) -> None:
        self._wake.set()

    def drain(self) -> None:
        """SIGTERM: lease nothing more; running lines are stopped and go back to pending at once."""
        self.stopping = True
        for running in list(self.running.values()):
            running.task.cancel()

    async def stop(self) -> None:
        self.drain()
        if self.running:
            await asyncio.gather(*(r.task for r in self.running.values()), return_exceptions=True)
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush()  # what ended (or was released) is written before the process goes

    # -- rounds ---------------------------------------------------------------------------------

    async def _rounds(self) -> None:
        while not self.stopping:
            try:
                await self.round()
            except Exception:
                log.exception("batch_round_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
            self._wake.clear()

    async def round(self) -> None:
        now = time.time()
        if now - self._last_cleanup >= self._sweep_s:
            self._last_cleanup = now
            removed = await self.store.delete_expired_files(now)
            if removed:
                log.info("batch_files_expired", files=removed)
        for batch in await self.store.active():
            if batch.status == "cancelling":
                self._stop_lines(batch.id)
                await self._maybe_finalize(batch.id, now, force=True)
                continue
            if now >= batch.expires_at:
                self._stop_lines(batch.id)  # (what they would answer now goes nowhere: the batch has expired)
                await self._maybe_finalize(batch.id, now, force=True)
                continue
            if self.stopping or not await self._may_run(batch, now):
                await self._maybe_finalize(batch.id, now)
                continue
            if self._held.get(batch.id, 0.0) > now:
                continue  # its owner's rate limit said when to come back
            # (finite: the runner's own bound is a number even when the model's slots are not)
            room = int(min(self._idle(batch.model), self.config.max_in_flight - len(self.running)))
            room = min(room, await self._owner_room(batch))
            if room <= 0:
                continue
            lines = await self.store.claim(batch.id, self.owner, room, now, self.config.lease_s)
            if not lines:
                await self._maybe_finalize(batch.id, now)
                continue
            owner = _owner_of(batch)
            for line in lines:
                task = asyncio.get_running_loop().create_task(self._run_line(batch, line))
                self.running[line.id] = _Running(batch.id, batch.model, owner, task)

    async def _owner_room(self, batch: Any) -> int:
        """Lines the batch's owner may have in flight beside those running here (their concurrency limit),
        so a batch does not spend its owner's quota on refusals."""
        principal = await self._principal(batch)
        if principal is None:
            return 1  # one line, to record why it cannot run
        limit = self.concurrency_of(principal)
        if limit is None:
            return self.config.max_in_flight  # no concurrency limit: the runner's own bounds the lines
        owner = _owner_of(batch)
        mine = sum(1 for r in self.running.values() if r.owner == owner)
        return limit - mine

    def _idle(self, model: str) -> float:
        router = self.catalog.routers.get(model)
        models = router.candidates if router is not None else [model]  # (a batch's model is resolved)
        outlooks = [o for m in models if (o := self.admission.outlook(m)) is not None]
        # Lines started but not yet holding their slot count against the idle ones.
        started = sum(1 for r in self.running.values() if r.model == model)
        idle = sum(o.idle for o in outlooks)
        holding = sum(o.background for o in outlooks)
        return idle - max(0, started - holding)

    async def _may_run(self, batch: Any, now: float) -> bool:
        if self.offpeak.active(now):
            return True
        if self.config.in_peak != "when_needed":
            return self.config.in_peak == "always"
        counts = await self.store.counts(batch.id)
        left = counts.get("pending", 0) + counts.get("leased", 0)
        outlook = self.admission.outlook(batch.model)
        service = outlook.service_s if outlook is not None and outlook.service_s is not None else 1.0
        slots = 1
        if outlook is not None:  # an unbounded backend: as if its lines all ran at once
            slots = max(1, (outlook.capacity if outlook.capacity is not None else left) - self.config.reserve_slots)
        return needed_now(
            left=left,
            service_s=service,
            slots=slots,
            off_peak_left_s=self.offpeak.seconds_between(now, batch.expires_at),
            margin_s=self.config.poll_s,
        )

    async def _maybe_finalize(self, batch_id: str, now: float, *, force: bool = False) -> None:
        if not force and now - self._last_finalize.get(batch_id, 0.0) < _FINALIZE_EVERY_S:
            return
        self._last_finalize[batch_id] = now
        if any(r.batch_id == batch_id for r in self.running.values()):
            if not force:
                return
        await self._flush()
        status = await self.store.finalize(batch_id, now, ttl_s=self.config.file_ttl_s)
        if status is not None:
            self._last_finalize.pop(batch_id, None)
            self._held.pop(batch_id, None)
            log.info("batch_ended", batch_id=batch_id, status=status)

    def _stop_lines(self, batch_id: str) -> None:
        for running in self.running.values():
            if running.batch_id == batch_id:
                running.task.cancel()

    # -- one line -------------------------------------------------------------------------------

    async def _run_line(self, batch: Any, line: Line) -> None:
        request_id = f"batch_req_{batch.id[6:]}_{line.line_no}"
        try:
            principal = await self._principal(batch)
            if principal is None:
                result = _error_line(
                    request_id,
                    line.custom_id,
                    401,
                    "invalid_api_key",
                    "The API key that created this batch is no longer valid.",
                )
                self._finished.append((line.id, "failed", result, time.time()))
                return
            refused = self._not_granted(batch, line, principal)
            if refused is not None:
                result = _error_line(request_id, line.custom_id, 403, *refused)
                self._finished.append((line.id, "failed", result, time.time()))
                return
            answer = await self.call("POST", batch.endpoint, line.body.encode(), principal, request_id=request_id)
        except asyncio.CancelledError:
            # Cancelled batch or gateway stopping: back to pending (a cancelled batch's finalize marks it).
            self._released.append((line.id, 0.0))
            raise
        finally:
            self.running.pop(line.id, None)
            self._wake.set()
        status, body = answer.status, answer.body
        code = answer.error if status >= 400 else None
        if code in _TRANSIENT:  # (a spent budget, 429 budget_exceeded, is an answer: it stays)
            wait = max(self.config.retry_delay_s, answer.retry_after_s)
            self._released.append((line.id, time.time() + wait))
            if code == "rate_limit_exceeded":  # the owner's limit: the whole batch waits, not just this line
                self._held[batch.id] = time.time() + wait
            return
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = {"error": {"message": body.decode(errors="replace"), "type": "server_error"}}
        result = orjson.dumps(
            {
                "id": request_id,
                "custom_id": line.custom_id,
                "response": {"status_code": status, "request_id": request_id, "body": parsed},
                "error": None,
            }
        ).decode()
        self._finished.append((line.id, "done" if status < 400 else "failed", result, time.time()))
        self.lines_done += 1

    def _not_granted(self, batch: Any, line: Line, principal: Principal) -> tuple[str, str] | None:
        """(code, message) when the key, as it is now, may not make this line's request: it lacks the scope
        of the batch's endpoint, or its model allow-list no longer names the line's model. (The request path
        trusts an internal request's principal, so the scope is checked here; the model would be refused
        there too, but not before the request had been validated and routed.)"""
        needed = self.scope_of(batch.endpoint)  # the scope a client needs for the endpoint
        if needed not in principal.scopes:
            return "missing_scope", f"The API key that created this batch no longer has the scope '{needed}'."
        if principal.models is not None:
            try:
                asked = orjson.loads(line.body).get("model")
            except (orjson.JSONDecodeError, AttributeError):
                asked = None
            if not isinstance(asked, str) or not may_use(principal, asked, batch.model):
                return "model_not_allowed", f"The API key that created this batch no longer allows the model '{asked}'."
        return None

    async def _principal(self, batch: Any) -> Principal | None:
        """Who the lines run as: the batch's key as it is now (a revoked key stops its batches), or the
        snapshot taken at submission for a JWT or anonymous principal."""
        cached = self._principals.get(batch.id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        snap = batch.principal
        principal: Principal | None
        key_id = snap.get("key_id")
        keys = self.keys()
        if key_id and keys is not None:
            record = await keys.get(key_id)
            principal = record.principal() if record is not None and record.usable_at(utc_now()) else None
        else:
            principal = Principal(
                user=snap["user"],
                tier=snap["tier"],
                scopes=frozenset(snap.get("scopes") or ()),
                models=frozenset(snap["models"]) if snap.get("models") is not None else None,
                key_id=None,
                via=snap.get("via", "jwt"),
            )
        self._principals[batch.id] = (principal, time.monotonic() + 5.0)
        return principal

    # -- writing results ------------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self._finished or self._released:
                try:
                    await self._flush()
                except Exception:
                    log.exception("batch_results_write_failed")
                    await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        finished, self._finished = self._finished, []
        released, self._released = self._released, []
        if not finished and not released:
            return
        try:
            await self.store.settle(self.owner, finished, released)
        except BaseException:
            self._finished[:0] = finished  # kept for the next try
            self._released[:0] = released
            raise

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            try:
                await self.store.renew(list(self.running), self.owner, time.time() + self.config.lease_s)
            except Exception:
                log.exception("batch_lease_renewal_failed")


def _owner_of(batch: Any) -> str:
    """Whose limits a batch's lines run under: its key, or its user for a JWT principal."""
    return str(batch.principal.get("key_id") or batch.principal.get("user"))


def needed_now(*, left: int, service_s: float, slots: int, off_peak_left_s: float, margin_s: float) -> bool:
    """In peak hours: must a batch run now to finish in time? Yes when the off-peak time left before its
    deadline is shorter than its lines need at the model's pace (service time per slot, x1.5)."""
    return off_peak_left_s < left * service_s / max(1, slots) * _SAFETY + margin_s


def _error_line(request_id: str, custom_id: str, status: int, code: str, message: str) -> str:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return orjson.dumps(
        {
            "id": request_id,
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
    ).decode()


class _LinesCollector(Collector):
    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[CounterMetricFamily]:
        lines = CounterMetricFamily("portcullis_batch_lines", "Batch lines this process ran to an answer")
        lines.add_metric([], self.runner.lines_done)
        yield lines
