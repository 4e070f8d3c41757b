"""The quota store the quota stage talks to: Redis while it answers, and what `quota.on_store_error` says
while it does not. fail_open falls back to this process's own counters at `fallback_share` of each limit;
fail_closed refuses (`StoreDown`: the stage answers 503). A probe brings Redis back by itself.

It keeps the store protocol (quota/store.py: admit, extend, settle) and remembers which store holds each
reservation, so a request admitted in process while Redis was away settles in process, and one admitted in
Redis settles there. It also renews the Redis concurrency leases of the requests in flight.
"""

from __future__ import annotations

import asyncio
from typing import Any

from portcullis.config import QuotaConfig
from portcullis.obs.logging import detached
from portcullis.obs.metrics import Metrics
from portcullis.quota.redis_store import RedisQuotaStore
from portcullis.quota.resp import RedisReplyError, RedisUnavailable
from portcullis.quota.store import Alert, Ask, MemoryQuotaStore, Verdict

STORE_ERRORS = (RedisUnavailable, RedisReplyError)
_PROBE_S = 1.0


class StoreDown(Exception):
    """fail_closed, and Redis does not answer: limits cannot be checked."""


class FailoverStore:
    def __init__(
        self, redis: RedisQuotaStore | None, memory: MemoryQuotaStore, config: QuotaConfig, metrics: Metrics, log: Any
    ) -> None:
        self.redis = redis  # None: counters in this process only (no Redis configured)
        self.memory = memory
        self.config = config
        self.metrics = metrics
        self.log = log
        self.degraded = False  # Redis is away: on_store_error applies
        self.fail_open = config.on_store_error == "fail_open"
        self._local: set[str] = set()  # leases admitted in process while Redis was away (settled in process)
        self._leased: dict[str, Ask] = {}  # Redis concurrency leases held by requests in flight (renewed)
        self.settling: set[asyncio.Future[list[Alert]]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self.redis is not None:
            self._tasks.append(asyncio.create_task(self._renew_leases()))

    async def stop(self, timeout_s: float) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.settling:
            await asyncio.wait(list(self.settling), timeout=timeout_s)
        if self.redis is not None:
            await self.redis.close()

    # -- the store protocol -----------------------------------------------------------------------

    @property
    def local(self) -> bool:
        """Counters in this process only (no Redis configured): `admit_local` decides at once, no await."""
        return self.redis is None

    def admit_local(self, ask: Ask) -> Verdict:
        return self.memory.admit_now(ask)

    async def admit(self, ask: Ask) -> Verdict:
        redis = self.redis
        if redis is None:
            return self.memory.admit_now(ask)
        if not self.degraded:
            try:
                verdict = await redis.admit(ask)
            except STORE_ERRORS as exc:
                self.failed(exc)
            else:
                if verdict.admitted and ask.plan.holds_leases:
                    self._leased[ask.lease] = ask
                return verdict
        if not self.fail_open:
            raise StoreDown
        verdict = self.memory.admit_now(ask)
        if verdict.admitted:
            self._local.add(ask.lease)
        return verdict

    async def extend(self, ask: Ask, more: int) -> int:
        """More budget for a stream; when Redis fails mid-stream: all of it, uncharged (fail_open), or none."""
        if self.redis is None or ask.lease in self._local:
            return await self.memory.extend(ask, more)
        try:
            return await self.redis.extend(ask, more)
        except STORE_ERRORS as exc:
            self.failed(exc)
            return more if self.fail_open else 0

    async def settle(self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> list[Alert]:
        done = self.settle_soon(ask, tokens, cost, thresholds)
        return await done if isinstance(done, asyncio.Future) else (done or [])

    def settle_soon(
        self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]
    ) -> list[Alert] | asyncio.Future[list[Alert]] | None:
        """Settle without waiting: the alerts now (in process), a future of them (Redis), or None (Redis, carried
        along with this principal's next admission)."""
        if self.redis is None or ask.lease in self._local:
            self._local.discard(ask.lease)
            return self.memory.settle_now(ask, tokens, cost, thresholds)
        self._leased.pop(ask.lease, None)
        future = self.redis.settle_soon(ask, tokens, cost, thresholds)
        if future is not None:
            self.settling.add(future)
            future.add_done_callback(self.settling.discard)
        return future

    # -- Redis failure and recovery ---------------------------------------------------------------

    def failed(self, exc: BaseException) -> None:
        self.metrics.quota_store_errors.inc()
        if self.degraded or self.redis is None:
            return
        self.degraded = True
        self.metrics.quota_store_degraded.set(1)
        self.log.error(
            "quota_store_unavailable",
            error=str(exc),
            policy=self.config.on_store_error,
            detail=(
                f"in-process limits at {self.config.fallback_share:g} of each limit"
                if self.fail_open
                else "requests with quotas get 503 until Redis is back"
            ),
        )
        probe = asyncio.create_task(self._probe_until_back(), context=detached())  # not the request's: it lives on
        self._tasks.append(probe)
        probe.add_done_callback(self._tasks.remove)

    async def _probe_until_back(self) -> None:
        assert self.redis is not None
        while True:
            await asyncio.sleep(_PROBE_S)
            try:
                await self.redis.ping()
            except STORE_ERRORS:
                continue
            self.degraded = False
            self.metrics.quota_store_degraded.set(0)
            self.log.info("quota_store_recovered")
            return

    async def _renew_leases(self) -> None:
        assert self.redis is not None
        while True:
            await asyncio.sleep(self.config.concurrency_lease_s / 3)
            if self._leased and not self.degraded:
                try:
                    await self.redis.renew(list(self._leased.values()))
                except STORE_ERRORS as exc:
                    self.failed(exc)
