"""llama-server's router mode, simulated: one server, several models, each loaded on demand into a simulator of its
own (simulator.py), with llama.cpp's tools/server habits (server-models.cpp):

  - `GET /models` (and `/v1/models`): every model with `status.value` unloaded | loading | loaded, and `failed` +
    `exit_code` after a failed load; `GET /props` without `?model=`: `role: router`, `max_instances`
    (--models-max), `models_autoload`; with it, the model's own /props;
  - `POST /models/load` / `POST /models/unload` (`{"model": ...}`): the load starts and the answer comes at once
    (`{"success": true}`); a running model's load and a stopped one's unload are 400s; a load with no room and
    no idle model to give up is `model limit reached, try again later`; `GET /models/sse`: each status change;
  - a request names its model (`model` in the JSON body, `?model=` for GETs) and, with autoload (the default,
    `?autoload=false` per request), waits while it loads. With no room, the least recently used *idle* model is
    unloaded for it; with none idle, requests wait in line until one is (this build's scheduler);
    `evict_busy` instead unloads the least recently used model even while it serves, failing its requests: the
    weakness of ggml-org/llama.cpp#21678 that a gateway must not rely on the server to avoid;
  - loading takes `load_s` (per model in `load_s_by_model`); a model listed in `fail_models` fails to load
    (exit code 1).

`GET /sim/stats` counts loads, unloads, evictions, requests failed by an eviction and the most models ever loaded at
once, and keeps the order of loads; `POST /sim/control` changes the settings (`load_s`, `evict_busy`, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson

from portcullis.sim.simulator import Scope, SimSettings, Simulator, _json, _read_body


@dataclass
class RouterSettings:
    models: list[str] = field(default_factory=lambda: ["model-a", "model-b", "model-c"])
    models_max: int = 4  # 0: no limit
    autoload: bool = True
    load_s: float = 1.0
    load_s_by_model: dict[str, float] = field(default_factory=dict)
    unload_s: float = 0.05
    evict_busy: bool = False
    fail_models: list[str] = field(default_factory=list)
    # Each loaded model's own simulator (its model_alias becomes the model's name).
    model: SimSettings = field(default_factory=SimSettings)


@dataclass(eq=False)
class _Model:
    name: str
    state: str = "unloaded"  # unloaded | loading | loaded
    failed: bool = False
    exit_code: int = 0
    sim: Simulator | None = None
    last_used: float = 0.0
    requests: set[asyncio.Task[None]] = field(default_factory=set)
    load_task: asyncio.Task[None] | None = None
    stopping: bool = False  # being unloaded: takes no new request (the next instance serves it)


class RouterSim:
    def __init__(self, settings: RouterSettings | None = None) -> None:
        self.settings = settings or RouterSettings()
        self.models = {name: _Model(name) for name in self.settings.models}
        self._changed: asyncio.Condition | None = None
        self._listeners: set[asyncio.Queue[bytes]] = set()
        self.stats: dict[str, Any] = {
            "requests": 0,
            "loads": 0,
            "unloads": 0,
            "evictions": 0,
            "evicted_busy": 0,
            "failed_by_eviction": 0,
            "max_loaded": 0,
            "load_order": [],
            "requests_by_model": {},
        }

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    # -- ASGI ---------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        body = await _read_body(receive)
        if path == "/sim/stats":
            await _json(send, 200, self.stats)
        elif path == "/sim/control" and method == "POST":
            await self._control(body, send)
        elif path == "/health" and method == "GET":
            await _json(send, 200, {"status": "ok"})
        elif path in ("/models", "/v1/models") and method == "GET":
            await _json(send, 200, self._list())
        elif path == "/models/sse" and method == "GET":
            await self._sse(receive, send)
        elif path == "/models/load" and method == "POST":
            await self._load_request(body, send)
        elif path == "/models/unload" and method == "POST":
            await self._unload_request(body, send)
        elif path == "/props" and method == "GET" and "model" not in query:
            s = self.settings
            props = {"role": "router", "max_instances": s.models_max, "models_autoload": s.autoload}
            await _json(send, 200, props)
        else:
            await self._route(scope, method, query, body, receive, send)

    async def _control(self, body: bytes, send: Any) -> None:
        changes = orjson.loads(body or b"{}")
        names = {f.name for f in dataclasses.fields(RouterSettings)} - {"models", "model"}
        unknown = set(changes) - names
        if unknown:
            await _json(send, 400, {"error": f"unknown settings {sorted(unknown)}"})
            return
        self.settings = dataclasses.replace(self.settings, **changes)
        await _json(send, 200, {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "model"})

    # -- the models --------------------------------------------------------------------------------

    def _list(self) -> dict[str, Any]:
        data = []
        for m in self.models.values():
            status: dict[str, Any] = {"value": m.state, "args": ["llama-server", "--model", f"{m.name}.gguf"]}
            if m.failed:
                status["failed"] = True
                status["exit_code"] = m.exit_code
            data.append({"id": m.name, "object": "model", "owned_by": "llamacpp", "status": status})
        return {"object": "list", "data": data}

    def _running(self) -> list[_Model]:
        return [m for m in self.models.values() if m.state != "unloaded"]

    def _has_room(self) -> bool:
        limit = self.settings.models_max
        return limit <= 0 or len(self._running()) < limit

    def _victim(self, *, busy_ok: bool) -> _Model | None:
        loaded = [
            m for m in self.models.values() if m.state == "loaded" and not m.stopping and (busy_ok or not m.requests)
        ]
        return min(loaded, key=lambda m: m.last_used, default=None)

    def _set(self, m: _Model, state: str) -> None:
        m.state = state
        self.stats["max_loaded"] = max(self.stats["max_loaded"], len(self._running()))
        data: dict[str, Any] = {"status": state}
        if state == "unloaded":
            data["exit_code"] = m.exit_code
        event = orjson.dumps({"model": m.name, "event": "status_change", "data": data})
        for q in self._listeners:
            q.put_nowait(event)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _start_load(self, m: _Model) -> None:
        m.failed = False
        m.exit_code = 0
        m.last_used = time.monotonic()
        self._set(m, "loading")
        m.load_task = asyncio.get_running_loop().create_task(self._load(m))

    async def _load(self, m: _Model) -> None:
        s = self.settings
        try:
            await asyncio.sleep(s.load_s_by_model.get(m.name, s.load_s))
        except asyncio.CancelledError:
            m.load_task = None
            self._set(m, "unloaded")
            await self._notify()
            return
        m.load_task = None
        if m.name in s.fail_models:
            m.failed, m.exit_code = True, 1
            self._set(m, "unloaded")
        else:
            m.sim = Simulator(dataclasses.replace(s.model, model_alias=m.name))
            self.stats["loads"] += 1
            self.stats["load_order"].append(m.name)
            m.last_used = time.monotonic()
            self._set(m, "loaded")
        await self._notify()

    async def _unload(self, m: _Model, *, eviction: bool) -> None:
        if m.load_task is not None:
            m.load_task.cancel()
            return
        if m.state != "loaded" or m.stopping:
            return
        busy = list(m.requests)
        if eviction:
            self.stats["evictions"] += 1
            if busy:
                self.stats["evicted_busy"] += 1
        for task in busy:
            task.cancel("unloaded")  # what its requests see: the model's server went away under them
        self.stats["failed_by_eviction"] += len(busy) if eviction else 0
        self.stats["unloads"] += 1
        m.sim = None
        m.stopping = True
        await asyncio.sleep(self.settings.unload_s)
        m.stopping = False
        self._set(m, "unloaded")
        await self._notify()

    async def _load_request(self, body: bytes, send: Any) -> None:
        name = orjson.loads(body or b"{}").get("model")
        m = self.models.get(name) if isinstance(name, str) else None
        if m is None:
            await _json(send, 404, _error(404, "model is not found", "not_found_error"))
            return
        if m.state != "unloaded":
            await _json(send, 400, _error(400, "model is already running", "invalid_request_error"))
            return
        if not self._has_room():
            victim = self._victim(busy_ok=self.settings.evict_busy)
            if victim is None:
                await _json(send, 500, _error(500, "model limit reached, try again later", "server_error"))
                return
            await self._unload(victim, eviction=True)
        self._start_load(m)
        await _json(send, 200, {"success": True})

    async def _unload_request(self, body: bytes, send: Any) -> None:
        name = orjson.loads(body or b"{}").get("model")
        m = self.models.get(name) if isinstance(name, str) else None
        if m is None:
            await _json(send, 400, _error(400, "model is not found", "invalid_request_error"))
            return
        if m.state == "unloaded":
            await _json(send, 400, _error(400, "model is not running", "invalid_request_error"))
            return
        await _json(send, 200, {"success": True})
        await self._unload(m, eviction=False)

    async def _ready(self, m: _Model, autoload: bool) -> str | None:
        """Wait until the model serves (loading it, making room as llama-server does); an error message if not."""
        while True:
            if m.state == "loaded" and not m.stopping:
                return None
            if m.state == "unloaded":
                if m.failed and not autoload:
                    return f"model {m.name} failed to load"
                if not autoload:
                    return "model is not loaded"
                if self._has_room():
                    self._start_load(m)
                    continue
                victim = self._victim(busy_ok=self.settings.evict_busy)
                if victim is not None:
                    await self._unload(victim, eviction=True)
                    continue
            async with self.changed:  # (a bounded wait: a change between the look above and here is not missed long)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self.changed.wait()
            if m.state == "unloaded" and m.failed:
                return f"model {m.name} failed to load (exit code {m.exit_code})"

    # -- requests ------------------------------------------------------------------------------------

    async def _route(
        self, scope: Scope, method: str, query: dict[str, str], body: bytes, receive: Any, send: Any
    ) -> None:
        if method == "POST":
            try:
                name = orjson.loads(body or b"{}").get("model")
            except (orjson.JSONDecodeError, AttributeError):
                await _json(send, 400, _error(400, "invalid JSON", "invalid_request_error"))
                return
        else:
            name = query.get("model")
        if not isinstance(name, str) or not name:
            await _json(send, 400, _error(400, "model name is missing from the request", "invalid_request_error"))
            return
        m = self.models.get(name)
        if m is None:
            await _json(send, 400, _error(400, f"model '{name}' not found", "invalid_request_error"))
            return
        self.stats["requests"] += 1
        by_model = self.stats["requests_by_model"]
        by_model[name] = by_model.get(name, 0) + 1
        autoload = query.get("autoload", "true" if self.settings.autoload else "false") in ("true", "1")
        problem = await self._ready(m, autoload)
        if problem is not None or m.sim is None:
            await _json(send, 400, _error(400, problem or "model is not loaded", "invalid_request_error"))
            return
        m.last_used = time.monotonic()
        sim = m.sim
        started = False

        async def replay() -> dict[str, Any]:
            nonlocal body
            if body is not None:
                message = {"type": "http.request", "body": body, "more_body": False}
                body = None  # type: ignore[assignment]
                return message
            return dict(await receive())

        async def tracking(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task = asyncio.current_task()
        assert task is not None
        m.requests.add(task)
        try:
            await sim(scope, replay, tracking)
        except asyncio.CancelledError:
            if task.cancelling() and not started:
                task.uncancel()
                await _json(send, 500, _error(500, "the model was unloaded during the request", "server_error"))
                return
            raise
        finally:
            m.requests.discard(task)
            m.last_used = time.monotonic()
            await self._notify()

    async def _sse(self, receive: Any, send: Any) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._listeners.add(queue)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        gone = asyncio.ensure_future(receive())
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    getter.cancel()
                    return
                event = b"data: " + getter.result() + b"\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": True})
        finally:
            self._listeners.discard(queue)
            gone.cancel()


def _error(code: int, message: str, type_: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": type_}}
