"""The ASGI dispatch: every request's frame, read top to bottom like the request path in DESIGN.md.

route (the table in api/routes.py) → (CORS) → authenticate → require the route's scope → the handler (which
reads the body, validates, routes, admits quotas, moderates, consults the cache, takes a slot and goes
upstream: api/openai.py) → the answer. Errors from any stage are `GatewayError`s and become the OpenAI error
JSON here; a cut request is answered by its abort reason. When it is over: the request's tokens are accounted
once, every response filter's `done` runs (exchange.py), and the metrics and the access line are recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from portcullis.api.routes import Route
from portcullis.config import Config
from portcullis.errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
)
from portcullis.exchange import Abort, Exchange, Filter
from portcullis.http import JSON_HEADERS, NOSNIFF, ClientDisconnected, Receive, Request, Scope, Send
from portcullis.identity import scopes
from portcullis.identity.principal import Principal
from portcullis.obs.logging import access_line, bind_principal, bind_request

if TYPE_CHECKING:
    import re

    from portcullis.identity.auth import Identity
    from portcullis.obs.metrics import Metrics
    from portcullis.obs.tracing import Tracing
    from portcullis.quota.usage import UsageRecorder
    from portcullis.routing.router import Router
    from portcullis.store.health import DatabaseHealth

# The ASGI scope key of requests the gateway makes to itself (batch lines): who they run as (internal.py). A
# request from the network never has it (uvicorn builds those scopes).
INTERNAL = "portcullis.internal"
_CORS_EXPOSE = (
    b"x-request-id, retry-after, retry-after-ms, x-portcullis-attempts, x-portcullis-degraded, x-portcullis-cache, "
    b"x-portcullis-cache-similarity, x-portcullis-overhead-ms, "
    b"x-portcullis-queue-wait-ms, x-portcullis-route, "
    b"x-ratelimit-limit-requests, "
    b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
    b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"
)


async def refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
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


class Internal:
    """What a request the gateway makes to itself carries in its ASGI scope: who it runs as; and what the
    request path leaves there for the caller: the refusal's code."""

    __slots__ = ("error", "principal")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.error: str | None = None


