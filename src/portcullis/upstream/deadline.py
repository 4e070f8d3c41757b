"""Time limits of upstream attempts, kept by one watchdog instead of a timer each.

`asyncio.timeout_at` measured 3.5 µs per request under uvloop (a libuv timer armed and disarmed), and
moving it after every stream event (the idle limit) another 4 µs per event; a watch object per attempt
in a dict still cost 0.6 µs. Here an attempt's limit is a float on its exchange (`ex.deadline`, loop
time, 0 for none): set when the attempt starts, moved with one assignment per stream event, and a task
that wakes every `tick_s` cancels the exchanges past theirs (the gateway keeps the set of live
exchanges anyway). Limits are seconds long, so firing up to one tick late is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import TYPE_CHECKING

from portcullis.exchange import Abort

if TYPE_CHECKING:
    from portcullis.exchange import Exchange

TICK_S = 0.05


class Deadlines:
    def __init__(self, exchanges: Collection[Exchange], tick_s: float = TICK_S) -> None:
        self.exchanges = exchanges
        self.tick_s = tick_s
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            expired = [ex for ex in self.exchanges if 0.0 < ex.deadline <= now]
            for ex in expired:
                ex.deadline = 0.0
                ex.abort(Abort.DEADLINE)

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
