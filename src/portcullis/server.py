"""Running an ASGI app under uvicorn (uvloop + httptools, with the edge's connection limits), with the gateway's
graceful shutdown.

SIGTERM (or the first Ctrl-C) starts a drain instead of uvicorn's immediate stop:
  t=0                 /readyz answers 503; new connections are still accepted, so a load balancer
                      has time to notice;
  t=drain_grace_s     the listener closes (new connections are refused); idle keep-alive
                      connections are closed; in-flight requests and streams keep running;
  t=shutdown_timeout_s whatever still runs is cut: a request not yet answered gets 503, a stream
                      gets an error event and its end; then the process exits 0.
A second signal forces an immediate exit. uvicorn's own handler would re-raise the signal after
shutdown (exit status -15); ours does not, so a drained gateway exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import uvicorn

from portcullis.edge import Edge


def uvicorn_config(
    app: Any, *, host: str, port: int, keep_alive_s: float, edge: Edge | None = None, **extra: Any
) -> uvicorn.Config:
    """With an `edge`, connections get its limits (edge.py) and WebSocket upgrades are not served (the gateway
    has no WebSocket route; an upgrade request is answered as plain HTTP)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=edge.protocol_class() if edge is not None else "httptools",
        ws="none" if edge is not None else "auto",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        # X-Forwarded-* trust is a deployment decision (docs/operations.md); uvicorn's middleware
        # for it cost about 1% of the gateway's CPU per request.
        proxy_headers=False,
        timeout_keep_alive=int(keep_alive_s),
        backlog=8192,
        **extra,
    )


class QuietServer(uvicorn.Server):
    """A server that leaves signals alone (the simulator inside `serve --demo`, tests)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_drain: Callable[[], None],
        on_deadline: Callable[[], None],
        drain_grace_s: float,
        shutdown_timeout_s: float,
    ) -> None:
        # uvicorn cancels what still runs this long after the listener closes; our own deadline
        # comes first and ends streams properly, so uvicorn's is only a backstop.
        config.timeout_graceful_shutdown = int(shutdown_timeout_s) + 3
        super().__init__(config)
        self._on_drain = on_drain
        self._on_deadline = on_deadline
        self._grace = drain_grace_s
        self._timeout = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            self.should_exit = True
            self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        self._on_drain()
        await asyncio.sleep(min(self._grace, self._timeout))
        self.should_exit = True
        await asyncio.sleep(max(deadline - loop.time(), 0))
        self._on_deadline()

    def request_drain(self) -> None:
        """The same drain as SIGTERM, for callers in the event loop."""
        self._start_drain()


def bound_port(server: uvicorn.Server) -> int | None:
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets or []:
            port: int = sock.getsockname()[1]  # a TCP address: (host, port[, flowinfo, scope_id])
            return port
    return None
