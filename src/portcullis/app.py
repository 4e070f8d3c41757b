"""The gateway as an ASGI app, built from a Config: routes, stages, lifespan, shutdown drain.

Routes are listed explicitly below, each with the one scope it needs (or public). Every request runs:
route → (CORS) → authenticate → require the route's scope → the handler, which reads top to bottom like
the request path. Errors from any stage are `GatewayError`s and become the OpenAI error JSON here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import time
from typing import Any
from urllib.parse import unquote

import orjson
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from portcullis.api import dashboard, openapi, routes
from portcullis.api.routes import Route
from portcullis.cache.batching import EmbeddingBatcher
from portcullis.cache.exact import ResponseCache
from portcullis.config import Config
from portcullis.errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    sse_error,
)
from portcullis.exchange import Abort, Exchange, Filter
from portcullis.http import JSON_HEADERS, NOSNIFF, ClientDisconnected, Receive, Request, Scope, Send
from portcullis.identity import scopes
from portcullis.identity.auth import Identity, require_scope
from portcullis.identity.jwt import JwtSetupError, JwtVerifier
from portcullis.identity.keys import KeyHasher, KeySecretMissing, KeyStore, key_id_of, key_secret
from portcullis.identity.principal import Principal
from portcullis.jobs.runner import Answer, BatchRunner
from portcullis.jobs.store import BatchStore
from portcullis.obs.lag import LAG
from portcullis.obs.logging import access_line, bind_principal, bind_request, flush_logs, get_logger, isolated
from portcullis.obs.memory import MemoryReturn
from portcullis.obs.metrics import Metrics
from portcullis.obs.timeline import Timeline
from portcullis.obs.tracing import Tracing, TracingUnavailable
from portcullis.quota.stage import Quota
from portcullis.quota.usage import UsageRecorder
from portcullis.routing.admission import Admission
from portcullis.routing.affinity import Affinity
from portcullis.routing.breaker import Breaker, BreakerState
from portcullis.routing.catalog import Catalog, Replica, ReplicaState
from portcullis.routing.router import Router
from portcullis.safety.moderation import Moderation
from portcullis.store.bus import EventBus
from portcullis.store.db import make_engine, pending, upgrade
from portcullis.store.health import DatabaseHealth
from portcullis.store.model_state import ModelState
from portcullis.upstream.client import UpstreamClient
from portcullis.upstream.deadline import Deadlines
from portcullis.upstream.probe import Prober
from portcullis.upstream.proxy import Upstream

_MODEL_POLL_S = 1.0  # without Redis, how often each process re-reads which models are disabled
_THROUGHPUT_TICK_S = 10.0  # how often replicas' throughput (and hourly-priced deployments' prices) update
# The ASGI scope key of requests the gateway makes to itself (batch lines): who they run as. A request
# from the network never has it (uvicorn builds those scopes).
INTERNAL = "portcullis.internal"
_CORS_EXPOSE = (
    b"x-request-id, retry-after, retry-after-ms, x-portcullis-attempts, x-portcullis-degraded, x-portcullis-cache, "
    b"x-portcullis-cache-similarity, "
    b"x-portcullis-queue-wait-ms, x-portcullis-route, "
    b"x-ratelimit-limit-requests, "
    b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
    b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"
)


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """No route speaks WebSocket, but uvicorn hands an Upgrade request to the app as a `websocket` scope, and
    an app that leaves it unanswered makes uvicorn send a 500. Refuse it with a 400 in the OpenAI shape (the
    ASGI denial-response extension), or with a close (uvicorn's bare 403) on a server without it."""
    if (await receive())["type"] != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        error = InvalidRequest(
            "This gateway does not speak WebSocket; use plain HTTP (streams are server-sent events).",
            code="websocket_not_supported",
        )
        headers = [*JSON_HEADERS, NOSNIFF]
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": error.body()})
    else:
        await send({"type": "websocket.close", "code": 1008})


class _Internal:
    """What a request the gateway makes to itself carries in its ASGI scope: who it runs as; and what the
    request path leaves there for the caller: the refusal's code."""

    __slots__ = ("error", "principal")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.error: str | None = None


def _retry_after(headers: dict[bytes, bytes]) -> float:
    """A refusal's wait: retry-after-ms when given (the precise one), else Retry-After's seconds."""
    for name, scale in ((b"retry-after-ms", 1000.0), (b"retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            with contextlib.suppress(ValueError):
                return float(value) / scale
    return 0.0


class _Metering(Filter):
    """The app's own response half on metered routes: the usage record, and what the router learns from a
    whole answer's prompt count. Added first, so its `done` runs last: after the quota stage settled the
    tokens and cost it records."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def done(self, ex: Exchange, status: int) -> None:
        self.gateway.record_usage(ex, status)
        if ex.prompt_size is not None and status == 200:
            self.gateway.router.learn(ex)


class StartupError(Exception):
    """The gateway cannot start with this configuration or database; the message says what to do."""


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = Catalog.from_config(config)
        self.metrics = Metrics(self.catalog, per_key=config.server.metrics_per_key)
        self.timeline = Timeline(self.metrics)  # the dashboard's time series
        # Dashboard sign-ins (in Redis through the bus's client when there is one, else here).
        self.dashboard_sessions = dashboard.Sessions(config.dashboard.session_ttl_s)
        self.log = get_logger("portcullis")
        self.admission = Admission(config, self.catalog, self.metrics)
        self.affinity = Affinity(config.routing.affinity)
        # Every call to a backend goes through the upstream stage: traffic (forward) and side calls alike.
        self.upstream = Upstream(config.resilience, self.metrics, self.affinity)
        call = self.upstream.call
        self.router = Router(config, self.catalog, self.admission, self.affinity, self.metrics, call)
        self.moderation = Moderation(config, self.catalog, self.metrics, self.log, call)
        self.cache = ResponseCache(config.cache, config.store.redis_url, self.metrics, self.catalog, call)
        self.batcher = EmbeddingBatcher(config.embedding_batching) if config.embedding_batching.enabled else None
        self._replica_of: dict[Breaker, Replica] = {}
        for replica in self.catalog.all_replicas():
            replica.breaker.listener = self._on_breaker
            self._replica_of[replica.breaker] = replica
        self.prober = Prober(self.catalog.all_replicas(), config.health, on_change=self._on_replica_change)
        self.started_at = time.time()
        self.draining = False
        self.exchanges: set[Exchange] = set()
        # Upstream attempts' time limits, checked on the live exchanges by one watchdog.
        self.deadlines = Deadlines(self.exchanges)
        self.memory = MemoryReturn(self.exchanges, self.log)  # after a spike, give the memory back
        self.engine = make_engine(config.store.database_url, timeout_s=config.store.timeout_s, statements=True)
        self.db_health = DatabaseHealth(
            self.engine, timeout_s=config.store.timeout_s, log=self.log, metrics=self.metrics
        )
        self.quota = Quota(config, self.metrics, self.log, self.catalog)
        self.usage = UsageRecorder(
            self.engine,
            config.quota.usage,
            self.metrics,
            self.log,
            health=self.db_health,
            database_url=config.store.database_url,
            timeout_s=config.store.timeout_s,
        )
        self.batch_store = BatchStore(self.engine) if config.batch.enabled else None
        self.batch_runner = (
            BatchRunner(
                config,
                self.batch_store,
                call=self.call_internal,
                admission=self.admission,
                catalog=self.catalog,
                concurrency_of=self.quota.concurrency_of,
                scope_of=lambda endpoint: self.routes[("POST", endpoint)].scope,
                keys=lambda: self.keys,
            )
            if self.batch_store is not None
            else None
        )
        # Each component's own gauges and counters, read at scrape time.
        for component in (self.catalog, self.admission, self.affinity, self.batch_runner):
            if component is not None:
                self.metrics.register(component.collector())
        self.keys: KeyStore | None = None
        # Models switched off at run time; set at preflight, with or without API keys (a JWT-only gateway too).
        self.model_state: ModelState | None = None
        self.identity: Identity | None = None
        self.tracing: Tracing | None = None  # built at preflight when enabled (tests may set their own)
        self.bus: EventBus | None = None
        self._background: list[asyncio.Task[None]] = []
        self.cors_origins = {o.encode() for o in config.server.cors_origins}
        self.hsts = (
            f"max-age={config.server.hsts_max_age_s}; includeSubDomains".encode()
            if config.server.ssl_certfile
            else None
        )
        # The route table (api/routes.py): fixed paths by (method, path), then the paths with an id in them.
        table = routes.table(metrics_public=config.server.metrics_public)
        self.routes: dict[tuple[str, str], Route] = {(r.method, r.path): r for r in table if r.pattern is None}
        self.pattern_routes: list[tuple[re.Pattern[str], Route]] = [
            (pattern, r) for r in table if (pattern := r.pattern) is not None
        ]
        self._paths = {path for _, path in self.routes}
        # By path, whatever the method: a probe's 405 is as quiet as its 200, a 405 on a metered path is recorded.
        self._quiet = {r.path for r in table if r.quiet}
        self._metered = {r.path for r in table if r.metered}
        self._metering = _Metering(self)
        self.openapi = orjson.dumps(openapi.document(table, _version(), list(config.models)))

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await _refuse_websocket(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = Request(scope, receive, send)
        bind_request(req.request_id)
        raw_path = scope.get("raw_path")
        if raw_path is not None and b"%" in raw_path:
            # Route on the path as sent: uvicorn's decoded one would let /%61dmin/keys reach /admin/keys (a
            # proxy's path rules see the raw form). _route decodes what a pattern route captures.
            req.path = raw_path.decode("latin-1")
        if self.hsts is not None:
            req.response_headers.append((b"strict-transport-security", self.hsts))
        ex = Exchange(route=req.path, task=asyncio.current_task(), started_at=req.started, request_id=req.request_id)
        quiet = req.path in self._quiet
        if self.tracing is not None and not quiet:
            ex.trace = self.tracing.begin(req)
        internal: _Internal | None = scope.get(INTERNAL)
        metered = req.path in self._metered
        if metered:  # the usage record and the router's learning, after every other filter's done
            ex.filters.append(self._metering)
        self.exchanges.add(ex)
        try:
            if req.method == "OPTIONS" or self.cors_origins:
                if await self._cors(req):
                    return
            route, args = self._route(req)
            if internal is not None:  # the gateway's own background request (a batch line)
                ex.principal, ex.background = internal.principal, True
            elif route.scope is not scopes.PUBLIC:
                assert self.identity is not None
                if ex.trace is not None:
                    ex.trace.stage("authenticate")
                ex.principal = await self.identity.authenticate(req)
                require_scope(ex.principal, route.scope)
            bind_principal(ex.principal)
            if ex.trace is not None:
                ex.trace.stage("validate")  # the handler reads, parses and validates the body first
            await route.handler(self, req, ex, *args)
        except GatewayError as error:
            ex.error_code = error.code or error.type
            if req.status == 0:
                await req.respond_error(error)
        except ClientDisconnected:
            req.status = req.status or 499
        except asyncio.CancelledError:
            if ex.abort_reason is None or not ex.abort_reason.final:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await self._after_abort(req, ex)
        except (OSError, TimeoutError, SQLAlchemyError) as exc:
            # A dependency that failed or passed its deadline (the database, mostly: its drivers raise plain
            # ConnectionRefusedError and TimeoutError): 503 with Retry-After, never a 500.
            if isinstance(exc, SQLAlchemyError) and not isinstance(exc, _UNAVAILABLE):
                await self._unhandled(req, ex)  # a statement that is wrong: our bug, not an outage
                return
            store = _from_store(exc)
            if store:
                self.db_health.failed(exc)
            self.log.warning(
                "dependency_unavailable",
                path=req.path,
                error=type(exc).__name__,
                store=store,
            )
            ex.error_code = "database_unavailable" if store else "temporarily_unavailable"
            if req.status == 0:
                what = "The database did not answer" if store else "A resource the gateway needs was unavailable"
                await req.respond_error(
                    ServiceUnavailable(f"{what}; try again shortly.", code=ex.error_code, headers={"Retry-After": "2"})
                )
        except Exception:
            await self._unhandled(req, ex)
        finally:
            self.exchanges.discard(ex)
            ex.stop_watching()
            status = req.status
            if internal is not None:
                internal.error = ex.error_code
            if metered:
                ex.account(status)  # what it spent, before anyone settles or records it
            for f in reversed(ex.filters):  # the response halves, unwinding (exchange.py)
                f.done(ex, status)
            if not quiet:
                self._record(req, ex)
            if ex.trace is not None:
                ex.trace.finish(req, ex)

    async def _unhandled(self, req: Request, ex: Exchange) -> None:
        self.log.exception("unhandled_error", path=req.path)
        ex.error_code = "internal_error"
        if req.status == 0:
            await req.respond_error(GatewayError("The gateway failed to handle the request."))

    def _route(self, req: Request) -> tuple[Route, tuple[str, ...]]:
        found = self.routes.get((req.method, req.path))
        if found is not None:
            return found, ()
        path_known = req.path in self._paths
        for pattern, route in self.pattern_routes:
            match = pattern.fullmatch(req.path)  # (match's $ also matched before a trailing %0a)
            if match:
                if route.method == req.method:
                    if "%" in req.path:  # a raw path (handle): the handler gets the decoded id
                        return route, tuple(unquote(group) for group in match.groups())
                    return route, match.groups()
                path_known = True
        if path_known:
            raise MethodNotAllowed(f"{req.method} is not allowed on {req.path}.")
        raise NotFound(f"Unknown path {req.path}.", code="unknown_url")

    async def _cors(self, req: Request) -> bool:
        """CORS: answer a preflight (True: answered), or mark an allowed origin on the response."""
        origin = req.header(b"origin")
        if origin is None:
            return False
        allowed = origin in self.cors_origins
        if req.method == "OPTIONS" and req.header(b"access-control-request-method") is not None:
            if not allowed:
                raise Forbidden("This origin is not allowed to call the API.", code="cors_origin_not_allowed")
            headers = [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                (
                    b"access-control-allow-headers",
                    req.header(b"access-control-request-headers") or b"authorization, content-type",
                ),
                (b"access-control-max-age", b"600"),
                (b"vary", b"origin"),
            ]
            await req.respond(204, b"", headers)
            return True
        if allowed:
            req.response_headers += [
                (b"access-control-allow-origin", origin),
                (b"access-control-expose-headers", _CORS_EXPOSE),
                (b"vary", b"origin"),
            ]
        return False

    async def _after_abort(self, req: Request, ex: Exchange) -> None:
        if ex.abort_reason == Abort.CLIENT_GONE:
            req.status = req.status or 499
            return
        if ex.abort_reason == Abort.PREEMPTED:  # background work only: never a stream
            ex.error_code = "preempted"
            if req.status == 0:
                await req.respond_error(
                    ServiceUnavailable("Preempted by an interactive request; run again later.", code="preempted")
                )
            return
        if ex.abort_reason == Abort.SHUTDOWN:
            ex.error_code = "server_shutting_down"
            message = "The gateway is shutting down; the request was cut at the shutdown deadline."
            if req.status == 0:
                await req.respond_error(ServiceUnavailable(message, code=ex.error_code, headers={"Retry-After": "1"}))
            else:  # a stream already started: end it with an error event, never silently
                await req.stream_chunk(sse_error(message, code=ex.error_code))
                await req.end_stream()

    def _record(self, req: Request, ex: Exchange) -> None:
        total = time.perf_counter() - req.started
        self.metrics.observe(
            route=req.path if req.path in self._paths else "(other)",
            model=ex.model,
            status=req.status,
            total_s=total,
            upstream_s=ex.upstream_s,
            ttft_s=ex.ttft_s,
            prompt_tokens=ex.prompt_tokens,
            completion_tokens=ex.completion_tokens,
            cost=ex.cost,
            key_id=ex.principal.key_id if ex.principal is not None else None,
        )
        if self.config.server.access_log:
            principal = ex.principal
            access_line(
                {
                    "request_id": req.request_id,
                    "method": req.method,
                    "path": req.path,
                    "status": req.status,
                    "user": principal.user if principal else None,
                    "key_id": principal.key_id if principal else None,
                    "model": ex.model,
                    "replica": ex.replica.name if ex.replica else None,
                    "stream": ex.stream,
                    "duration_ms": round(total * 1000, 3),
                    "upstream_ms": round(ex.upstream_s * 1000, 3),
                    "ttft_ms": round(ex.ttft_s * 1000, 3) if ex.ttft_s is not None else None,
                    "prompt_tokens": ex.prompt_tokens,
                    "completion_tokens": ex.completion_tokens,
                    "attempts": ex.attempts,
                    "queue_ms": round(ex.queue_s * 1000, 3),
                    "degraded": ex.degraded,
                    "route": ex.route_reason,
                    "moderation": ex.moderation,
                    "background": ex.background or None,
                    "error": ex.error_code,
                    "trace_id": ex.trace.trace_id if ex.trace is not None else None,
                }
            )

    def record_usage(self, ex: Exchange, status: int) -> None:
        principal = ex.principal
        # A batch line's record is named by its request id (one per line): a line that runs again after a
        # crash replaces its earlier record instead of counting twice.
        self.usage.record(
            (
                time.time(),
                ex.request_id,
                principal.key_id if principal else None,
                principal.user if principal else None,
                ex.route,
                ex.model,
                ex.replica.name if ex.replica else None,
                ex.stream,
                ex.prompt_tokens or 0,
                ex.completion_tokens or 0,
                ex.cost,
                (time.perf_counter() - ex.started_at) * 1000,
                ex.ttft_s * 1000 if ex.ttft_s is not None else None,
                status,
                # An upstream's error code is passed on as it came; the column holds 64 characters, and a
                # record that does not fit is dropped by the writer (quota/usage.py) with its tokens and cost.
                ex.error_code[:64] if ex.error_code else None,
                ex.cache_hit,
                ex.moderation,
            ),
            ex.request_id if ex.background else None,
        )

    # -- lifespan -----------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    self.log.error("startup_failed", error=str(exc))
                    flush_logs()
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def preflight(self) -> None:
        """Everything that must hold before serving: raises StartupError naming the fix."""
        auth = self.config.auth
        if not (auth.api_keys or auth.jwt.enabled or auth.allow_anonymous):
            raise StartupError("auth: no way to authenticate: enable api_keys or jwt (or allow_anonymous for trials).")
        try:
            hasher = KeyHasher(key_secret(self.config)) if auth.api_keys else None
        except KeySecretMissing as exc:
            raise StartupError(str(exc)) from exc
        jwt = None
        if auth.jwt.enabled:
            try:
                jwt = JwtVerifier(auth.jwt, set(self.config.tiers))
            except (JwtSetupError, OSError, ValueError) as exc:
                raise StartupError(f"auth.jwt: {exc}") from exc
        try:
            needs_migration = await pending(self.engine)
        except Exception as exc:
            raise StartupError(f"store.database_url: cannot reach the database: {exc}") from exc
        if needs_migration:
            if not self.config.store.auto_migrate:
                raise StartupError(
                    "The database schema is not up to date. Run `portcullis db upgrade --config FILE` "
                    "(or set store.auto_migrate: true)."
                )
            migrator = make_engine(self.config.store.database_url)  # no statement deadline: may take long
            try:
                await upgrade(migrator)
            finally:
                await migrator.dispose()
        if hasher is not None:
            self.keys = KeyStore(self.engine, hasher)
        self.model_state = ModelState(self.engine)
        if self.config.store.redis_url:
            self.bus = EventBus(self.config.store.redis_url, timeout_s=self.config.store.redis_timeout_s)
        # Revocations count as pushed once the bus has subscribed (startup), and only while it stays so.
        self.identity = Identity(
            self.config,
            self.keys if auth.api_keys else None,
            hasher,
            jwt,
            pushed_invalidation=False,
            health=self.db_health,
        )
        # Failed authentications are counted where the quotas are: in Redis, shared by every process.
        self.identity.throttle.shared = self.quota.redis
        self.metrics.count(
            "portcullis_event_bus_publish_failures",
            "Events (revocations, model switches) Redis did not take; the database still has them",
            lambda: self.bus.publish_failures if self.bus is not None else 0,
        )
        self.metrics.count(
            "portcullis_auth_stale_keys",
            "Requests authenticated from a cached key while the database could not confirm it",
            lambda: self.identity.stale_served if self.identity is not None else 0,
        )
        if self.config.tracing.enabled and self.tracing is None:
            try:
                self.tracing = Tracing(self.config.tracing)
            except TracingUnavailable as exc:
                raise StartupError(str(exc)) from exc
        if auth.allow_anonymous:
            self.log.warning("anonymous_access_enabled", detail="requests without credentials get every scope")
        await self._bootstrap_admin_key()

    async def _bootstrap_admin_key(self) -> None:
        bootstrap = os.environ.get("PORTCULLIS_BOOTSTRAP_ADMIN_KEY")
        if not bootstrap or self.keys is None:
            return
        key_id = key_id_of(bootstrap)
        if key_id is None:
            raise StartupError("PORTCULLIS_BOOTSTRAP_ADMIN_KEY is not a Portcullis key (pc-<16 hex>-<32+ chars>).")
        if await self.keys.count() == 0:  # only on a first start: never resurrect a revoked key
            tier = max(self.config.tiers, key=lambda t: self.config.tiers[t].priority)
            await self.keys.create(
                user="admin", tier=tier, scopes=tuple(sorted(scopes.ALL)), key=bootstrap, label="bootstrap admin key"
            )
            self.log.info("bootstrap_admin_key_created", key_id=key_id)

    async def startup(self) -> None:
        if self.identity is None:
            await self.preflight()
        assert self.identity is not None
        for replica in self.catalog.all_replicas():
            replica.client = UpstreamClient(
                replica.url,
                api_key=replica.api_key,
                config=self.config.upstream,
                timeouts=self.config.timeouts_for(replica.model),
                max_connections=replica.max_connections,
            )
        if self.model_state is not None:
            self.catalog.disabled = await self.model_state.disabled_models()
            if self.bus is not None:
                await self.bus.start(self._on_event, self._on_bus_connection)
            # Model switches are polled from the database whenever the bus is not there to push them.
            self._background.append(asyncio.create_task(self._poll_model_state()))
        self.identity.start()
        await self.moderation.start()
        LAG.start()
        self.deadlines.start()
        self.memory.start()
        self.timeline.start()
        self.admission.start()
        self.quota.start()
        self.usage.start()
        self._background.append(asyncio.create_task(self._tick_throughput()))
        await self.prober.first_round()
        self.prober.start()
        if self.batch_runner is not None:
            self.batch_runner.start()
        # Everything allocated so far lives as long as the process: move it out of the collector's
        # reach, so the collections that per-request garbage triggers do not rescan it each time.
        gc.collect()
        gc.freeze()
        self.log.info("started", models={m: [r.state.value for r in rs] for m, rs in self.catalog.models.items()})

    async def shutdown(self) -> None:
        if self.batch_runner is not None:
            await self.batch_runner.stop()
        await self.prober.stop()
        await self.deadlines.stop()
        await self.memory.stop()
        await LAG.stop()
        await self.timeline.stop()
        await self.admission.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.identity is not None:
            await self.identity.stop()
        await self.quota.stop()
        await self.cache.close()
        await self.moderation.close()
        await self.usage.stop()
        if self.bus is not None:
            await self.bus.close()
        await self.db_health.stop()
        for replica in self.catalog.all_replicas():
            if replica.client is not None:
                await replica.client.close()
        await self.engine.dispose()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # the last spans go out before the process ends
        self.log.info("stopped")
        flush_logs()

    # -- state shared between processes --------------------------------------------------------

    async def publish(self, event: dict[str, Any]) -> None:
        """Tell every process (this one directly, the others over the bus when there is one). The change is
        already saved: if Redis does not take the event, the others see it within the key cache's short TTL
        (they are not connected either) or at their next poll, so this never fails the admin's request."""
        self._on_event(event)
        if self.bus is not None:
            await self.bus.publish(event)

    def _on_bus_connection(self, connected: bool) -> None:
        self.metrics.bus_connected.set(1 if connected else 0)
        if self.identity is not None:
            self.identity.revocations_pushed(connected)
        if connected and self.model_state is not None:
            # A switch made between the last poll and the subscription is in no event: read it once.
            task = asyncio.get_running_loop().create_task(self._read_model_state())
            self._background.append(task)
            task.add_done_callback(self._background.remove)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "key" and self.identity is not None:
            self.identity.invalidate(str(event.get("id")))
        elif event.get("type") == "model":
            name = str(event.get("name"))
            if event.get("disabled"):
                self.catalog.disabled.add(name)
            else:
                self.catalog.disabled.discard(name)

    async def _poll_model_state(self) -> None:
        while True:
            await asyncio.sleep(_MODEL_POLL_S)
            if self.bus is None or not self.bus.connected:  # else pushed
                await self._read_model_state()

    async def _read_model_state(self) -> None:
        assert self.model_state is not None
        try:
            async with asyncio.timeout(self.config.store.timeout_s):
                self.catalog.disabled = await self.model_state.disabled_models()
        except Exception as exc:
            self.log.warning("model_state_poll_failed", error=type(exc).__name__)

    async def _tick_throughput(self) -> None:
        while True:
            await asyncio.sleep(_THROUGHPUT_TICK_S)
            self.catalog.tick()

    # -- requests the gateway makes to itself --------------------------------------------------

    async def call_internal(
        self, method: str, path: str, body: bytes, principal: Principal, *, request_id: str
    ) -> Answer:
        """Run one request through the whole request path as `principal`, in the background (batch lines):
        the status and body a client would have got, and a refusal's code and wait as values."""
        internal = _Internal(principal)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
            "client": None,
            "server": None,
            INTERNAL: internal,
        }
        sent = False
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never  # nobody disconnects; the wait ends when the request's watcher is cancelled
            return {"type": "http.disconnect"}

        status = 0
        headers: dict[bytes, bytes] = {}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.update(message.get("headers", ()))
            else:
                chunks.append(message.get("body", b""))

        await isolated(self.handle(scope, receive, send))
        return Answer(status, b"".join(chunks), internal.error, _retry_after(headers) if status >= 400 else 0.0)

    # -- replicas and breakers -----------------------------------------------------------------

    def _on_breaker(self, breaker: Breaker, old: BreakerState, new: BreakerState, reason: str) -> None:
        replica = self._replica_of[breaker]
        self.metrics.breaker_transitions.labels(replica.model, replica.name, new.value).inc()
        log = self.log.warning if new is BreakerState.OPEN else self.log.info
        log("breaker", model=replica.model, replica=replica.name, old=old.value, new=new.value, reason=reason)
        self.admission.kick(replica.model)
        if new is BreakerState.OPEN:
            self.admission.kick_later(replica.model, breaker.config.open_s)

    def _on_replica_change(self, replica: Replica) -> None:
        if replica.state is ReplicaState.DOWN and self._elsewhere(replica):
            # Probes found it dead (hung, gone): the attempts still waiting on it for an answer would wait out
            # their whole time limit. Cut them now (the watchdog's next tick) and retry them elsewhere. Streams
            # that are flowing are left alone: their tokens say the replica lives (the idle limit watches them).
            # With nowhere else to go they wait on: probes cannot tell a hung replica from a swamped one.
            # One that answered requests while its probes failed is swamped, not hung: its requests are left.
            if replica.answered_at < replica.failing_since:
                now = asyncio.get_running_loop().time()
                for ex in self.exchanges:
                    if ex.replica is replica and ex.deadline > 0.0 and ex.streamed_tokens == 0:
                        ex.replica_lost = True
                        ex.deadline = now
        self.admission.kick(replica.model)

    def _elsewhere(self, replica: Replica) -> bool:
        """Is there another usable replica of its model, or of a fallback, to retry its requests on?"""
        now = time.monotonic()
        models = [replica.model, *self.catalog.fallbacks.get(replica.model, [])]
        usable = (r for m in models if m not in self.catalog.disabled for r in self.catalog.models[m])
        return any(r is not replica and r.usable(now) for r in usable)

    # -- graceful shutdown --------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: stop being ready at once; the server stops accepting after the grace."""
        if not self.draining:
            self.draining = True
            self.log.info("draining", in_flight=len(self.exchanges))
            # Queued requests have not started: answer them now (503 + Retry-After), do not drop them.
            self.admission.close()
            if self.batch_runner is not None:  # its running lines go back to pending for the next process
                self.batch_runner.drain()

    def cut_in_flight(self) -> None:
        """The shutdown deadline: end whatever is still running (streams get an error event)."""
        for ex in list(self.exchanges):
            if ex.route not in self._quiet:
                ex.abort(Abort.SHUTDOWN)


# SQLAlchemy's errors that mean the database is away (a refused or dropped connection, a pool timeout), not
# that the statement was wrong.
_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
_DRIVERS = ("/sqlalchemy/", "/asyncpg/", "/aiosqlite/", "/sqlite3/")


def _from_store(exc: BaseException) -> bool:
    """Did this come from the database (its driver or SQLAlchemy)? The drivers raise builtin errors."""
    if isinstance(exc, SQLAlchemyError):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if any(part in tb.tb_frame.f_code.co_filename for part in _DRIVERS):
            return True
        tb = tb.tb_next
    return False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("portcullis")
    except PackageNotFoundError:
        return "0"


def create_app(config: Config) -> Gateway:
    return Gateway(config)
