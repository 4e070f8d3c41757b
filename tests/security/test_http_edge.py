"""Issue 17 point 1: the HTTP layer protects itself before authentication (src/portcullis/edge.py).

Each test attacks a real gateway process over raw sockets the way the issue found it open: unfinished
multi-MiB headers, slow and silent sockets, a body that never arrives, more idle sockets than the process
has descriptors, many connections from one address. Attackers connect from 127.0.0.2 (any 127/8 address
is loopback on Linux), so the per-address cap and the honest client on 127.0.0.1 are told apart.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_get, http_post, sim_control, start_gateway

ATTACKER = "127.0.0.2"


def _connect(gw: Proc, source: str = ATTACKER) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", gw.port))
    return sock


def _answer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed the connection within `seconds`, and what it sent before."""
    deadline = time.monotonic() + seconds
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False, data
        except OSError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _error_code(raw: bytes) -> str:
    return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _chat_ok(gw: Proc) -> bool:
    status, _ = http_post(
        gw.url + "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=10,
    )
    return status == 200


def _chat_head(length: int | None, extra: str = "") -> bytes:
    """A chat completion's head with the admin key: `length` its content-length (None: a chunked body),
    `extra` more header lines (each ending in CRLF)."""
    framing = "transfer-encoding: chunked" if length is None else f"content-length: {length}"
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n"
        f"content-type: application/json\r\n{extra}{framing}\r\n\r\n"
    ).encode()


@pytest.fixture(scope="module")
def edge_gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"tiny": [sim.url]},
        server={
            "head_timeout_s": 1.5,
            "body_timeout_s": 1.5,
            "keep_alive_s": 1.5,
            "write_timeout_s": 1.5,
            "max_connections_per_client": 40,
        },
    )
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield gw
    gw.stop()


def test_unfinished_huge_headers_get_431_and_hold_no_memory(edge_gw: Proc) -> None:
    """Four sockets each send 16 MiB of one header that never ends (the issue: 4 x 64 MiB added 255 MiB)."""
    before = _rss_mib(edge_gw.popen.pid)
    socks = [_connect(edge_gw) for _ in range(4)]
    sent = dict.fromkeys(range(4), 0)
    for sock in socks:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-fill: ")
    chunk = b"a" * 65536
    for _ in range(256):  # 16 MiB each, interleaved
        for i, sock in enumerate(socks):
            if sent[i] < 0:
                continue
            try:
                sock.sendall(chunk)
                sent[i] += len(chunk)
            except OSError:
                sent[i] = -1  # the server closed it: the point
    grown = _rss_mib(edge_gw.popen.pid) - before
    answers = [_answer(sock) for sock in socks]
    for sock in socks:
        sock.close()
    assert [_status(a) for a in answers] == [431] * 4, answers
    assert all(_error_code(a) == "request_header_too_large" for a in answers)
    assert grown < 24, f"the process grew {grown:.0f} MiB while 4 sockets sent unfinished headers"
    assert _chat_ok(edge_gw)


def test_a_head_just_under_the_limit_and_a_large_body_in_one_write_pass(edge_gw: Proc) -> None:
    """The head limit counts the head only: a body arriving in the same packet is not head."""
    filler = "b" * 60_000
    body = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 500_000}], "max_tokens": 2})
    head = _chat_head(len(body), f"x-fill: {filler}\r\nconnection: close\r\n")
    sock = _connect(edge_gw, "127.0.0.1")
    sock.sendall(head + body)
    raw = _answer(sock, 10)
    sock.close()
    # The request reached the gateway's handler (its answers carry x-request-id; the edge's refusals do not).
    assert _status(raw) != 431 and b"\r\nx-request-id: " in raw, raw[:300]


