"""HTTP/1.1 to an upstream replica, on httptools' response parser: the traffic client's connections.

Why not a library (bench/RESULTS-stack.md, bench/RESULTS-profile.md): aiohttp's client was the largest part of
the gateway's CPU per request (about 30% of the samples), and of the clients that cost less, the Rust ones
(pyreqwest, rnet) keep a cancelled request running in their runtime until the upstream answers: a client that
went away, or a deadline that passed, would leave llama-server generating for nobody (cancelling the awaiting
task left the connection open; checked with pyreqwest 0.15.1). Here a cancelled request closes its connection at
once, which is how llama-server learns to stop. What is left is small: one write per request, httptools' parser
(content-length, chunked, keep-alive), a LIFO of idle connections that expire before the upstream would close
them, and gzip/deflate undone when an upstream compresses anyway (we never ask it to).

A connection carries one request at a time. Its answer's body is buffered as it arrives; a stream's reader
(`readline`) pauses the socket when more than HIGH_WATER bytes wait unread, so a slow client holds back the
upstream instead of filling our memory; reading resumes as soon as the reader needs bytes it does not have (a line
longer than the mark included), and always by the end of the answer (a paused socket must not go back to the pool).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024


class ConnectFailed(ConnectionError):
    """No connection could be made (refused, unreachable, a name that does not resolve)."""


class Broken(ConnectionError):
    """The connection failed after it was made. `stale`: it was a kept-alive connection and nothing of an answer
    had arrived: most likely the upstream had closed it while idle, so the request is worth one more try on a
    fresh connection (the request itself was not seen, or seen and dropped with its connection)."""

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class _Connection(asyncio.Protocol):
    __slots__ = (
        "body",
        "closed",
        "complete",
        "error",
        "got",
        "head",
        "headers",
        "idle_at",
        "inflate",
        "keep",
        "lines",
        "parser",
        "paused",
        "status",
        "transport",
        "used",
        "waiter",
    )

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.inflate: Any = None  # a zlib decompressor when the answer is compressed
        self.complete = False
        self.keep = False  # the answer allows the connection's reuse (read at its head: httptools forgets it after)
        self.error: Broken | None = None
        self.closed = False
        self.got = False  # a byte of the current answer arrived
        self.lines = False  # read as a stream: pause the socket past HIGH_WATER
        self.paused = False
        self.used = 0  # requests sent on it
        self.idle_at = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(Broken("The upstream's answer was not valid HTTP/1.1."))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        headers = self.headers
        if (
            self.status
            and not self.complete
            and exc is None
            and self.error is None
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        ):
            # An answer with neither a length nor chunks ends where its connection does (HTTP/1.0's way).
            if self.inflate is not None:
                self.body += self.inflate.flush()
            self.complete = True
            self.keep = False
            self._wake()
            return
        if not self.complete:
            stale = self.used > 1 and not self.got
            self._fail(Broken("The upstream closed the connection before its answer ended.", stale=stale))

    # -- httptools' callbacks ----------------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()
        encoding = self.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "deflate"):
            self.inflate = zlib.decompressobj(wbits=47)  # gzip or zlib, told apart by their header
        head = self.head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self.inflate is not None:
            try:
                data = self.inflate.decompress(data)
            except zlib.error:
                self._fail(Broken("The upstream's compressed answer could not be decompressed."))
                self.close()
                return
        self.body += data
        if self.lines and not self.paused and len(self.body) > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.inflate is not None:
            self.body += self.inflate.flush()
        self.complete = True
        self._resume()  # (the answer's end may come in the read that paused it: the next answer needs reading)
        self._wake()

    # -- ours ----------------------------------------------------------------------------------------------------

    def _fail(self, error: Broken) -> None:
        if self.error is None:
            self.error = error
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()

    def _resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Until more of the body arrived, it ended, or the connection failed (raised)."""
        if self.error is not None:
            raise self.error
        self._resume()  # the reader needs bytes that are not here: let them in
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.error is not None and not self.complete:
            raise self.error

    def reset(self) -> None:
        self._resume()
        self.status, self.headers, self.body = 0, {}, bytearray()
        self.inflate, self.complete, self.keep, self.error, self.got, self.lines = (
            None,
            False,
            False,
            None,
            False,
            False,
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class H1Response:
    """An answer whose head has arrived; its body is the caller's: `read()` it whole, or `readline()` it (a
    stream), then `release()` (the connection goes back to the pool when the answer was read to its end) or
    `close()` (the connection is closed: how an upstream learns that nobody waits for the rest)."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, conn: _Connection, pool: H1Pool | None) -> None:
        self._conn = conn
        self._pool = pool  # None: a one-shot connection
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers  # names in lower case

    async def read(self) -> bytes:
        conn = self._conn
        while not conn.complete:
            await conn.more()
        body = bytes(conn.body)
        conn.body.clear()
        return body

    async def readline(self) -> bytes:
        """The next line with its b"\\n", or what is left at the end; b"" once the body ended."""
        conn = self._conn
        conn.lines = True
        while True:
            body = conn.body
            cut = body.find(b"\n")
            if cut >= 0:
                line = bytes(body[: cut + 1])
                del body[: cut + 1]
                return line
            if conn.complete:
                line = bytes(body)
                body.clear()
                return line
            await conn.more()

    def release(self) -> None:
        conn, pool = self._conn, self._pool
        self._pool = None
        if pool is not None and conn.complete and conn.error is None and not conn.closed:
            pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._pool = None
        self._conn.close()

    async def __aenter__(self) -> H1Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class H1Pool:
    """Kept-alive connections to one upstream (its base URL: scheme, host, port and a path prefix)."""

    def __init__(self, base_url: str, *, connect_s: float, keepalive_s: float, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/").encode()
        self.connect_s = connect_s
        self.keepalive_s = keepalive_s
        authority = parts.netloc.rsplit("@", 1)[-1]
        fixed = "".join(f"{k}: {v}\r\n" for k, v in {"host": authority, **headers}.items())
        self._fixed = fixed.encode("latin-1")
        self._idle: list[_Connection] = []

    async def request(self, method: bytes, path: str, body: bytes, *, fresh: bool = False) -> H1Response:
        """Send the request; return once the answer's head arrived. Cancelled before that, the connection is
        closed. `fresh`: on a new connection, closed after this answer."""
        conn = None if fresh else self._take()
        if conn is None:
            conn = await self._connect()
        conn.reset()
        conn.used += 1
        loop = asyncio.get_running_loop()
        conn.head = loop.create_future()
        close = b"connection: close\r\n" if fresh else b""
        if conn.closed or conn.transport is None:  # (gone between its connect and now)
            raise Broken("The upstream closed the connection before the request was sent.", stale=conn.used > 1)
        conn.transport.write(
            b"%s %s%s HTTP/1.1\r\n%s%scontent-length: %d\r\n\r\n%s"
            % (method, self.prefix, path.encode("latin-1"), self._fixed, close, len(body), body)
        )
        try:
            await conn.head
        except BaseException:
            conn.close()
            raise
        finally:
            conn.head = None
        return H1Response(conn, None if fresh else self)

    def _take(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the upstream
            if conn.closed:
                continue
            if time.monotonic() - conn.idle_at > self.keepalive_s:
                # This one and every one under it were idle too long: the upstream may close them any moment.
                for old in (conn, *idle):
                    old.close()
                idle.clear()
                return None
            return conn
        return None

    def put(self, conn: _Connection) -> None:
        if conn.keep:
            conn.idle_at = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_s):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
                )
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc.strerror or exc}") from exc
        return conn

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
