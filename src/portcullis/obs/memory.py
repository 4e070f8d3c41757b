"""Giving memory back to the operating system after a spike.

A spike of thousands of open streams grows the process by hundreds of MB: each holds buffers (uvicorn's,
aiohttp's, ours) that glibc's malloc keeps for reuse once they are freed, and CPython keeps its own
arenas while any object lives in them. Nothing leaks, but the resident size stays at the peak, and a
container sized for the usual load is killed at the next spike. So once the spike is over (the requests
in flight fell to a quarter of their peak and stayed there for `_CALM_S`), this collects garbage and asks
glibc to return free pages (`malloc_trim`, in a thread: it walks the heap). Once per spike, never on
the request path. Without glibc (musl, macOS) only the collection runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable, Sized
from typing import Any

_SAMPLE_S = 1.0
_CALM_S = 5.0  # how long the load must stay low before trimming
_MIN_PEAK = 256  # requests in flight that count as a spike


def _malloc_trim() -> Callable[[int], Any] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryReturn:
    def __init__(self, in_flight: Sized, log: Any) -> None:
        self.in_flight = in_flight
        self.log = log
        self.trims = 0
        self._trim = _malloc_trim()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        peak = 0
        calm_since: float | None = None
        while True:
            await asyncio.sleep(_SAMPLE_S)
            now_in_flight = len(self.in_flight)
            peak = max(peak, now_in_flight)
            if peak < _MIN_PEAK or now_in_flight > peak // 4:
                calm_since = None
                continue
            if calm_since is None:
                calm_since = time.monotonic()
            if time.monotonic() - calm_since < _CALM_S:
                continue
            await self.give_back(peak)
            peak, calm_since = now_in_flight, None

    async def give_back(self, peak: int = 0) -> None:
        t0 = time.perf_counter()
        gc.collect()
        if self._trim is not None:
            await asyncio.to_thread(self._trim, 0)
        self.trims += 1
        self.log.info("memory_returned", after_peak_in_flight=peak, took_ms=round((time.perf_counter() - t0) * 1000, 1))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
