"""The connection edge: limits that hold before a request exists, so nobody unauthenticated can exhaust the gateway.

uvicorn's httptools protocol has no limit on a request's head (httptools buffers an unfinished header
without bound: four sockets sending 64 MiB of it added 255 MiB to the process), no deadline before a
connection's first request and none for a body, and no cap on connections (a 300-descriptor gateway
stopped answering under 320 idle sockets). This module adds them as a thin subclass of that protocol;
the request path itself is untouched. (Chosen by measurement over Granian and Hypercorn: docs/security.md.)

What it enforces, per server process:
  head size    a request's line and headers together may take `head_max_bytes`; more is 431 and the
               connection closes. Checked before bytes reach the parser, so nothing past the limit is held.
  head time    a new connection must deliver a whole head within `head_timeout_s` of connecting; a
               keep-alive connection, within `head_timeout_s` of its next request's first byte. Late:
               408 (or a silent close when nothing was sent) and the connection closes.
  head fields  at most `head_max_fields` header fields (Envoy's default, 100); more is 431. Trailers after a
               chunked body are read within the same byte limit and dropped (never added to the request's
               headers, which the handler already holds).
  body time    a request's body must arrive within `body_timeout_s` of its head, plus a second for each
               `body_min_rate` bytes received (a large upload over a slow link is not cut; a trickle is);
               late: 408, closed.
  write time   a client that stops reading (the answer backs up past the socket's high-water mark) for
               `write_timeout_s` is cut: its stream would otherwise hold a task and an upstream slot.
  idle time    a keep-alive connection idle for `keep_alive_s` is closed (uvicorn's own timer, replaced
               by the sweep below: one timer per process instead of one per request).
  connections  at most `max_connections` open; at the cap the oldest connection with no request in
               progress (silent, trickling a head, or idle keep-alive) is closed to make room, and only
               when every connection is busy with a request is the new one refused (503). At most
               `max_connections_per_client` from one address; over it, refused (503).
An address is counted as itself (IPv4, an IPv4-mapped IPv6 address as its IPv4) or as its IPv6 /64: one
host commonly holds a whole /64.
Refusals are written in the OpenAI error shape with `connection: close`, then the socket is half-closed
and what the client still sends is read and dropped for a moment (a "lingering close"): closing with
unread input would make the kernel reset the connection and the client could lose the answer.

A request answered before its body arrived (an early 401 or 413) is followed by the same lingering close:
reading a body nobody wants would keep the connection busy for nothing.

Deadlines are checked by one sweep a second over the connections that have one (a dict each), against a
clock the sweep keeps; a request pays a few dict operations and no timer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import resource
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from portcullis.http import DISCONNECT

SWEEP_S = 1.0
LINGER_S = 2.0
MAX_LINGERING = 256  # past this many half-closed refusals, refuse by closing at once (each holds a descriptor)

# Parser phases of a connection (what the client is sending, not what we answer).
HEAD = 0  # waiting for, or receiving, a request head
BODY = 1  # head received, body arriving
DONE = 2  # the whole request received; an answer may be in progress
IDLE = 3  # keep-alive: answered, waiting for the next request


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    head_max_bytes: int = 65_536
    head_max_fields: int = 100
    head_timeout_s: float = 10.0
    body_timeout_s: float = 120.0
    body_min_rate: int = 65_536
    write_timeout_s: float = 60.0
    keep_alive_s: float = 75.0
    max_connections: int = 0  # 0: from the open-files limit (resolve())
    max_connections_per_client: int = 1024  # 0: no cap per address

    def resolve(self) -> EdgeLimits:
        """`max_connections: 0` becomes what the descriptors allow: each connection may hold a second descriptor
        (its upstream request), and the database, Redis, logs and the spool need a few."""
        if self.max_connections:
            return self
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        auto = max(16, min(16_384, (soft - 128) // 2))
        return dataclasses.replace(self, max_connections=auto)


def edge_limits(server: Any) -> EdgeLimits:
    """The limits of the `server` section of the config (config.ServerConfig)."""
    return EdgeLimits(
        head_max_bytes=server.head_max_bytes,
        head_max_fields=server.head_max_fields,
        head_timeout_s=server.head_timeout_s,
        body_timeout_s=server.body_timeout_s,
        body_min_rate=server.body_min_rate,
        write_timeout_s=server.write_timeout_s,
        keep_alive_s=server.keep_alive_s,
        max_connections=server.max_connections,
        max_connections_per_client=server.max_connections_per_client,
    )


def _refusal(status: int, reason: bytes, message: str, code: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            b"x-content-type-options: nosniff\r\nconnection: close\r\n",
            extra,
            b"\r\n",
            body,
        )
    )


def _refusals(limits: EdgeLimits) -> dict[str, bytes]:
    busy = "The gateway has too many open connections; retry shortly."
    return {
        "head_too_large": _refusal(
            431,
            b"Request Header Fields Too Large",
            f"The request line and headers exceed {limits.head_max_bytes} bytes.",
            "request_header_too_large",
        ),
        "too_many_headers": _refusal(
            431,
            b"Request Header Fields Too Large",
            f"The request has more than {limits.head_max_fields} header fields.",
            "request_header_too_large",
        ),
        "head_timeout": _refusal(
            408,
            b"Request Timeout",
            f"The request line and headers did not arrive within {limits.head_timeout_s:g} s.",
            "request_header_timeout",
        ),
        "body_timeout": _refusal(
            408,
            b"Request Timeout",
            f"The request body did not arrive within {limits.body_timeout_s:g} s.",
            "request_body_timeout",
        ),
        "too_many_connections": _refusal(
            503, b"Service Unavailable", busy, "too_many_connections", b"retry-after: 1\r\n"
        ),
        "too_many_connections_per_client": _refusal(
            503,
            b"Service Unavailable",
            "Too many open connections from this address; close idle ones or reuse them.",
            "too_many_connections_per_client",
            b"retry-after: 1\r\n",
        ),
        "bad_request": _refusal(400, b"Bad Request", "The request is not valid HTTP/1.1.", "invalid_http_request"),
    }


def client_key(host: str) -> str:
    """The address connections are counted under: IPv4 as itself (also when written as IPv4-mapped IPv6), IPv6
    by its /64 (a single host is commonly given a whole /64, so counting each address would not cap it)."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


