"""The bare pass-through of bench/stack.py, written against each server interface and each upstream client.

    python bench/stack_app.py SERVER CLIENT UPSTREAM PORT

SERVER: uvicorn (ASGI, httptools, uvloop), granian-asgi, granian-rsgi (Granian, 1 worker, uvloop, HTTP/1), raw
(an asyncio protocol on httptools' request parser, no server framework: the floor of what Python can do here).
CLIENT: aiohttp, aiosonic, pyreqwest, rnet (pooled keep-alive each), raw (an asyncio protocol on httptools'
response parser with a pool of kept-alive connections: the floor).

Each variant does the same work per request: read the body, parse it (as any proxy that reads the model must),
forward it to UPSTREAM + path, and answer with the upstream's status and body. A request whose JSON says
"stream": true is forwarded to UPSTREAM/sse (an SSE answer) and relayed chunk by chunk as it arrives.
Runs from the bench's own virtualenv (bench/stack.py makes it); imports nothing of portcullis.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson

JSON = b"application/json"
SSE = b"text/event-stream"


# -- upstream clients: post(path, body) -> (status, body); stream(path, body) -> chunks ----------------------------


class AiohttpClient:
    def __init__(self, base: str) -> None:
        import aiohttp

        self.base = base
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
        self.headers = {"content-type": "application/json"}

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        async with self.session.post(self.base + path, data=body, headers=self.headers) as resp:
            return resp.status, await resp.read()

    async def stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        async with self.session.post(self.base + "/sse" + path, data=body, headers=self.headers) as resp:
            async for chunk in resp.content.iter_any():
                yield chunk


class AiosonicClient:
    def __init__(self, base: str) -> None:
        import aiosonic

        self.base = base
        from aiosonic.pools import PoolConfig

        self.client = aiosonic.HTTPClient(aiosonic.TCPConnector(pool_configs={":default": PoolConfig(size=1024)}))
        self.headers = {"content-type": "application/json"}

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        resp = await self.client.post(self.base + path, data=body, headers=self.headers)
        return resp.status_code, await resp.content()

    async def stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        resp = await self.client.post(self.base + "/sse" + path, data=body, headers=self.headers)
        async for chunk in resp.read_chunks():
            yield chunk


class PyreqwestClient:
    def __init__(self, base: str) -> None:
        from pyreqwest.client import ClientBuilder

        self.base = base
        self.client = ClientBuilder().max_connections(1024).build()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        req = self.client.post(self.base + path).header("content-type", "application/json").body_bytes(body)
        resp = await req.build().send()
        return resp.status, bytes(await resp.bytes())

    async def stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        req = self.client.post(self.base + "/sse" + path).header("content-type", "application/json").body_bytes(body)
        async with req.build_streamed() as resp:
            reader = resp.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                yield bytes(chunk)


class RnetClient:
    def __init__(self, base: str) -> None:
        import rnet

        self.base = base
        self.client = rnet.Client()
        self.headers = {"content-type": "application/json"}

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        resp = await self.client.post(self.base + path, body=body, headers=self.headers)
        return int(resp.status), await resp.bytes()

    async def stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        resp = await self.client.post(self.base + "/sse" + path, body=body, headers=self.headers)
        async with resp.stream() as chunks:
            async for chunk in chunks:
                yield bytes(chunk)


class _Conn(asyncio.Protocol):
    """One kept-alive upstream connection: httptools parses the answer (content-length or chunked)."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[bytes | None] | None = None
        self.status = 0
        self.done: asyncio.Future[None] | None = None
        self.body: list[bytes] = []
        self.lost = False
        self.keep = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed"))
        if self.queue is not None:
            self.queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()  # (httptools forgets it once the message is complete)

    def on_body(self, chunk: bytes) -> None:
        if self.queue is not None:
            self.queue.put_nowait(chunk)
        else:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        if self.queue is not None:
            self.queue.put_nowait(None)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class RawClient:
    def __init__(self, base: str) -> None:
        hostport = base.split("://", 1)[1]
        host, port = hostport.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.idle: list[_Conn] = []
        self.head = b"host: " + hostport.encode() + b"\r\ncontent-type: application/json\r\ncontent-length: "

    async def _conn(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.lost:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Conn, self.host, self.port)
        return conn

    def _send(self, conn: _Conn, path: str, body: bytes) -> None:
        assert conn.transport is not None
        conn.status, conn.body = 0, []
        conn.done = asyncio.get_running_loop().create_future()
        conn.transport.write(b"POST %s HTTP/1.1\r\n%s%d\r\n\r\n%s" % (path.encode(), self.head, len(body), body))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = await self._conn()
        self._send(conn, path, body)
        assert conn.done is not None
        await conn.done
        if conn.keep:
            self.idle.append(conn)
        return conn.status, b"".join(conn.body)

    async def stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        conn = await self._conn()
        conn.queue = asyncio.Queue()
        self._send(conn, "/sse" + path, body)
        while (chunk := await conn.queue.get()) is not None:
            yield chunk
        conn.queue = None
        if not conn.lost and conn.keep:
            self.idle.append(conn)


