"""The HTTP layer: a request object over raw ASGI, the body cap enforced while reading, responses.

Plain ASGI rather than a framework: the benchmark target is a bare uvicorn + aiohttp pass-through,
and routing here is a dict lookup on (method, path). Nothing in this module buffers a streamed body.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import orjson

from portcullis.errors import GatewayError, PayloadTooLarge

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_REQUEST_ID_OK = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# On every response: browsers must not sniff a JSON error (which may echo input) into HTML or script.
NOSNIFF = (b"x-content-type-options", b"nosniff")
OVERHEAD = b"x-portcullis-overhead-ms"
# An ASGI extension of our server (edge.py): scope["extensions"][DISCONNECT](callback) has `callback` called when
# the client goes away mid-request (None: no longer). Under another server, a task waits in `receive` instead.
DISCONNECT = "portcullis.disconnect"


class UpstreamTime(Protocol):
    """What a request's answer tells of the time its upstream took (the Exchange)."""

    upstream_s: float


def _overhead(req: Request) -> tuple[bytes, bytes]:
    """`x-portcullis-overhead-ms`: the time this request spent in the gateway, not waiting on the upstream, until its
    answer's head (a whole answer: all of it but its sending; a stream: until its first event went out). The
    portcullis_overhead_seconds histogram has each request's whole time, a stream's relay included."""
    spent = time.perf_counter() - req.started - (req.timed.upstream_s if req.timed is not None else 0.0)
    return (OVERHEAD, b"%.3f" % (max(spent, 0.0) * 1000))


class Request:
    """One HTTP request. Holds what every stage needs and nothing it has to compute twice."""

    __slots__ = (
        "_headers",
        "anthropic",
        "disconnected",
        "ended",
        "hold",
        "method",
        "path",
        "receive",
        "request_id",
        "response_headers",
        "scope",
        "send",
        "started",
        "status",
        "timed",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started = time.perf_counter()
        self.scope = scope
        self.anthropic = False  # errors in Anthropic's shape (the Messages API's routes)
        self.ended = False  # a stream's last byte was sent
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self._headers: dict[bytes, bytes] | None = None
        self.status = 0
        self.disconnected = False
        self.timed: UpstreamTime | None = None  # the exchange, once there is one (the overhead header)
        # Awaited before the first byte of an answer goes out (a parallel moderation verdict); it may raise.
        self.hold: Callable[[], Awaitable[None]] | None = None
        rid = self.header(b"x-request-id")
        self.request_id = rid.decode() if rid and _REQUEST_ID_OK.match(rid) else os.urandom(12).hex()
        self.response_headers: list[tuple[bytes, bytes]] = [(b"x-request-id", self.request_id.encode()), NOSNIFF]

    def header(self, name: bytes) -> bytes | None:
        if self._headers is None:
            self._headers = dict(self.scope["headers"])
        return self._headers.get(name)

    def _refuse_declared(self, limit: int) -> None:
        declared = self.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"The request body is {int(declared)} bytes; the limit is {limit}.")

    async def read_body(self, limit: int) -> bytes:
        """The whole body, refusing with 413 as soon as it is known to exceed `limit` bytes."""
        declared = self.header(b"content-length")  # (_refuse_declared inlined: every request passes here)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"The request body is {int(declared)} bytes; the limit is {limit}.")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def iter_body(self, limit: int) -> AsyncIterator[bytes]:
        """The body chunk by chunk as it arrives (uploads), refusing with 413 past `limit` bytes. (read_body
        stays a loop of its own: an async generator would cost every request a microsecond.)"""
        self._refuse_declared(limit)
        size = 0
        more = True
        while more:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            if chunk:
                yield chunk
            more = message.get("more_body", False)

    def on_disconnect(self, callback: Callable[[], None] | None) -> bool:
        """Have `callback` called when the client goes away (None: no longer); False when the server cannot
        (then wait_disconnect)."""
        extensions = self.scope.get("extensions")
        hook = extensions.get(DISCONNECT) if extensions else None
        if hook is None:
            return False
        hook(callback)
        return True

    async def wait_disconnect(self) -> None:
        """Returns when the client goes away. Only call once the body has been read."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                return

    async def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = JSON_HEADERS) -> None:
        if self.hold is not None:
            await self.hold()
        self.status = status
        # A length, not chunks: a whole answer is framed once, and the head and body go out in one write (edge.py).
        head = [*self.response_headers, _overhead(self), *headers]
        if status >= 200 and status not in (204, 304):  # (no length on those: RFC 9110)
            head.append((b"content-length", b"%d" % len(body)))
        await self.send({"type": "http.response.start", "status": status, "headers": head})
        await self.send({"type": "http.response.body", "body": body})

    async def respond_json(self, status: int, value: Any) -> None:
        await self.respond(status, orjson.dumps(value))

    async def respond_error(self, error: GatewayError) -> None:
        self.hold = None  # an error tells nothing that needs a verdict
        extra = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        body = error.anthropic_body(self.request_id) if self.anthropic else error.body()
        await self.respond(error.status, body, JSON_HEADERS + extra)

    async def start_stream(self, status: int = 200) -> None:
        if self.hold is not None:
            await self.hold()
        self.status = status
        head = [*self.response_headers, _overhead(self), *SSE_HEADERS]
        await self.send({"type": "http.response.start", "status": status, "headers": head})

    async def stream_chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self) -> None:
        self.ended = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


class ClientDisconnected(Exception):
    """The client went away; nothing more can be sent to it."""