class Edge:
    """The connections of one server process and their deadlines."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits.resolve()
        self.responses = _refusals(self.limits)
        self.open = 0
        self.per_client: dict[str, int] = {}
        # Connections with no request in progress, oldest first (dicts keep insertion order): the ones
        # closed to make room at the cap. Value: the deadline of their head (or of their keep-alive idling).
        self.waiting: dict[EdgeProtocol, float] = {}
        self.bodies: dict[EdgeProtocol, float] = {}
        self.writes: dict[EdgeProtocol, float] = {}  # answers backed up behind a client that does not read
        self.lingering: dict[EdgeProtocol, float] = {}
        self.now = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "head_too_large",
                "too_many_headers",
                "head_timeout",
                "body_timeout",
                "write_timeout",
                "idle_timeout",
                "too_many_connections",
                "too_many_connections_per_client",
                "evicted",
                "bad_request",
            ),
            0,
        )

    def protocol_class(self) -> type[EdgeProtocol]:
        """The protocol class uvicorn instantiates per connection, bound to this edge."""
        limits = self.limits
        # The limits as class attributes: one lookup each on the per-request path instead of two.
        return type(
            "EdgeProtocol",
            (EdgeProtocol,),
            {
                "edge": self,
                "head_max_bytes": limits.head_max_bytes,
                "head_max_fields": limits.head_max_fields,
                "head_timeout_s": limits.head_timeout_s,
                "body_timeout_s": limits.body_timeout_s,
                "body_min_rate": limits.body_min_rate,
                "write_timeout_s": limits.write_timeout_s,
                "keep_alive_s": limits.keep_alive_s,
            },
        )

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = loop.time()
        self._sweeper = loop.call_later(SWEEP_S, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _sweep(self) -> None:
        assert self._loop is not None
        try:
            now = self.now = self._loop.time()
            for proto in [p for p, deadline in self.waiting.items() if deadline <= now]:
                proto.expire_waiting()
            for proto in [p for p, deadline in self.bodies.items() if deadline <= now]:
                proto.expire_body(now)
            for proto in [p for p, deadline in self.writes.items() if deadline <= now]:
                self.writes.pop(proto, None)
                self.counts["write_timeout"] += 1
                proto.transport.abort()  # close() would wait for the backed-up answer to drain: it never will
            for proto in [p for p, deadline in self.lingering.items() if deadline <= now]:
                self.lingering.pop(proto, None)
                proto.transport.abort()
        finally:  # one connection's failure must not end every deadline
            self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)

    def admit(self, proto: EdgeProtocol, address: str) -> str | None:
        """None when the connection may stay (counted), else the refusal's name."""
        limits = self.limits
        per_client = self.per_client.get(address, 0)
        if limits.max_connections_per_client and per_client >= limits.max_connections_per_client:
            return "too_many_connections_per_client"
        if self.open >= limits.max_connections:
            if not self.waiting:
                return "too_many_connections"
            oldest = next(iter(self.waiting))
            self.counts["evicted"] += 1
            oldest.evict()
        self.open += 1
        self.per_client[address] = per_client + 1
        return None

    def release(self, proto: EdgeProtocol, address: str) -> None:
        self.open -= 1
        left = self.per_client.get(address, 1) - 1
        if left > 0:
            self.per_client[address] = left
        else:
            self.per_client.pop(address, None)
        self.waiting.pop(proto, None)
        self.bodies.pop(proto, None)
        self.writes.pop(proto, None)
        self.lingering.pop(proto, None)


