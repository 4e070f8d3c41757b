"""A minimal pipelined Redis client for the quota hot path: one connection, replies matched in order.

Why not redis-py here: measured on this machine (bench/RESULTS.md, "Redis client"), an EVALSHA through
redis.asyncio costs the calling process 39 µs of CPU at 32 concurrent callers and 101 µs one at a
time; the same call written straight to one pipelined connection costs 7.4 µs and 40 µs. The gateway
spends ~220 µs per request in all, and admission must keep it at 75% or more of its speed without
limits. Parsing is still a library's job: hiredis's reader. Everything else (pub/sub, cluster,
admin) uses redis-py.

Commands issued in one turn of the event loop are written together and their futures queued;
replies arrive in order (Redis guarantees it on one connection), so concurrent callers share the
connection without waiting for each other.
A call that waits longer than `timeout_s` fails the connection and everything queued on it with
`RedisUnavailable`; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


class RedisUnavailable(Exception):
    """Redis could not be reached, or did not answer in time."""


class RedisReplyError(Exception):
    """Redis answered with an error (a script error, NOSCRIPT, a wrong type)."""


def encode_args(args: Any) -> bytes:
    """Arguments as RESP bulk strings (no array header): callers cache the constant part of a command."""
    out = []
    for arg in args:
        if type(arg) is not bytes:
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def array_header(count: int) -> bytes:
    return b"*%d\r\n" % count


def _encode(args: tuple[Any, ...]) -> bytes:
    return array_header(len(args)) + encode_args(args)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outgoing: list[bytes] = []
        self.closed = False

    def flush(self) -> None:
        if self.outgoing and not self.closed and self.transport is not None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisUnavailable(f"bad reply from Redis: {exc}"))
                return
            if reply is False:
                return
            future, _ = self.waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, RedisReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisUnavailable(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, error: Exception) -> None:
        self.closed = True
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()


class RespClient:
    def __init__(self, url: str, *, timeout_s: float, on_connect: list[tuple[Any, ...]] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", ""):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis://)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.password = unquote(parts.password) if parts.password else None
        self.username = unquote(parts.username) if parts.username else None
        self.timeout_s = timeout_s
        self.on_connect = on_connect or []  # commands sent first on every new connection (SCRIPT LOAD)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command now; the future resolves to its reply."""
        return self.send(_encode(args))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Send one encoded command now. Does not wait while the connection is up; the first
        command after a failure connects first."""
        conn = self._conn
        if conn is None or conn.closed:
            return asyncio.ensure_future(self._send_after_connect(command))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        conn.waiting.append((future, time.monotonic()))
        # Commands sent in one turn of the event loop leave in one write: under load one system call
        # carries the admissions and settlements of many requests.
        if not conn.outgoing:
            loop.call_soon(conn.flush)
        conn.outgoing.append(command)
        return future

    async def _send_after_connect(self, command: bytes) -> Any:
        await self.connect()
        return await self.send(command)

    async def connect(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            self._conn = await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch())

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, self.host, self.port), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from exc
        hello: list[tuple[Any, ...]] = []
        if self.password is not None:
            hello.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        hello += self.on_connect
        for args in hello:
            future: asyncio.Future[Any] = loop.create_future()
            conn.waiting.append((future, time.monotonic()))
            assert conn.transport is not None
            conn.transport.write(_encode(args))
            try:
                await asyncio.wait_for(future, self.timeout_s)
            except (RedisReplyError, TimeoutError) as exc:
                conn.fail(RedisUnavailable(f"Redis refused {args[0]}: {exc}"))
                raise RedisUnavailable(f"Redis refused {args[0]}: {exc}") from exc
        return conn

    async def _watch(self) -> None:
        """Fail the connection when its oldest unanswered command is older than the timeout."""
        while True:
            await asyncio.sleep(self.timeout_s / 4)
            conn = self._conn
            if conn is None or conn.closed:
                return
            if conn.waiting and time.monotonic() - conn.waiting[0][1] > self.timeout_s:
                conn.fail(RedisUnavailable(f"Redis did not answer within {self.timeout_s} s"))
                return

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._conn is not None and not self._conn.closed:
            pending = [f for f, _ in self._conn.waiting]
            if pending:
                await asyncio.wait(pending, timeout=self.timeout_s)
            self._conn.fail(RedisUnavailable("client closed"))
        self._conn = None
