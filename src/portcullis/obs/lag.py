"""How late this process's event loop runs: a timeout seen while the gateway itself was too busy to notice
an answer in time is no evidence against whoever it waited for.

A burst of thousands of connections can hold the loop for seconds. Every deadline kept on the loop then
fires with the answers it waited for still unread in the kernel's buffers: a key lookup "times out"
against a healthy database, a connect against a healthy replica. So the deadlines that judge others (the
database's health, a replica's breaker) ask `busy()` first: a task wakes every `_TICK_S` and records how
late it woke; busy means it was late by more than `_LATE_S` within the last `_WINDOW_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

_TICK_S = 0.05
_LATE_S = 0.25
_WINDOW_S = 5.0


class LoopLag:
    def __init__(self) -> None:
        self.last_late = -1e9  # monotonic time the loop was last found late
        self.worst_s = 0.0  # the longest lateness seen (a gauge for the curious)
        self._task: asyncio.Task[None] | None = None
        self._users = 0  # gateways in this process that started it (tests run several)

    def start(self) -> None:
        self._users += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        clock = time.monotonic
        while True:
            expected = clock() + _TICK_S
            await asyncio.sleep(_TICK_S)
            late = clock() - expected
            if late > _LATE_S:
                self.last_late = clock()
                self.worst_s = max(self.worst_s, late)

    def busy(self) -> bool:
        """Was the loop too busy lately to take its own timeouts as evidence?"""
        return time.monotonic() - self.last_late < _WINDOW_S

    async def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._task is not None and not self._users:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# One per process: the loop it watches is the process's.
LAG = LoopLag()