class _Signal:
    """asyncio.Event's interface without its deque: an Event holds an empty deque (~760 bytes) for its whole life,
    and uvicorn gives each connection two (the request's `message_event`, the flow's "writable"), which at
    thousands of open streams was a tenth of the memory of each. Waiters are rare (one `receive`, one drain), so
    a list made when one comes."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            return await fut
        finally:
            if self._waiters is not None and fut in self._waiters:
                self._waiters.remove(fut)


class _Flow(FlowControl):
    """uvicorn's flow control on a _Signal."""

    def __init__(self, transport: asyncio.Transport) -> None:  # (not super's: it makes an asyncio.Event)
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = _Signal(True)  # type: ignore[assignment]


class _Pipeline(list[Any]):
    """The requests pipelined behind the answer in progress: uvicorn's deque, as a list (an empty deque holds
    ~760 bytes per connection; pipelining is rare). Newest first, as uvicorn's appendleft and pop keep it."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class _DisconnectHook:
    """The ASGI extension DISCONNECT (http.py): called with a callback, has it called when the client goes away
    before the answer is complete (None: no longer). The handler learns it with no task of its own waiting in
    `receive` (one task per request, ~8 µs, and its memory per open stream). The cycle holds it and it holds
    nothing of the cycle: a request's objects are freed by their counts, never left to the collector."""

    __slots__ = ("callback", "fired")

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None
        self.fired = False

    def __call__(self, callback: Callable[[], None] | None) -> None:
        self.callback = callback
        if callback is not None and self.fired:
            self.fire()

    def fire(self) -> None:
        self.fired = True
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


