"""Background health probes, one loop per replica.

llama-server: `GET /health` 200 is ready; 503 (its body says "Loading model") is warming, alive but
not serving; no answer or anything else is a failure. When a llama-server replica is (again) ready, the
prober reads `/props` for `total_slots` and the per-slot context `n_ctx`, which the balancer uses.
Other OpenAI-compatible backends have no /health: `GET /v1/models` answering 200 means ready.

A probe judges the replica, so nothing of the gateway's own may stand in its way. Probes go over
connections of their own (opened per probe, closed after it), never waiting behind traffic for a pooled
one, and they run on an event loop of their own in a thread: a gateway whose loop is busy with a burst of
thousands of requests would otherwise see every probe time out, with the replica's answer unread in the
kernel's buffer, and take a healthy replica out. The results are applied on the gateway's loop.

And they have hysteresis, like HAProxy's rise and fall: a ready replica is marked down after
`down_after` failed probes in a row, and a down one ready after `up_after` good ones, so one probe that
was slow under load does not take a replica out, nor does one lucky answer bring a crash-looping one
back. Loading (503) is an answer, not a failure: it applies at once. The first probe of a replica (its
state unknown) decides at once too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from portcullis.config import HealthConfig
from portcullis.obs.logging import get_logger
from portcullis.routing.catalog import Replica, ReplicaState

log = get_logger("portcullis.health")


class ProbeClient:
    """GETs on an event loop in a thread of its own, each on a connection of its own."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=self._run, name="portcullis-probes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def get(self, url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, Any]:
        """(status, parsed JSON or None); raises what the request raised. Awaited on the caller's loop."""
        status, raw = await self._on_thread(url, headers, timeout_s)
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, None

    async def get_text(self, url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, str]:
        status, raw = await self._on_thread(url, headers, timeout_s)
        return status, raw.decode(errors="replace")

    async def _on_thread(self, url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
        future = asyncio.run_coroutine_threadsafe(self._get(url, headers, timeout_s), self._loop)
        return await asyncio.wrap_future(future)

    async def _get(self, url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0), skip_auto_headers=("User-Agent",)
            )
        async with asyncio.timeout(timeout_s):
            async with self._session.get(url, headers=headers) as resp:
                return resp.status, await resp.read()

    def close(self) -> None:
        async def shut() -> None:
            if self._session is not None:
                await self._session.close()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive():  # (a stuck thread is a daemon: it goes with the process)
            self._loop.close()


def _target(replica: Replica, path: str) -> tuple[str, dict[str, str]]:
    headers = {"authorization": f"Bearer {replica.api_key}"} if replica.api_key else {}
    return replica.url + path, headers


async def probe_once(client: ProbeClient, replica: Replica, timeout_s: float) -> ReplicaState:
    path = "/health" if replica.kind == "llama_cpp" else "/v1/models"
    try:
        status, _ = await client.get(*_target(replica, path), timeout_s)
    except Exception as exc:
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


async def learn_capacity(client: ProbeClient, replica: Replica, timeout_s: float) -> None:
    """Read llama-server's /props: total_slots and the context per slot."""
    try:
        status, props = await client.get(*_target(replica, "/props"), timeout_s)
    except Exception:
        return
    if status != 200 or not isinstance(props, dict):
        return
    replica.take_props(props)
    # What the backend says of its model (/v1/models `meta`: parameters, context trained, vocabulary, size).
    try:
        status, models = await client.get(*_target(replica, "/v1/models"), timeout_s)
    except Exception:
        return
    data = models.get("data") if status == 200 and isinstance(models, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("meta"), dict):
        replica.meta = data[0]["meta"]


_SIGNALS_EVERY_S = 1.0  # read at most this often (probes may run faster: a load reading is two more requests)
_SIGNALS_OFF_S = 600.0  # a server that answered /metrics or /slots 404/501 (not enabled) is asked again after this