class _Metering(Filter):
    """The app's own response half on metered routes: the usage record, and what the router learns from a
    whole answer's prompt count. Added first, so its `done` runs last: after the quota stage settled the
    tokens and cost it records."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Dispatcher) -> None:
        self.gateway = gateway

    def done(self, ex: Exchange, status: int) -> None:
        self.gateway.record_usage(ex, status)
        if ex.prompt_size is not None and status == 200:
            self.gateway.router.learn(ex)


class Dispatcher:
    """The request path's frame. Built from the route table and what the frame itself touches: the live
    exchanges (the shutdown deadline and the watchdogs walk them), authentication (made at preflight), the
    records made of each request (metrics, access line, usage record, the router's learning)."""

    def __init__(
        self,
        config: Config,
        table: list[Route],
        *,
        exchanges: set[Exchange],
        metrics: Metrics,
        usage: UsageRecorder,
        router: Router,
        db_health: DatabaseHealth,
        log: Any,
        identity: Callable[[], Identity | None],
    ) -> None:
        self.config = config
        self.exchanges = exchanges
        self.metrics = metrics
        self.usage = usage
        self.router = router
        self.db_health = db_health
        self.log = log
        self._identity = identity
        self.tracing: Tracing | None = None  # set at preflight when enabled (tests may set their own)
        self.cors_origins = {o.encode() for o in config.server.cors_origins}
        self.hsts = (
            f"max-age={config.server.hsts_max_age_s}; includeSubDomains".encode()
            if config.server.ssl_certfile
            else None
        )
        # The route table (api/routes.py): fixed paths by (method, path), then the paths with an id in them.
        self.routes: dict[tuple[str, str], Route] = {(r.method, r.path): r for r in table if r.pattern is None}
        self.pattern_routes: list[tuple[re.Pattern[str], Route]] = [
            (pattern, r) for r in table if (pattern := r.pattern) is not None
        ]
        self._paths = {path for _, path in self.routes}
        # By path, whatever the method: a probe's 405 is as quiet as its 200, a 405 on a metered path is recorded.
        self.quiet = {r.path for r in table if r.quiet}
        self._metered = {r.path for r in table if r.metered}
        self._metering = _Metering(self)
        # The OpenAI routes are served without their /v1 too (as llama-server and other gateways do: a client
        # configured with a bare base URL calls /chat/completions): their first segments, to prefix.
        self._bare = {"/" + r.path.split("/")[2] for r in table if r.path.startswith("/v1/")}

    @property
    def identity(self) -> Identity | None:
        return self._identity()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = Request(scope, receive, send)
        bind_request(req.request_id)
        raw_path = scope.get("raw_path")
        if raw_path is not None and b"%" in raw_path:
            # Route on the path as sent: uvicorn's decoded one would let /%61dmin/keys reach /admin/keys (a
            # proxy's path rules see the raw form). _route decodes what a pattern route captures.
            req.path = raw_path.decode("latin-1")
        if req.path[:4] != "/v1/":
            path = req.path
            cut = path.find("/", 1)
            if (path if cut < 0 else path[:cut]) in self._bare:  # (as sent: /%63hat/... is no OpenAI route)
                req.path = "/v1" + path
        if self.hsts is not None:
            req.response_headers.append((b"strict-transport-security", self.hsts))
        ex = Exchange(route=req.path, task=asyncio.current_task(), started_at=req.started, request_id=req.request_id)
        req.timed = ex
        quiet = req.path in self.quiet
        if self.tracing is not None and not quiet:
            ex.trace = self.tracing.begin(req)
        internal: Internal | None = scope.get(INTERNAL)
        metered = req.path in self._metered
        if metered:  # the usage record and the router's learning, after every other filter's done
            ex.filters.append(self._metering)
        self.exchanges.add(ex)
        try:
            if req.method == "OPTIONS" or self.cors_origins:
                if await self._cors(req):
                    return
            route, args = self._route(req)
            req.anthropic = route.anthropic
            if internal is not None:  # the gateway's own background request (a batch line)
                ex.principal, ex.background = internal.principal, True
            elif route.scope is not scopes.PUBLIC:
                assert self.identity is not None
                if ex.trace is not None:
                    ex.trace.stage("authenticate")
                ex.principal = await self.identity.authenticate(req)
                route.check(ex.principal)
            bind_principal(ex.principal)
            if ex.trace is not None:
                ex.trace.stage("validate")  # the handler reads, parses and validates the body first
            await route.handler(route.deps, req, ex, *args)
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
            what = "The database did not answer" if store else "A resource the gateway needs was unavailable"
            if req.status == 0:
                await req.respond_error(
                    ServiceUnavailable(f"{what}; try again shortly.", code=ex.error_code, headers={"Retry-After": "2"})
                )
            else:
                await self._end_in_error(req, ex, f"{what}; the stream was ended.")
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
                try:
                    f.done(ex, status)
                except Exception:  # one stage's failure must not skip the others' (a settle, a lease, a record)
                    self.log.exception("response_filter_failed", filter=type(f).__name__)
            if not quiet:
                self._record(req, ex)
            if ex.trace is not None:
                ex.trace.finish(req, ex)

    async def _unhandled(self, req: Request, ex: Exchange) -> None:
        self.log.exception("unhandled_error", path=req.path)
        ex.error_code = "internal_error"
        message = "The gateway failed to handle the request."
        if req.status == 0:
            await req.respond_error(GatewayError(message))
        else:
            await self._end_in_error(req, ex, message + " The stream was ended.")

    async def _end_in_error(self, req: Request, ex: Exchange, message: str) -> None:
        """A stream under way ends with an error event, never silently."""
        if not ex.stream or req.ended:
            return
        try:
            await req.stream_chunk(ex.error_event(message, code=ex.error_code))
            await req.end_stream()
        except Exception:  # the client is gone, or the error event itself failed: nothing more can be said
            self.log.warning("stream_not_ended", path=req.path)

    def _route(self, req: Request) -> tuple[Route, tuple[str, ...]]:
        return self.match(req.method, req.path)

    def match(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        """The route of a method and a raw path, and its path parameters (decoded); 404 or 405 otherwise. (The
        console calls the admin routes through it: api/console.py.)"""
        found = self.routes.get((method, path))
        if found is not None:
            return found, ()
        path_known = path in self._paths
        for pattern, route in self.pattern_routes:
            match = pattern.fullmatch(path)  # (match's $ also matched before a trailing %0a)
            if match:
                if route.method == method:
                    if "%" in path:  # a raw path (handle): the handler gets the decoded id
                        return route, tuple(unquote(group) for group in match.groups())
                    return route, match.groups()
                path_known = True
        if path_known:
            raise MethodNotAllowed(f"{method} is not allowed on {path}.")
        raise NotFound(f"Unknown path {path}.", code="unknown_url")

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
                await req.stream_chunk(ex.error_event(message, code=ex.error_code))
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