CLIENTS = {
    "aiohttp": AiohttpClient,
    "aiosonic": AiosonicClient,
    "pyreqwest": PyreqwestClient,
    "rnet": RnetClient,
    "raw": RawClient,
}


# -- the servers' side: the same work behind each interface ---------------------------------------------------------


def asgi_app(make_client: Any) -> Any:
    client: Any = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal client
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if client is None:
            client = make_client()
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        payload = orjson.loads(body)
        if payload.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", SSE)]})
            async for chunk in client.stream(scope["path"], orjson.dumps(payload)):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        status, answer = await client.post(scope["path"], orjson.dumps(payload))
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", JSON)]})
        await send({"type": "http.response.body", "body": answer})

    return app


def rsgi_app(make_client: Any) -> Any:
    client: Any = None

    async def app(scope: Any, proto: Any) -> None:
        nonlocal client
        if client is None:
            client = make_client()
        payload = orjson.loads(await proto())
        if payload.get("stream"):
            out = proto.response_stream(200, [("content-type", "text/event-stream")])
            async for chunk in client.stream(scope.path, orjson.dumps(payload)):
                await out.send_bytes(chunk)
            return
        status, answer = await client.post(scope.path, orjson.dumps(payload))
        proto.response_bytes(status, [("content-type", "application/json")], answer)

    return app


class _RawServer(asyncio.Protocol):
    """HTTP/1.1 keep-alive on httptools, one request at a time per connection (no pipelining): the floor."""

    client: Any = None

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.body: list[bytes] = []
        self.keep = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_headers_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()  # (httptools forgets it once the message is complete)

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.handle(self.url.decode(), body, self.keep))

    async def handle(self, path: str, body: bytes, keep: bool) -> None:
        payload = orjson.loads(body)
        write = self.transport.write
        if payload.get("stream"):
            write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            async for chunk in self.client.stream(path, orjson.dumps(payload)):
                write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            write(b"0\r\n\r\n")
        else:
            status, answer = await self.client.post(path, orjson.dumps(payload))
            write(
                b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (status, len(answer), answer)
            )
        if not keep:
            self.transport.close()


def main() -> None:
    server, client_name, upstream, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    make_client = lambda: CLIENTS[client_name](upstream)  # noqa: E731 - made inside the server's loop
    if server == "uvicorn":
        import uvicorn

        uvicorn.run(
            asgi_app(make_client),
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="warning",
            lifespan="on",
            proxy_headers=False,  # as the gateway runs it
        )
    elif server in ("granian-asgi", "granian-rsgi"):
        import os

        kind = server.split("-")[1]
        os.environ.update(STACK_CLIENT=client_name, STACK_UPSTREAM=upstream)
        granian = os.path.join(os.path.dirname(sys.executable), "granian")
        args = ["--interface", kind, "--loop", "uvloop", "--workers", "1", "--http", "1", "--no-ws"]
        args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", f"stack_app:{kind}_target"]
        os.execv(granian, [granian, *args])
    elif server == "raw":
        import uvloop

        async def serve() -> None:
            _RawServer.client = make_client()
            srv = await asyncio.get_running_loop().create_server(_RawServer, "127.0.0.1", port, backlog=8192)
            await srv.serve_forever()

        uvloop.run(serve())
    else:
        raise SystemExit(f"unknown server {server}")


# Granian imports its app by name in its worker: the client and upstream come from the environment there.
def _from_env(kind: str) -> Any:
    import os

    make = lambda: CLIENTS[os.environ["STACK_CLIENT"]](os.environ["STACK_UPSTREAM"])  # noqa: E731
    return asgi_app(make) if kind == "asgi" else rsgi_app(make)


def __getattr__(name: str) -> Any:
    if name in ("asgi_target", "rsgi_target"):
        return _from_env(name.split("_")[0])
    raise AttributeError(name)


if __name__ == "__main__":
    main()