async def read_signals(client: ProbeClient, replica: Replica, config: HealthConfig) -> None:
    """llama-server's own view of its load, beside the gateway's (other clients may use it too):
    `/metrics` (with --metrics): requests processing and deferred, its token rates; `/slots`: each slot's state and
    the tokens it holds, from which the KV-cache estimate comes (docs/llama-server.md, "Load signals").
    `replica.external` is what the server carries beyond the gateway's own requests, while the reading is fresh."""
    now = time.monotonic()
    signals = replica.signals
    every = max(config.interval_s, _SIGNALS_EVERY_S)
    if now < signals.read_at + every:
        return
    signals.read_at = now
    ours = sum(r.in_flight for r in signals.members) if signals.members else replica.in_flight  # (as it is read)
    if now >= signals.metrics_off_until:
        try:
            status, text = await client.get_text(*_target(replica, "/metrics"), config.timeout_s)
        except Exception:
            status, text = 0, ""
        if status in (404, 501):
            signals.metrics_off_until = now + _SIGNALS_OFF_S
        elif status == 200:
            values = parse_llamacpp_metrics(text)
            signals.processing = int(values.get("requests_processing", 0))
            signals.deferred = int(values.get("requests_deferred", 0))
            signals.prompt_tps = values.get("prompt_tokens_seconds")
            signals.decode_tps = values.get("predicted_tokens_seconds")
            signals.metrics_at = now
    if now >= signals.slots_off_until:
        try:
            status, slots = await client.get(*_target(replica, "/slots"), config.timeout_s)
        except Exception:
            status, slots = 0, None
        if status in (404, 501):
            signals.slots_off_until = now + _SIGNALS_OFF_S
        elif status == 200 and isinstance(slots, list):
            signals.busy_slots, signals.kv_utilization = kv_estimate(slots)
            signals.slots_at = now
    if signals.metrics_at < now and signals.slots_at < now:
        return  # nothing read this time: the last reading goes stale on its own
    signals.fresh_until = now + 3 * every
    # What the server carries beyond our own requests (in flight on it, for any of its models, at the reading).
    theirs = signals.processing + signals.deferred if signals.metrics_at >= now else signals.busy_slots
    signals.external = max(0, theirs - ours)


def parse_llamacpp_metrics(text: str) -> dict[str, float]:
    """`llamacpp:<name> <value>` lines of llama-server's Prometheus text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line[len("llamacpp:") :].partition(" ")
            try:
                out[name.split("{", 1)[0]] = float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return out


def kv_estimate(slots: list[Any]) -> tuple[int, float | None]:
    """(slots processing, the share of the KV cache their requests hold): the tokens of each processing slot (its
    prompt and what it has generated) over every slot's context. Idle slots' cached prompts are not counted: they
    give way to any new request."""
    busy = held = total = 0
    for slot in slots:
        if not isinstance(slot, dict) or not isinstance(slot.get("n_ctx"), int):
            continue
        total += slot["n_ctx"]
        if slot.get("is_processing"):
            busy += 1
            tokens = slot.get("n_prompt_tokens")
            held += tokens if isinstance(tokens, int) else 0
            following = slot.get("next_token")
            if isinstance(following, list) and following and isinstance(following[0], dict):
                decoded = following[0].get("n_decoded")
                held += decoded if isinstance(decoded, int) else 0
    return busy, (min(1.0, held / total) if total else None)


async def update(client: ProbeClient, replica: Replica, config: HealthConfig) -> bool:
    """Probe once; True when the replica's state or capacity changed."""
    started = time.monotonic()
    state = await probe_once(client, replica, config.timeout_s)
    if state is ReplicaState.DOWN and replica.probe_streak >= 0:
        replica.failing_since = started
    state = _with_hysteresis(replica, state, config)
    slots = replica.slots
    if state is ReplicaState.READY and replica.kind == "llama_cpp" and replica.state is not ReplicaState.READY:
        await learn_capacity(client, replica, config.timeout_s)
    if state is ReplicaState.READY and replica.kind == "llama_cpp" and config.load_signals:
        await read_signals(client, replica, config)
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
        # One load reading per server, shared by the deployments on it (several models may share one llama-server).
        by_url: dict[str, list[Replica]] = {}
        for r in replicas:
            by_url.setdefault(r.url, []).append(r)
        for members in by_url.values():
            shared = members[0].signals
            shared.members = members
            for r in members:
                r.signals = shared
        self.client: ProbeClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def first_round(self) -> None:
        """Probe every replica once, so the gateway starts with a known picture."""
        if not self.replicas:
            return
        if self.client is None:
            self.client = ProbeClient()
        client = self.client
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.startup_probe_timeout_s or None):
                await asyncio.gather(*(update(client, r, self.config) for r in self.replicas))

    def start(self) -> None:
        if self.client is None and self.replicas:
            self.client = ProbeClient()
        self._tasks = [asyncio.create_task(self._loop(r)) for r in self.replicas]

    async def _loop(self, replica: Replica) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                if await update(self.client, replica, self.config) and self.on_change is not None:
                    self.on_change(replica)
            except Exception:
                log.exception("probe_failed", model=replica.model, replica=replica.name)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.client is not None:
            await asyncio.to_thread(self.client.close)
            self.client = None
