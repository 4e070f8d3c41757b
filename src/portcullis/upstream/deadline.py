"""Time limits of upstream attempts, kept by one watchdog instead of a timer each.

`asyncio.timeout_at` measured 3.5 µs per request under uvloop (a libuv timer armed and disarmed), and
moving it after every stream event (the idle limit) another 4 µs per event. Here a request's limit is a
float in a dict: set when the attempt starts, moved with one assignment per event, and a task that
wakes every `tick_s` cancels the attempts past theirs. Limits are seconds long, so firing up to one tick
late is fine.
"""

from __future__ import annotations

import asyncio
import contextlib

TICK_S = 0.05
EXPIRED = "upstream deadline"  # the cancel message, for whoever reads a traceback


class Watch:
    __slots__ = ("expired", "task", "when")

    def __init__(self, task: asyncio.Task[None], when: float) -> None:
        self.task = task
        self.when = when  # loop time
        self.expired = False


class Deadlines:
    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self._watched: dict[Watch, None] = {}
        self._runner: asyncio.Task[None] | None = None

    def watch(self, when: float) -> Watch:
        """Cancel the current task at loop time `when` (move it with `watch.when = ...`)."""
        task = asyncio.current_task()
        assert task is not None
        watch = Watch(task, when)
        self._watched[watch] = None
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return watch

    def unwatch(self, watch: Watch) -> None:
        self._watched.pop(watch, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        watched = self._watched
        while True:
            await asyncio.sleep(self.tick_s)
            if not watched:
                continue
            now = loop.time()
            for watch in [w for w in watched if w.when <= now]:
                del watched[watch]
                watch.expired = True
                watch.task.cancel(EXPIRED)

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
