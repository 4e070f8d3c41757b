"""A llama-server in router mode (`--models-dir`, `--models-preset`) as a host: one server, several models, loaded
and unloaded on the gateway's word.

What the gateway reads: `GET /props` (`max_instances`: the server's --models-max), `GET /models` (each model's
`status.value`: unloaded, loading, loaded, sleeping; `failed` and `exit_code` after a crash), and `GET /models/sse`
(each status change as it happens). What it does: `POST /models/load` and `POST /models/unload`, then waits for the
status the events (or, failing them, a quick poll) report. The server's own queue never has to decide anything:
the scheduler sends requests only to a loaded model. Its health (`GET /health`) is the health of every model's
replica on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from portcullis.hosts.schedule import Host, LoadFailed, Seat, SeatState
from portcullis.obs.logging import get_logger
from portcullis.routing.catalog import ReplicaState

if TYPE_CHECKING:
    from portcullis.config import HealthConfig

log = get_logger("portcullis.hosts")

_STATES = {
    "unloaded": SeatState.UNLOADED,
    "loading": SeatState.LOADING,
    "downloading": SeatState.LOADING,
    "downloaded": SeatState.UNLOADED,
    "loaded": SeatState.LOADED,
    "sleeping": SeatState.SLEEPING,
}
_WATCH_POLL_S = 0.25  # while a load or unload of ours is under way, /models is read this often (besides the events)
_STOP_TIMEOUT_S = 60.0  # a cancelled load's model has this long to be gone before its room is taken as free


def server_state(status: Any) -> tuple[SeatState | None, str | None]:
    """A /models entry's `status` (or an event's `data`) → our state, and why it failed."""
    if not isinstance(status, dict):
        return None, None
    value = status.get("value", status.get("status"))
    state = _STATES.get(value) if isinstance(value, str) else None
    exit_code = status.get("exit_code")
    if state is SeatState.UNLOADED and (status.get("failed") or (isinstance(exit_code, int) and exit_code != 0)):
        return SeatState.FAILED, f"the model's server exited with code {exit_code}"
    return state, None


class RouterDriver:
    def __init__(self, url: str, api_key: str | None, health: HealthConfig) -> None:
        self.url = url
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.health = health
        self.host: Host | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()  # set whenever a status was read: load/unload waits look again
        self._server: dict[str, tuple[SeatState | None, str | None]] = {}  # upstream name → what the server said
        self._aliases: dict[str, str] = {}  # an alias the server knows a model by → its name (/models `aliases`)
        self._event_at: dict[str, float] = {}  # when the events last said something of a model (a poll older loses)

    # -- life -------------------------------------------------------------------------------------------

    async def start(self, host: Host) -> None:
        self.host = host
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None),  # (the event stream lasts; each call has its own limit)
        )
        with contextlib.suppress(Exception):
            await self._sync()
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._follow())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- loads and unloads -----------------------------------------------------------------------------

    async def load(self, seat: Seat) -> None:
        name = self._name(seat)
        try:
            while True:
                status, body = await self._post("/models/load", {"model": seat.upstream})
                if status == 200 or _already(body, "running"):
                    break
                if "limit reached" in _message(body):
                    # The room is still held by a model on its way out (its process ending): in a moment.
                    await asyncio.sleep(_WATCH_POLL_S)
                    continue
                raise LoadFailed(f"the router answered {status}: {_message(body)}")
            if status == 200:
                self._server[name] = (SeatState.LOADING, None)  # (not what it said before: a failure, say)
            await self._until(seat, (SeatState.LOADED, SeatState.SLEEPING), fail=True)
            await self._learn(seat)
        except asyncio.CancelledError:
            # Nobody waits for it any more: the router stops the load (a loading model can be unloaded), and the room
            # is given back only once the server says the model is gone.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await self._post("/models/unload", {"model": seat.upstream})
                    self._server[name] = (SeatState.UNLOADING, None)
                    await self._until(seat, (SeatState.UNLOADED, SeatState.FAILED), fail=False)
            raise

    async def unload(self, seat: Seat) -> None:
        status, body = await self._post("/models/unload", {"model": seat.upstream})
        if status != 200 and not _already(body, "not running"):
            raise LoadFailed(f"the router answered {status}: {_message(body)}")
        if status == 200:
            self._server[self._name(seat)] = (SeatState.UNLOADING, None)
        await self._until(seat, (SeatState.UNLOADED, SeatState.FAILED), fail=False)

    def lost(self, seat: Seat) -> bool:
        return False  # the router itself did not answer: its health decides for every model on it

    def _name(self, seat: Seat) -> str:
        """The server's name for the seat's model (its `upstream_model` may be one of the model's aliases)."""
        return self._aliases.get(seat.upstream, seat.upstream)

    def details(self, seat: Seat) -> dict[str, object]:
        state, _ = self._server.get(self._name(seat), (None, None))
        return {"server_state": state.value if state is not None else None}

    async def _until(self, seat: Seat, states: tuple[SeatState, ...], *, fail: bool) -> None:
        """Until the server reports one of `states` for the model (its events, a quick poll beside them)."""
        while True:
            self._changed.clear()
            state, error = self._server.get(self._name(seat), (None, None))
            if state in states:
                return
            if fail and state is SeatState.FAILED:
                raise LoadFailed(error or "the model's server failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_WATCH_POLL_S):
                    await self._changed.wait()
            if not self._changed.is_set():
                with contextlib.suppress(Exception):
                    await self._read_models()

    async def _learn(self, seat: Seat) -> None:
        """The loaded model's slots and context (its /props through the router)."""
        try:
            status, props = await self._get(f"/props?model={quote(seat.upstream, safe='')}")
        except Exception:
            return
        if status != 200 or not isinstance(props, dict):
            return
        seat.replica.take_props(props)

    # -- what the server says ----------------------------------------------------------------------------

    async def _sync(self) -> None:
        status, props = await self._get("/props")
        if status == 200 and isinstance(props, dict) and isinstance(props.get("max_instances"), int):
            assert self.host is not None
            self.host.server_max = props["max_instances"]
        await self._read_models()

    async def _read_models(self) -> None:
        started = time.monotonic()
        status, body = await self._get("/models")
        data = body.get("data") if status == 200 and isinstance(body, dict) else None
        if not isinstance(data, list):
            return
        for entry in data:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                for alias in entry.get("aliases") or ():
                    if isinstance(alias, str):
                        self._aliases[alias] = entry["id"]
                if self._event_at.get(entry["id"], 0.0) > started:
                    continue  # an event said something newer while this list was on its way
                self._saw(entry["id"], *server_state(entry.get("status")))

    def _saw(self, name: str, state: SeatState | None, error: str | None) -> None:
        if state is None:
            return
        self._server[name] = (state, error)
        self._changed.set()
        assert self.host is not None
        for seat in self.host.seats.values():
            if self._name(seat) == name:
                self.host.observed(seat, state, error=error)

    async def _poll(self) -> None:
        """The router's health (every model's replica) and its models' states, every health interval."""
        assert self.host is not None
        while True:
            try:
                status, _ = await self._get("/health")
                up = ReplicaState.READY if status == 200 else ReplicaState.DOWN
                if up is ReplicaState.READY:
                    if self.host.server_max is None:
                        await self._sync()
                    else:
                        await self._read_models()
            except Exception as exc:
                up = ReplicaState.DOWN
                log.debug("router_poll_failed", host=self.host.name, error=type(exc).__name__)
            for seat in self.host.seats.values():
                replica = seat.replica
                if replica.state is not up:
                    log.info("replica_state", model=replica.model, replica=replica.name, new=up.value)
                    replica.state = up
                    replica.probe_streak = 0
            await asyncio.sleep(self.health.interval_s)

    async def _follow(self) -> None:
        """/models/sse: each model's status as it changes (reconnecting after a pause when the stream ends)."""
        assert self._session is not None
        while True:
            try:
                async with self._session.get(self.url + "/models/sse", headers=self.headers) as resp:
                    if resp.status != 200:
                        raise ConnectionError(f"status {resp.status}")
                    async for line in resp.content:
                        if line.startswith(b"data:"):
                            self._event(line[5:].strip())
            except asyncio.CancelledError:
                raise
            except Exception:
                pass
            await asyncio.sleep(self.health.interval_s)

    def _event(self, raw: bytes) -> None:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict) and isinstance(event.get("model"), str):
            self._event_at[event["model"]] = time.monotonic()
            self._saw(event["model"], *server_state(event.get("data")))

    # -- HTTP ----------------------------------------------------------------------------------------------

    async def _get(self, path: str) -> tuple[int, Any]:
        assert self._session is not None
        async with asyncio.timeout(self.health.timeout_s):
            async with self._session.get(self.url + path, headers=self.headers) as resp:
                raw = await resp.read()
        return resp.status, _json(raw)

    async def _post(self, path: str, obj: Any) -> tuple[int, Any]:
        assert self._session is not None
        started = time.monotonic()
        async with asyncio.timeout(max(self.health.timeout_s, 30.0)):
            async with self._session.post(self.url + path, data=orjson.dumps(obj), headers=self.headers) as resp:
                raw = await resp.read()
        log.debug("router_call", path=path, status=resp.status, seconds=round(time.monotonic() - started, 3))
        return resp.status, _json(raw)


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def _message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message
    return "no reason given"


def _already(body: Any, what: str) -> bool:
    """llama-server's 400 for a load of a running model ('model is already running') or an unload of one that is
    not ('model is not running'): the state we want, already."""
    return f"is {what}" in _message(body) if what == "not running" else f"already {what}" in _message(body)