class EdgeCycle(RequestResponseCycle):
    """uvicorn's request cycle with a leaner answer: its head goes out with the first piece of its body (one write,
    one segment, instead of two), and its header names and values are checked in two passes over all of them
    instead of two per header. The same checks, framing and keep-alive rules as uvicorn's `send`."""

    _pending: bytes | None = None  # the answer's head, until its first body message (or the next loop turn)
    hook: _DisconnectHook

    def gone(self) -> None:
        """The client went away before the answer was complete."""
        self.hook.fire()

    async def send(self, message: Any) -> None:  # (ASGISendEvent)
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if self.response_started and not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            head, self._pending = self._pending, None
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
                out = b""
            elif self.chunked_encoding:
                out = (b"%x\r\n%s\r\n" % (len(body), body)) if body else b""
                if not more_body:
                    out += b"0\r\n\r\n"
            else:
                if len(body) > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= len(body)
                out = body
            if head is not None:
                out = head + out
            if out:
                self.transport.write(out)
            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
            return
        if self.response_started or self.access_log:
            await super().send(message)  # (a message after the end: uvicorn's error; an access log: uvicorn's line)
            return
        if message["type"] != "http.response.start":
            raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
        self.response_started = True
        self.waiting_for_100_continue = False
        status = message["status"]
        headers = [*self.default_headers, *message.get("headers", ())]
        if HEADER_RE.search(b"".join(name for name, _ in headers)):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"".join(value for _, value in headers)):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status]]
        closing = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
                self.keep_alive = False
                closing = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not closing:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self._pending = b"".join(content)
        # The body follows in the same turn of the loop almost always; if not, the head goes out alone then.
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        head, self._pending = self._pending, None
        if head is not None and not self.disconnected:
            self.transport.write(head)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge's limits (see the module's docstring)."""

    edge: Edge
    head_max_bytes: int
    head_max_fields: int
    head_timeout_s: float
    body_timeout_s: float
    body_min_rate: int
    write_timeout_s: float
    keep_alive_s: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        self._address = ""
        self._phase = HEAD
        self._head_bytes = 0  # bytes since the current head began (while the parser is not in a body)
        self._head_tail = b""  # the last bytes of the previous read: a head's end may straddle two reads
        self._framing = 0  # bytes read in a body that were not body: chunk lines and trailers (reset per chunk)
        self._body_bytes = 0
        self._body_start = 0.0
        self._counted = False  # admitted (in edge.open); a refused connection never is
        self._discarding = False  # refused: what still arrives is dropped until the socket closes

    # Connection lifecycle
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        edge = self.edge
        if edge._sweeper is None:
            edge._start(self.loop)
        peer = transport.get_extra_info("peername")
        self._address = client_key(peer[0]) if isinstance(peer, tuple) and peer else ""
        refused = edge.admit(self, self._address)
        if refused is not None:
            self.transport = transport
            self._refuse(refused)
            return
        self._counted = True
        super().connection_made(transport)
        self.flow = _Flow(transport)  # (uvicorn's, on a _Signal)
        edge.waiting[self] = edge.now + self.head_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.edge.release(self, self._address)
        else:
            self.edge.lingering.pop(self, None)
            return  # never admitted: uvicorn never knew this connection
        super().connection_lost(exc)
        cycle = self.cycle
        if isinstance(cycle, EdgeCycle) and cycle.disconnected:
            cycle.gone()

    def eof_received(self) -> None:
        if self._discarding:
            self.transport.close()

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        edge = self.edge
        edge.writes[self] = edge.now + self.write_timeout_s

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.edge.writes.pop(self, None)

    def _answer_in_progress(self) -> bool:
        """Whether bytes of an answer may already be on the wire (a refusal written now would land inside it)."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and cycle.response_started and not cycle.response_complete)

    def _refuse(self, name: str) -> None:
        """Answer `name`'s refusal and close: half-close, drop what still comes, close after LINGER_S."""
        self.edge.counts[name] += 1
        in_progress = self._answer_in_progress()
        self._end_cycle()
        if in_progress:  # ours cannot follow half an answer, only a close can
            self._discarding = True
            self.transport.abort()
            return
        if not self.transport.is_closing():
            self.transport.write(self.edge.responses[name])
        self._linger()

    def _end_cycle(self) -> None:
        """A request in progress on this connection ends here: its handler hears a disconnect, and what it still
        sends is dropped (it would follow our answer, after the half-close)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.waiting_for_100_continue = False  # no "100 Continue" after our answer and half-close
            cycle.message_event.set()
            if isinstance(cycle, EdgeCycle):
                cycle.gone()

    def _linger(self) -> None:
        """Half-close, drop what the client still sends, and close after LINGER_S: closing with unread input
        makes the kernel reset the connection, and the client could lose the answer just written."""
        edge = self.edge
        self._discarding = True
        edge.waiting.pop(self, None)
        edge.bodies.pop(self, None)
        transport = self.transport
        if transport.is_closing():
            return
        if len(edge.lingering) < MAX_LINGERING and transport.can_write_eof():
            transport.write_eof()
            edge.lingering[self] = edge.now + LINGER_S
        else:
            transport.close()

    def evict(self) -> None:
        """Closed to make room for a new connection: it had no request in progress."""
        self.edge.waiting.pop(self, None)
        if self._phase == HEAD and self._head_bytes:
            self._refuse("head_timeout")  # a head still arriving: tell the sender why
        else:
            self.transport.close()

    def expire_waiting(self) -> None:
        edge = self.edge
        edge.waiting.pop(self, None)
        if self._phase == HEAD and self._head_bytes:
            self._refuse("head_timeout")
        else:  # silent since connecting, or idle between requests: nothing to answer
            edge.counts["idle_timeout" if self._phase == IDLE else "head_timeout"] += 1
            self.transport.close()

    def expire_body(self, now: float) -> None:
        edge = self.edge
        # The deadline grows with what arrived: a second per body_min_rate bytes.
        deadline = self._body_start + self.body_timeout_s + self._body_bytes / self.body_min_rate
        if deadline > now:
            edge.bodies[self] = deadline
            return
        edge.bodies.pop(self, None)
        self._refuse("body_timeout")

    # Bytes in
    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        phase = self._phase
        if phase != BODY:  # a head, or the start of one (a read may also hold the previous request's end)
            limit = self.head_max_bytes
            seen = self._head_bytes + len(data)
            if seen > limit:
                # Past the limit only if the head does not end within it (a body may follow in this read).
                tail = self._head_tail
                end = (tail + data).find(b"\r\n\r\n")
                if end < 0 or self._head_bytes - len(tail) + end + 4 > limit:
                    self._refuse("head_too_large")
                    return
            self._head_bytes = seen
            self._head_tail = data[-3:]
        else:
            self._framing += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades here (WebSockets are off): the request is answered as plain HTTP, and the parser
            # reads nothing more on this connection, so it closes after that answer.
            if self.cycle is not None:
                self.cycle.keep_alive = False
        except httptools.HttpParserError:
            if not self._discarding:
                self._refuse("bad_request")
            return
        # Chunk lines and trailers are not body: the parser buffers trailers whole, so they are held to the
        # head's limit (checked per read: the most held is the limit and one read).
        if self._framing > self.head_max_bytes and self._phase == BODY and not self._discarding:
            self._refuse("head_too_large")

    def send_400_response(self, msg: str) -> None:
        self._refuse("bad_request")

    # Parser callbacks (the parser's view of the request: it runs ahead of the answer)
    def on_message_begin(self) -> None:
        super().on_message_begin()
        edge = self.edge
        if self._phase == IDLE:  # a kept-alive connection starts a request: its head has head_timeout_s
            edge.waiting.pop(self, None)
            edge.waiting[self] = edge.now + self.head_timeout_s
        # A request pipelined behind an answer in progress (phase DONE) gets its head deadline when that
        # answer ends (on_response_complete): in `waiting` now, it could be evicted with the answer half sent.
        self._phase = HEAD

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase != HEAD:
            return  # a trailer after a chunked body: dropped (the handler already holds the headers)
        headers = self.headers
        if len(headers) >= self.head_max_fields:
            self._refuse("too_many_headers")
            raise httptools.HttpParserError("too many header fields")  # stops the parser: no request starts
        # uvicorn's own, inline.
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        edge = self.edge
        edge.waiting.pop(self, None)
        self._phase = BODY
        self._head_bytes = 0
        self._head_tail = b""
        self._framing = 0
        self._body_bytes = 0
        pipelined = self.cycle is not None and not self.cycle.response_complete
        self._start_request()
        if not pipelined:
            # A pipelined request's body cannot arrive before the answer ahead of it ends (uvicorn stops
            # reading): its deadline starts then (on_response_complete).
            self._body_start = edge.now
            edge.bodies[self] = edge.now + self.body_timeout_s

    def _start_request(self) -> None:
        """uvicorn's on_headers_complete, with our cycle (EdgeCycle). Neither of what it also checks is on here:
        a concurrency limit (uvicorn's own 503; the gateway's admission does better) falls back to uvicorn's."""
        if self.limit_concurrency is not None:
            super().on_headers_complete()
            return
        parser = self.parser
        scope = self.scope
        scope["method"] = parser.get_method().decode("ascii")
        http_version = parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed = httptools.parse_url(self.url)
        raw_path = parsed.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = self.root_path
        scope["path"] = root + path
        scope["raw_path"] = root.encode("ascii") + raw_path if root else raw_path
        scope["query_string"] = parsed.query or b""
        existing = self.cycle
        self.cycle = cycle = EdgeCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=_Signal(),  # type: ignore[arg-type]
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        cycle.hook = hook = _DisconnectHook()
        scope["extensions"] = {DISCONNECT: hook}  # type: ignore[dict-item]  # (uvicorn types them narrowly)
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, self.app)
        else:  # pipelined: it waits for the answer ahead of it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))

    def on_body(self, body: bytes) -> None:
        # uvicorn's, inline, less its upgrade check (no upgrades here: the parser stops at one), counting bytes.
        size = len(body)
        self._body_bytes += size
        self._framing -= size
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_chunk_complete(self) -> None:
        self._framing = 0

    def on_message_complete(self) -> None:
        self.edge.bodies.pop(self, None)
        self._phase = DONE
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # uvicorn's, but the keep-alive wait is the sweep's deadline instead of a timer per request.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        edge = self.edge
        phase = self._phase
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            if phase == BODY:  # the pipelined request's body may arrive now
                self._body_start = edge.now
                edge.bodies[self] = edge.now + self.body_timeout_s
        elif phase == DONE:
            self._phase = IDLE
            edge.waiting[self] = edge.now + self.keep_alive_s
        elif phase == BODY:
            # Answered before its body arrived (an early 401, 413): nobody will read the rest, so the
            # connection ends rather than spend time or bytes on it.
            self._linger()
        else:  # HEAD: a request pipelined during the answer is arriving; its head deadline starts now
            edge.waiting[self] = edge.now + self.head_timeout_s


class EdgeCollector(Collector):
    """The edge's counters at scrape time (the connection path pays nothing for them)."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        edge = self.edge
        yield GaugeMetricFamily("portcullis_connections_open", "Client connections open", value=edge.open)
        yield GaugeMetricFamily(
            "portcullis_connections_limit",
            "The most client connections this process keeps open",
            value=edge.limits.max_connections,
        )
        closed = CounterMetricFamily(
            "portcullis_connections_closed_by_edge",
            "Client connections the gateway refused or closed before a request completed, by reason",
            labels=["reason"],
        )
        for reason, count in edge.counts.items():
            closed.add_metric([reason], count)
        yield closed
