"""Whether the database answers, as one process sees it.

The database holds the truth (keys, usage, batches) but is not on the hot path: a verified key is cached,
usage is queued. So a database that fails or hangs is a degraded gateway, not a down one. Whoever sees a
call fail or pass its deadline says so here (`failed`); from then on the database is *degraded*: logged
once, `portcullis_database_degraded` is 1, `/readyz` says so while staying 200 (a gateway that still
serves every known key must stay in its load balancer), and the key cache serves verified keys without
waiting for the database. A probe (`SELECT 1` under the same deadline) runs every second meanwhile; the
first call that succeeds, the probe's or anyone's, clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from portcullis.obs.lag import LAG
from portcullis.obs.logging import detached

_PROBE_S = 1.0


class DatabaseHealth:
    def __init__(self, engine: AsyncEngine, *, timeout_s: float, log: Any, metrics: Any = None) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.log = log
        self.degraded = False
        self.since: float | None = None  # time.time() it became degraded
        self.last_error: str | None = None  # the message, for the log
        self.last_error_kind: str | None = None  # only the exception's class, for /readyz
        self.gauge = metrics.database_degraded if metrics is not None else None
        self._probe: asyncio.Task[None] | None = None

    def failed(self, exc: BaseException) -> None:
        """A call failed or passed its deadline."""
        if isinstance(exc, TimeoutError) and LAG.busy():
            return  # our own loop was too busy to read the answer in time: no evidence against the database
        self._note(exc)
        if self.degraded:
            return
        self.degraded = True
        self.since = time.time()
        if self.gauge is not None:
            self.gauge.set(1)
        self.log.error("database_degraded", error=self.last_error)
        with contextlib.suppress(RuntimeError):  # no running loop: nobody to probe for (tests)
            # Detached: the request that noticed the outage must not label the probe's lines (database_recovered).
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back(), context=detached())

    def succeeded(self) -> None:
        if not self.degraded:
            return
        self.degraded = False
        down_s = time.time() - (self.since or time.time())
        self.since = None
        if self.gauge is not None:
            self.gauge.set(0)
        self.log.info("database_recovered", degraded_s=round(down_s, 3))
        probe, self._probe = self._probe, None
        if probe is not None and probe is not asyncio.current_task():
            probe.cancel()

    async def _probe_until_back(self) -> None:
        while self.degraded:
            await asyncio.sleep(_PROBE_S)
            try:
                async with asyncio.timeout(self.timeout_s):
                    async with self.engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
            except Exception as exc:
                self._note(exc)
                continue
            self.succeeded()

    def _note(self, exc: BaseException) -> None:
        # The message may quote SQL with other tenants' values (a failed usage INSERT carries users, key ids
        # and request ids): the log has it, a lone surrogate escaped so that the JSON line can be written.
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        self.last_error = text.encode("utf-8", "backslashreplace").decode()
        self.last_error_kind = type(exc).__name__

    def status(self) -> dict[str, Any]:
        """For /readyz, which anyone may call: the state and the kind of failure, never its message."""
        if not self.degraded:
            return {"state": "ok"}
        return {"state": "degraded", "since": self.since, "error": self.last_error_kind}

    async def stop(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
