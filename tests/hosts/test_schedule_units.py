"""The host scheduler's decisions in the cases a load test reaches only by chance, driven directly: the driver here
loads and unloads by waiting (the real drivers, router mode and launched processes, have their tests beside)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from portcullis.config import HostConfig
from portcullis.hosts.schedule import Host, Seat
from portcullis.routing.catalog import Replica


class WaitingDriver:
    async def start(self, host: Host) -> None: ...

    async def stop(self) -> None: ...

    async def load(self, seat: Seat) -> None:
        await asyncio.sleep(0.1)

    async def unload(self, seat: Seat) -> None:
        await asyncio.sleep(0.02)

    def lost(self, seat: Seat) -> bool:
        return True

    def details(self, seat: Seat) -> dict[str, object]:
        return {}


class Peak:
    def __init__(self) -> None:
        self.off_peak = True

    def active(self) -> bool:
        return self.off_peak


def host(models: str, peak: Peak | None = None, **scheduling: Any) -> tuple[Host, dict[str, Replica]]:
    replicas = {
        m: Replica(model=m, name="box", url="http://127.0.0.1:1", kind="llama_cpp", upstream_model=None, weight=1)
        for m in models
    }
    for r in replicas.values():
        r.slots, r.loaded = 4, False
    seats = [Seat(model=m, upstream=m, replica=r) for m, r in replicas.items()]
    conf = HostConfig(kind="launch", max_models=1, scheduling=scheduling)
    return Host("box", conf, seats, WaitingDriver(), offpeak=peak), replicas  # type: ignore[arg-type]


def request(background: bool = False) -> Any:
    return SimpleNamespace(background=background, queue_s=0.0, principal=None, low_priority=False)


def test_a_model_only_batch_lines_wait_for_in_peak_hours_does_not_hold_up_the_others() -> None:
    async def run() -> float:
        peak = Peak()
        box, r = host("abc", peak, max_wait_s=0.5, idle_s=0.1)
        loop = asyncio.get_running_loop()
        await box.enter(r["a"], request(), loop.time() + 5)  # a loaded, one request in flight
        batch = asyncio.create_task(box.enter(r["b"], request(background=True), loop.time() + 30))
        await asyncio.sleep(0.01)
        peak.off_peak = False  # peak hours begin: b's batch line may not cause a switch any more
        started = time.monotonic()
        interactive = asyncio.create_task(box.enter(r["c"], request(), loop.time() + 3))
        await asyncio.sleep(0.05)
        box.leave(r["a"], 0.05)  # a is idle: c's switch is due
        await interactive
        waited = time.monotonic() - started
        assert box.seats["b"].state.value == "unloaded" and len(box.seats["b"].waiters) == 1
        batch.cancel()
        await box.stop()
        return waited

    assert asyncio.run(run()) < 1.0  # (before: a 504 after 3 s, c never loaded while a sat idle)


def test_a_switch_whose_requests_gave_up_is_undone() -> None:
    async def run() -> tuple[float, int]:
        box, r = host("ab", max_wait_s=0.2, idle_s=5)
        loop = asyncio.get_running_loop()
        await box.enter(r["a"], request(), loop.time() + 5)  # a long request of a's in flight
        gives_up = asyncio.create_task(box.enter(r["b"], request(), loop.time() + 0.4))
        await asyncio.sleep(0.6)  # b's switch began (a draining), then b gave up
        assert gives_up.done() and isinstance(gives_up.exception(), Exception)
        started = time.monotonic()
        await box.enter(r["a"], request(), loop.time() + 2)  # a serves again at once
        waited = time.monotonic() - started
        box.leave(r["a"], 1.0)
        box.leave(r["a"], 0.01)
        loads = box.loads
        await box.stop()
        return waited, loads

    waited, loads = asyncio.run(run())
    assert waited < 0.1 and loads == 1  # (before: it waited for a's long request, then a unloaded and loaded again)
