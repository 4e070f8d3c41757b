"""The gateway as an ASGI app, built from a Config: routes, stages, lifespan, shutdown drain.

Routes are listed explicitly below; each handler in api/ reads top to bottom like the request path.
Errors from any stage are `GatewayError`s and become the OpenAI error JSON here, in one place.
"""

from __future__ import annotations

import asyncio
import gc
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from portcullis.api import openai, ops
from portcullis.config import Config
from portcullis.errors import GatewayError, MethodNotAllowed, NotFound, ServiceUnavailable
from portcullis.http import ClientDisconnected, Receive, Request, Scope, Send
from portcullis.obs.logging import access_line, flush_logs, get_logger
from portcullis.obs.metrics import Metrics
from portcullis.routing.catalog import Catalog
from portcullis.upstream.client import UpstreamClient
from portcullis.upstream.exchange import ABORT_CLIENT_GONE, ABORT_SHUTDOWN, Exchange
from portcullis.upstream.probe import Prober
from portcullis.upstream.relay import sse_error

Handler = Callable[..., Awaitable[None]]

_MODEL_PATH = re.compile(r"^/v1/models/(.+)$")
# Routes whose requests get an access-log line and request metrics (ops probes would drown them).
_QUIET = {"/healthz", "/readyz", "/metrics"}


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = Catalog.from_config(config)
        self.metrics = Metrics(self.catalog)
        self.prober = Prober(self.catalog.all_replicas(), config.health)
        self.log = get_logger("portcullis")
        self.started_at = time.time()
        self.draining = False
        self.exchanges: set[Exchange] = set()
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): openai.chat_completions,
            ("POST", "/v1/completions"): openai.completions,
            ("POST", "/v1/embeddings"): openai.embeddings,
            ("GET", "/v1/models"): openai.list_models,
            ("GET", "/healthz"): ops.healthz,
            ("GET", "/readyz"): ops.readyz,
            ("GET", "/metrics"): ops.metrics,
        }
        self._paths = {path for _, path in self.routes}

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = Request(scope, receive, send)
        ex = Exchange(route=req.path, task=asyncio.current_task(), started_at=req.started)
        self.exchanges.add(ex)
        try:
            handler, args = self._route(req)
            await handler(self, req, ex, *args)
        except GatewayError as error:
            ex.error_code = error.code or error.type
            if req.status == 0:
                await req.respond_error(error)
        except ClientDisconnected:
            req.status = req.status or 499
        except asyncio.CancelledError:
            if ex.abort_reason is None:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await self._after_abort(req, ex)
        except Exception:
            self.log.exception("unhandled_error", request_id=req.request_id, path=req.path)
            ex.error_code = "internal_error"
            if req.status == 0:
                await req.respond_error(GatewayError("The gateway failed to handle the request."))
        finally:
            self.exchanges.discard(ex)
            ex.stop_watching()
            if req.path not in _QUIET:
                self._record(req, ex)

    def _route(self, req: Request) -> tuple[Handler, tuple[Any, ...]]:
        handler = self.routes.get((req.method, req.path))
        if handler is not None:
            return handler, ()
        match = _MODEL_PATH.match(req.path)
        if match and req.method == "GET":
            return openai.get_model, (match.group(1),)
        if req.path in self._paths:
            raise MethodNotAllowed(f"{req.method} is not allowed on {req.path}.")
        raise NotFound(f"Unknown path {req.path}.", code="unknown_url")

    async def _after_abort(self, req: Request, ex: Exchange) -> None:
        if ex.abort_reason == ABORT_CLIENT_GONE:
            req.status = req.status or 499
            return
        if ex.abort_reason == ABORT_SHUTDOWN:
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
        )
        if self.config.server.access_log:
            access_line(
                {
                    "request_id": req.request_id,
                    "method": req.method,
                    "path": req.path,
                    "status": req.status,
                    "model": ex.model,
                    "replica": ex.replica.name if ex.replica else None,
                    "stream": ex.stream,
                    "duration_ms": round(total * 1000, 3),
                    "upstream_ms": round(ex.upstream_s * 1000, 3),
                    "ttft_ms": round(ex.ttft_s * 1000, 3) if ex.ttft_s is not None else None,
                    "prompt_tokens": ex.prompt_tokens,
                    "completion_tokens": ex.completion_tokens,
                    "error": ex.error_code,
                }
            )

    # -- lifespan -----------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        for replica in self.catalog.all_replicas():
            replica.client = UpstreamClient(replica.url, api_key=replica.api_key, config=self.config.upstream)
        await self.prober.first_round()
        self.prober.start()
        # Everything allocated so far lives as long as the process: move it out of the collector's
        # reach, so the collections that per-request garbage triggers do not rescan it each time.
        gc.collect()
        gc.freeze()
        self.log.info(
            "started",
            models={m: [r.state.value for r in rs] for m, rs in self.catalog.models.items()},
        )

    async def shutdown(self) -> None:
        await self.prober.stop()
        for replica in self.catalog.all_replicas():
            if replica.client is not None:
                await replica.client.close()
        self.log.info("stopped")
        flush_logs()

    # -- graceful shutdown --------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: stop being ready at once; the server stops accepting after the grace."""
        if not self.draining:
            self.draining = True
            self.log.info("draining", in_flight=len(self.exchanges))

    def cut_in_flight(self) -> None:
        """The shutdown deadline: end whatever is still running (streams get an error event)."""
        for ex in list(self.exchanges):
            if ex.route not in _QUIET:
                ex.abort(ABORT_SHUTDOWN)


def create_app(config: Config) -> Gateway:
    return Gateway(config)
