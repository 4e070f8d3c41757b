"""The upstream connections (upstream/h1.py) against a real HTTP server on a loopback port: what made us write them
(a cancelled request closes its connection at once: llama-server stops generating when its client goes) and what
a pooled HTTP/1.1 client must get right (reuse, the upstream's own close, chunked and compressed answers, a stream
that nobody reads holding back the upstream instead of filling memory)."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from portcullis.upstream.h1 import HIGH_WATER, Broken, ConnectFailed, H1Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")), 0
    )
    return await reader.readexactly(length)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


def _pool(url: str, keepalive_s: float = 30.0) -> H1Pool:
    return H1Pool(url, connect_s=2.0, keepalive_s=keepalive_s, headers={"content-type": "application/json"})


async def test_a_cancelled_request_closes_its_connection_at_once(serve: Callable[[Handler], Awaitable[str]]) -> None:
    gone = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        await reader.read()  # until the client closes
        gone.set()

    pool = _pool(await serve(never_answers))
    request = asyncio.create_task(pool.request(b"POST", "/v1/chat/completions", b"{}"))
    await asyncio.sleep(0.2)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(gone.wait(), 2.0)  # the upstream saw the close: it can stop generating


async def test_connections_are_reused_until_the_upstream_says_close(serve: Callable[[Handler], Awaitable[str]]) -> None:
    connections = 0

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        served = 0
        while True:
            try:
                body = await _head(reader)
            except asyncio.IncompleteReadError:
                return
            served += 1
            close = served == 3
            extra = b"connection: close\r\n" if close else b""
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body))
            if close:
                writer.close()
                return

    pool = _pool(await serve(answers))
    for i in range(5):
        resp = await pool.request(b"POST", "/x", b'{"n": %d}' % i)
        assert (resp.status, await resp.read()) == (200, b'{"n": %d}' % i)
        resp.release()
    assert connections == 2  # three on the first (the third told to close), two on the second


async def test_an_idle_connection_past_keepalive_is_not_reused(serve: Callable[[Handler], Awaitable[str]]) -> None:
    connections = 0

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await _head(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    pool = _pool(await serve(answers), keepalive_s=0.1)
    for _ in range(2):
        resp = await pool.request(b"POST", "/x", b"{}")
        await resp.read()
        resp.release()
        await asyncio.sleep(0.2)
    assert connections == 2


async def test_a_connection_closed_while_idle_fails_as_stale(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def once_then_silent_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await _head(reader)  # the second request arrives, and the server drops the connection without a word
        writer.close()

    pool = _pool(await serve(once_then_silent_close))
    resp = await pool.request(b"POST", "/x", b"{}")
    await resp.read()
    resp.release()
    with pytest.raises(Broken) as caught:
        await pool.request(b"POST", "/x", b"{}")
    assert caught.value.stale  # worth one more try on a fresh connection (UpstreamClient.post does it)


async def test_chunked_and_compressed_answers_are_read_as_sent(serve: Callable[[Handler], Awaitable[str]]) -> None:
    text = b"data: one\n\ndata: two\n\n" * 50

    async def chunked_gzip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        packed = gzip.compress(text)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(0, len(packed), 100):
            part = packed[i : i + 100]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    resp = await _pool(await serve(chunked_gzip)).request(b"POST", "/x", b"{}")
    assert resp.headers["content-encoding"] == "gzip"
    lines = []
    while line := await resp.readline():
        lines.append(line)
    assert b"".join(lines) == text and lines[0] == b"data: one\n"


async def test_a_stream_nobody_reads_holds_the_upstream_back(serve: Callable[[Handler], Awaitable[str]]) -> None:
    backed_up = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        line = b"data: " + b"x" * 1000 + b"\n\n"
        for _ in range(20_000):  # 20 MB if nothing pushed back
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            if writer.transport.get_write_buffer_size() > 1_000_000:
                backed_up.set()
                return
            await asyncio.sleep(0)

    resp = await _pool(await serve(firehose)).request(b"POST", "/x", b"{}")
    assert await resp.readline()  # reading has begun, then stops
    await asyncio.wait_for(backed_up.wait(), 10.0)
    assert len(resp._conn.body) < HIGH_WATER + 70_000  # what we hold: up to the mark, and one read past it
    resp.close()


async def test_a_refused_connection_is_told_apart() -> None:
    pool = _pool("http://127.0.0.1:9")  # (discard: nothing listens there)
    with pytest.raises(ConnectFailed):
        await pool.request(b"POST", "/x", b"{}")


async def test_an_answer_without_length_or_chunks_ends_with_its_connection(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    async def http10_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"ok": true}')
        await writer.drain()
        writer.close()

    pool = _pool(await serve(http10_style))
    resp = await pool.request(b"POST", "/x", b"{}")
    assert await resp.read() == b'{"ok": true}'
    resp.release()
    assert pool._idle == []  # (its connection ended with it)


async def test_a_line_longer_than_the_mark_is_read_whole(serve: Callable[[Handler], Awaitable[str]]) -> None:
    # Past HIGH_WATER with no newline yet the socket was paused, and nothing let it read on: the stream hung.
    line = b"data: " + b"x" * (HIGH_WATER + 150_000) + b"\n"

    async def long_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(line) + 1))
        await writer.drain()
        writer.write(line[:-1])  # all of the line but its end: past the mark with no newline
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"\n\n")

    resp = await _pool(await serve(long_line)).request(b"POST", "/x", b"{}")
    assert await asyncio.wait_for(resp.readline(), 10.0) == line
    assert await asyncio.wait_for(resp.readline(), 10.0) == b"\n"


async def test_a_connection_paused_at_its_answers_end_reads_the_next(
    serve: Callable[[Handler], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The read that crossed the mark also ended the answer: the connection went back to the pool paused, and the
    # next request on it waited for a head it never read.
    from portcullis.upstream import h1

    monkeypatch.setattr(h1, "HIGH_WATER", 1024)
    rest = b"y" * 4096 + b"\n"

    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\nfirst " % (6 + len(rest)))
        await writer.drain()
        await asyncio.sleep(0.2)  # the reader is waiting for its line by now
        writer.write(rest)  # one read: past the mark, and the answer's end
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    pool = _pool(await serve(two_answers))
    resp = await pool.request(b"POST", "/x", b"{}")
    assert await asyncio.wait_for(resp.readline(), 5.0) == b"first " + rest
    resp.release()
    second = await asyncio.wait_for(pool.request(b"POST", "/x", b"{}"), 5.0)
    assert await second.read() == b"{}"