def test_silent_and_slow_sockets_are_closed_by_the_head_deadline(edge_gw: Proc) -> None:
    """The issue: 300 slow and 100 silent sockets stayed open 90 s. With head_timeout_s 1.5 they go in ~2.5 s."""
    silent = [_connect(edge_gw) for _ in range(10)]
    slow = [_connect(edge_gw) for _ in range(10)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    closed_slow: dict[int, bytes] = {}
    while time.monotonic() - started < 6 and len(closed_slow) < len(slow):
        for i, sock in enumerate(slow):
            if i in closed_slow:
                continue
            try:
                sock.sendall(b"x-slow: 1\r\n")  # one header line every 0.2 s, never the end of the head
            except OSError:
                closed_slow[i] = b""
        time.sleep(0.2)
        for i, sock in enumerate(slow):
            if i not in closed_slow:
                done, data = _closed_within(sock, 0.001)
                if done or data:
                    closed_slow[i] = data + _answer(sock, 1)
    silent_closed = [_closed_within(sock, max(6 - (time.monotonic() - started), 0.1))[0] for sock in silent]
    for sock in silent + slow:
        sock.close()
    assert all(silent_closed), f"{silent_closed.count(False)} silent sockets still open after 6 s"
    assert len(closed_slow) == len(slow), f"{len(slow) - len(closed_slow)} slow sockets still open after 6 s"
    statuses = [_status(raw) for raw in closed_slow.values() if raw]
    assert statuses and set(statuses) == {408}, closed_slow


def test_a_body_that_never_arrives_gets_408(edge_gw: Proc) -> None:
    sock = _connect(edge_gw, "127.0.0.1")
    sock.sendall(_chat_head(1000) + b'{"model": ')
    closed, raw = _closed_within(sock, 6)
    sock.close()
    assert closed, "the connection stayed open 6 s with its body unfinished (body_timeout_s is 1.5)"
    assert _status(raw) == 408 and _error_code(raw) == "request_body_timeout", raw


def test_idle_keep_alive_connections_are_closed(edge_gw: Proc) -> None:
    sock = _connect(edge_gw, "127.0.0.1")
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    first = sock.recv(65536)
    assert _status(first) == 200
    closed, _ = _closed_within(sock, 6)
    sock.close()
    assert closed, "an idle keep-alive connection stayed open past keep_alive_s"


def test_connections_from_one_address_are_capped(edge_gw: Proc) -> None:
    socks = [_connect(edge_gw) for _ in range(40)]
    try:
        extra = _connect(edge_gw)
        raw = _answer(extra, 5)
        extra.close()
        assert _status(raw) == 503 and _error_code(raw) == "too_many_connections_per_client", raw
        # Another address is not affected.
        assert http_get(edge_gw.url + "/healthz", timeout=5)[0] == 200
        assert _chat_ok(edge_gw)
    finally:
        for sock in socks:
            sock.close()


def test_more_idle_sockets_than_descriptors_do_not_starve_the_gateway(sim: Proc, module_tmp: Path) -> None:
    """The issue: a gateway with a 300-descriptor limit stopped answering under 320 idle sockets. Now the cap
    follows the limit, and at the cap the oldest idle connection makes room for the new one."""
    cfg = gateway_config({"tiny": [sim.url]}, server={"max_connections_per_client": 0})
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz", nofile=300)
    socks: list[socket.socket] = []
    try:
        for _ in range(320):
            socks.append(_connect(gw))
        for _ in range(5):
            started = time.monotonic()
            assert http_get(gw.url + "/healthz", timeout=5)[0] == 200
            assert time.monotonic() - started < 3
            assert _chat_ok(gw)
        _, body = http_get(gw.url + "/metrics", timeout=5)
        assert b'portcullis_connections_closed_by_edge_total{reason="evicted"}' in body
    finally:
        for sock in socks:
            sock.close()
        gw.stop()


def _metric(gw: Proc, line_start: bytes) -> float:
    _, body = http_get(gw.url + "/metrics", timeout=5)
    for line in body.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(b" ", 1)[1])
    return 0.0


def test_endless_trailers_after_a_chunked_body_get_431_and_hold_no_memory(edge_gw: Proc) -> None:
    """A chunked body's trailers are headers the parser buffers whole: one that never ends grew the process
    without bound (and trailers were appended to the headers the handler was already reading)."""
    before = _rss_mib(edge_gw.popen.pid)
    sock = _connect(edge_gw)
    sock.sendall(_chat_head(None) + b"2\r\n{}\r\n0\r\nx-t: ")  # authenticated: the handler waits for the body's end
    chunk = b"a" * 65536
    with contextlib.suppress(OSError):  # the server closing the connection is the point
        for _ in range(256):  # 16 MiB of one trailer
            sock.sendall(chunk)
    grown = _rss_mib(edge_gw.popen.pid) - before
    raw = _answer(sock)
    sock.close()
    assert _status(raw) == 431, raw[:300]
    assert grown < 24, f"the process grew {grown:.0f} MiB while one socket sent an unfinished trailer"


