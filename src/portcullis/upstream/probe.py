"""Background health probes, one loop per replica.

llama-server: `GET /health` 200 is ready; 503 (its body says "Loading model") is warming, alive but
not serving; no answer or anything else is a failure. When a llama-server replica is (again) ready, the
prober reads `/props` for `total_slots` and the per-slot context `n_ctx`, which the balancer uses.
Other OpenAI-compatible backends have no /health: `GET /v1/models` answering 200 means ready.

Probes go over connections of their own (upstream/client.py), so a replica busy with thousands of
streams is still probed at once. And they have hysteresis, like HAProxy's rise and fall: a ready
replica is marked down after `down_after` failed probes in a row, and a down one ready after `up_after`
good ones, so one probe that was slow under load does not take a replica out, nor does one lucky answer
bring a crash-looping one back. Loading (503) is an answer, not a failure: it applies at once. The first
probe of a replica (its state unknown) decides at once too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from portcullis.config import HealthConfig
from portcullis.obs.logging import get_logger
from portcullis.routing.catalog import Replica, ReplicaState

log = get_logger("portcullis.health")


async def probe_once(replica: Replica, timeout_s: float) -> ReplicaState:
    assert replica.client is not None
    path = "/health" if replica.kind == "llama_cpp" else "/v1/models"
    try:
        status, _ = await replica.client.get(path, timeout_s=timeout_s)
    except (TimeoutError, OSError, Exception) as exc:
        replica.last_error = type(exc).__name__
        return ReplicaState.DOWN
    if status == 200:
        replica.last_error = None
        return ReplicaState.READY
    if status == 503 and replica.kind == "llama_cpp":
        replica.last_error = "loading"
        return ReplicaState.WARMING
    replica.last_error = f"status {status}"
    return ReplicaState.DOWN


async def learn_capacity(replica: Replica, timeout_s: float) -> None:
    """Read llama-server's /props: total_slots and the context per slot."""
    assert replica.client is not None
    try:
        status, props = await replica.client.get("/props", timeout_s=timeout_s)
    except Exception:
        return
    if status != 200 or not isinstance(props, dict):
        return
    slots = props.get("total_slots")
    if isinstance(slots, int) and slots > 0:
        replica.slots = slots
    settings = props.get("default_generation_settings")
    if isinstance(settings, dict) and isinstance(settings.get("n_ctx"), int):
        replica.n_ctx = settings["n_ctx"]


async def update(replica: Replica, config: HealthConfig) -> bool:
    """Probe once; True when the replica's state or capacity changed."""
    state = await probe_once(replica, config.timeout_s)
    state = _with_hysteresis(replica, state, config)
    slots = replica.slots
    if state is ReplicaState.READY and replica.kind == "llama_cpp" and replica.state is not ReplicaState.READY:
        await learn_capacity(replica, config.timeout_s)
    if state is replica.state:
        return slots != replica.slots
    log.info(
        "replica_state",
        model=replica.model,
        replica=replica.name,
        old=replica.state.value,
        new=state.value,
        reason=replica.last_error,
    )
    replica.state = state
    return True


def _with_hysteresis(replica: Replica, seen: ReplicaState, config: HealthConfig) -> ReplicaState:
    """The state a probe's result leads to, given the results before it."""
    streak = replica.probe_streak
    current = replica.state
    if seen is ReplicaState.READY:
        replica.probe_streak = streak = max(streak, 0) + 1
        if current is ReplicaState.DOWN and streak < config.up_after:
            return current
        return seen
    if seen is ReplicaState.DOWN:
        replica.probe_streak = streak = min(streak, 0) - 1
        if current in (ReplicaState.READY, ReplicaState.WARMING) and -streak < config.down_after:
            return current
        return seen
    replica.probe_streak = 0
    return seen


class Prober:
    def __init__(
        self, replicas: list[Replica], config: HealthConfig, on_change: Callable[[Replica], None] | None = None
    ) -> None:
        self.replicas = replicas
        self.config = config
        self.on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    async def first_round(self) -> None:
        """Probe every replica once, so the gateway starts with a known picture."""
        if not self.replicas:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.startup_probe_timeout_s or None):
                await asyncio.gather(*(update(r, self.config) for r in self.replicas))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(r)) for r in self.replicas]

    async def _loop(self, replica: Replica) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                if await update(replica, self.config) and self.on_change is not None:
                    self.on_change(replica)
            except Exception:
                log.exception("probe_failed", model=replica.model, replica=replica.name)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