def test_a_head_with_too_many_fields_gets_431(edge_gw: Proc) -> None:
    sock = _connect(edge_gw)
    fields = b"".join(b"x-%d: 1\r\n" % i for i in range(2000))  # 20 KB: within the byte limit
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + fields + b"\r\n")
    raw = _answer(sock)
    sock.close()
    assert _status(raw) == 431 and b"header fields" in raw, raw[:300]


def test_a_head_whose_end_straddles_two_reads_near_the_limit_passes(edge_gw: Proc) -> None:
    """The end of a head (CRLF CRLF) split across two reads, with a body behind it past the limit, is not a
    head over the limit."""
    body = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}], "max_tokens": 2})
    head = _chat_head(len(body), f"x-fill: {'b' * 60_000}\r\nconnection: close\r\n")
    sock = _connect(edge_gw, "127.0.0.1")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(head[:-2])
    time.sleep(0.3)  # let the server read the first part on its own
    sock.sendall(head[-2:] + body)
    raw = _answer(sock, 10)
    sock.close()
    # The request reached the gateway's handler (its answers carry x-request-id; the edge's refusals do not).
    assert _status(raw) not in (408, 431) and b"\r\nx-request-id: " in raw, raw[:300]


def test_an_answer_before_the_body_ends_the_connection(edge_gw: Proc) -> None:
    """Answered early (413 from the content-length), a connection whose client then sends the whole body used
    to stay open for ever: its request was complete, so no deadline held it."""
    sock = _connect(edge_gw, "127.0.0.1")
    size = 2 * 1024 * 1024  # over max_body_bytes (1 MiB)
    sock.sendall(_chat_head(size))
    first = sock.recv(65536)
    assert _status(first) == 413, first[:300]
    with contextlib.suppress(OSError):
        sock.sendall(b" " * size)
    closed, _ = _closed_within(sock, 6)
    sock.close()
    assert closed, "the connection stayed open 6 s after its answer (keep_alive_s is 1.5)"


def test_a_slow_but_steady_body_is_not_cut(edge_gw: Proc) -> None:
    """The body deadline grows with what arrives: 200 KB sent over 3 s (twice body_timeout_s) passes."""
    body = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 200_000}], "max_tokens": 2})
    sock = _connect(edge_gw, "127.0.0.1")
    sock.sendall(_chat_head(len(body), "connection: close\r\n"))
    step = len(body) // 30 + 1
    for i in range(0, len(body), step):  # ~67 KB/s, a client on a slow link
        sock.sendall(body[i : i + step])
        time.sleep(0.1)
    raw = _answer(sock, 10)
    sock.close()
    # The request reached the gateway's handler (its answers carry x-request-id; the edge's refusals do not).
    assert _status(raw) not in (408, 431) and b"\r\nx-request-id: " in raw, raw[:300]


def test_a_client_that_stops_reading_is_cut(edge_gw: Proc) -> None:
    """Answers backed up behind a client that reads nothing held the connection and its task for ever."""
    before = _metric(edge_gw, b'portcullis_connections_closed_by_edge_total{reason="write_timeout"}')
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    sock.connect(("127.0.0.1", edge_gw.port))
    # 400 pipelined requests for the OpenAPI document (32 KB): 13 MB of answers, never read, more than the
    # socket buffers hold.
    sock.sendall(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n" * 400)
    deadline = time.monotonic() + 8
    cut = False
    while time.monotonic() < deadline and not cut:
        time.sleep(0.5)
        cut = _metric(edge_gw, b'portcullis_connections_closed_by_edge_total{reason="write_timeout"}') > before
    sock.close()
    assert cut, "a connection whose client read nothing for 8 s was still open (write_timeout_s is 1.5)"


def test_a_pipelined_request_waits_for_the_answer_ahead_of_it(edge_gw: Proc, sim: Proc) -> None:
    """A request pipelined behind a slow answer got its body deadline at once: the 408 was written into the
    middle of the answer ahead of it. Its deadline now starts when that answer ends."""
    body = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    first = _chat_head(len(body)) + body
    second = _chat_head(100)  # its body never comes
    sim_control(sim, ttft_ms=3000)  # the first answer takes twice body_timeout_s
    try:
        sock = _connect(edge_gw, "127.0.0.1")
        sock.sendall(first + second)
        raw = _answer(sock, 10)
        sock.close()
    finally:
        sim_control(sim, ttft_ms=0)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
    answers = raw.split(b"HTTP/1.1 ")
    assert len(answers) == 3 and answers[2].startswith(b"408 "), raw[:600]
