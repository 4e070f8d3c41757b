"""Issue 17 point 9: no input makes a 500, at the raw HTTP layer.

A few hundred requests generated from a seeded RNG (the same ones on every run) go to a real gateway over raw
sockets: malformed request lines, odd and unknown methods, absolute-form and asterisk targets, invalid UTF-8
and NULs in paths and queries, percent-encoded routes, odd HTTP versions, huge and malformed headers,
conflicting framing, bad chunked encodings, truncated bodies, WebSocket and h2c upgrades, and bodies that
are not what their content type says. Whatever the gateway answers must not be a 5xx, every error it renders
must be in the OpenAI shape, and it must still answer /healthz afterwards.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_get, start_gateway

SEED = 17
CASES = 400
AUTH = b"authorization: Bearer " + ADMIN_KEY.encode()

METHODS = [b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD", b"OPTIONS"]
ROUTES = [
    b"POST /v1/chat/completions", b"POST /v1/completions", b"POST /v1/embeddings", b"POST /v1/moderations",
    b"GET /v1/models", b"GET /v1/models/tiny", b"DELETE /v1/models/nope", b"GET /v1/files", b"POST /v1/files",
    b"GET /v1/batches", b"POST /v1/batches", b"GET /v1/files/file-x", b"GET /v1/files/file-x/content",
    b"DELETE /v1/files/file-x", b"GET /v1/batches/batch_x", b"POST /v1/batches/batch_x/cancel", b"GET /admin/keys",
    b"POST /admin/keys", b"GET /admin/keys/00000000000000ad", b"POST /admin/keys/00000000000000ad/rotate",
    b"GET /admin/usage", b"GET /admin/backends", b"GET /admin/models", b"POST /admin/route",
    b"POST /admin/models/tiny/enable", b"GET /dashboard", b"POST /dashboard/login", b"GET /dashboard/data",
    b"GET /openapi.json", b"GET /healthz", b"GET /readyz", b"GET /metrics",
]  # fmt: skip
# Targets an HTTP parser takes, with contents the gateway must refuse or route with care.
ODD_TARGETS = [
    b"http://gw/v1/models", b"https://evil.example/admin/keys", b"//admin/keys", b"/v1/../admin/keys",
    b"/%61dmin/keys", b"/admin/keys%0a", b"/admin/keys%0d%0a", b"/admin/keys%00", b"/admin/keys/00000000000000ad%0a",
    b"/v1/chat/%63ompletions", b"/v1/models/%ff%fe", b"/v1/models/%c0%af", b"/v1/models/%", b"/v1/models/%zz",
    b"/v1/models/%2e%2e%2fadmin", b"/" + b"a" * 8000, b"/v1/models/" + b"%41" * 2000, b"/v1/files?limit=%C2%B2",
    b"/v1/batches?limit=" + b"9" * 5000, b"/v1/files?limit=-1", b"/v1/files?limit=", b"/v1/files?after=%00",
    b"/admin/keys?user=%ff", b"/admin/usage?since=%EF%BC%92020-01-01", b"/admin/usage?group_by=%00&format=table",
    b"/admin/usage?since=2020-01-01%0a", b"/v1/models?%zz=%zz&&==", b"/v1/models#frag", b"/v1/models?" + b"a=1&" * 2000,
    b"/v1/batches?limit=%EF%BC%91&after=%ff",
]  # fmt: skip
# Headers an HTTP parser takes, with values the gateway must not trip on.
ODD_HEADERS = [
    b"authorization: Bearer \xff\xfe", b"authorization: Basic Og==", b"authorization: Bearer", b"authorization: ",
    b"authorization: Bearer a\r\nauthorization: Bearer b", b"content-type: application/json; charset=\xff",
    b"content-type: multipart/form-data; boundary=", b"content-type: multipart/form-data; boundary=" + b"b" * 300,
    b"content-type: text/plain", b"x-request-id: " + b"\xff" * 10, b"x-request-id: " + b"a" * 5000,
    b"x-portcullis-max-cost: 1e999", b"x-portcullis-latency-budget-ms: nan", b"x-portcullis-priority: \xff",
    b"x-portcullis-latency-budget-ms: " + b"9" * 5000, b"origin: http://\xff", b"access-control-request-method: \x01",
    b"expect: 100-continue", b"expect: 999-nope", b"upgrade: h2c", b"host: a\r\nhost: b", b"x-b: \xff\xfe",
    b"connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"sec-websocket-version: 13", b"cookie: portcullis_dashboard=\xff; x=" + b"y" * 3000, b"range: bytes=-5",
    b"x-big: " + b"v" * 30_000, b"\r\n".join(b"x-many-%d: v" % i for i in range(300)), b"accept-encoding: \xff",
]  # fmt: skip
BODIES = [
    b"{}", b"[]", b"null", b"{", b'{"model":', b"\xff\xfe\x00", b'{"model":"tiny"}', b'{"model":"tiny","messages":[]}',
    b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":' + b"9" * 5000 + b"}",
    b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4}',
    b'{"model":"tiny","messages":[{"role":"user","content":"\\u0000\\ud800"}]}', b"[" * 5000 + b"]" * 5000,
    b'{"model":"tiny","prompt":"x","max_tokens":1e308}', b'{"user":"u","tier":"free","expires_in_s":1e308}',
    b'{"grace_s":1e308}', b'{"input_file_id":"file-x","endpoint":"/v1/chat/completions","completion_window":"'
    + b"9" * 5000 + b'h"}', b"--b\r\ncontent-disposition: form-data; name=file\r\n\r\nx\r\n--b--", b"\x00" * 100,
    b'{"model":"tiny","input":' + b"[1," * 1000 + b"1" + b"]" * 1000 + b"}", b'{"a":' + b'"' + b"x" * 20000 + b'"}',
    b'{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":{}}]}]}', b'{"model":["tiny"]}',
]  # fmt: skip
# What breaks HTTP itself: the parser (and the edge under it) must refuse these with a 4xx, never a 5xx.
BAD_LINES = [
    b"get /v1/models HTTP/1.1", b"G\x00ET /v1/models HTTP/1.1", b"FOO /v1/models HTTP/1.1", b"X" * 300 + b" / HTTP/1.1",
    b"\xc3\xa9T / HTTP/1.1", b"GET\t/v1/models HTTP/1.1", b"GET /v1/models", b"GET", b"", b"PRI * HTTP/2.0",
    b"GET /v1/models HTTP/2.0", b"GET /v1/models HTTP/9.9", b"GET /v1/models HTTP/1.1x", b"GET /v1/models http/1.1",
    b"GET /v1/models HTTP/", b"GET /v1/models/\xff HTTP/1.1", b"GET /\x00 HTTP/1.1", b"GET  /v1/models  HTTP/1.1",
    b"GET /v1/models HTTP/1.1 extra", b"\x16\x03\x01\x02\x00\x01", b"\r\n\r\nGET /v1/models HTTP/1.1",
    b"GET * HTTP/1.1", b"CONNECT gw:80 HTTP/1.1", b"TRACE / HTTP/1.1", b"GET /v1/mo dels HTTP/1.1",
]  # fmt: skip
BAD_HEADERS = [
    b"content-length: -1", b"content-length: 1e3", b"content-length: \xef\xbc\x91", b"content-length: " + b"9" * 5000,
    b"content-length: 3\r\ncontent-length: 4", b"transfer-encoding: gzip", b"transfer-encoding: chunked, chunked",
    b"x y: z", b"no-colon-here", b" folded: continuation", b"x-a:\x00b", b":empty-name", b"x-c\x7f: v",
    b"transfer-encoding: chunked\r\ncontent-length: 3", b"x-huge: " + b"h" * 70_000,
]  # fmt: skip
BAD_CHUNKS = [
    b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffffff\r\nab\r\n",
    b"3\r\nabcdef\r\n0\r\n\r\n", b"3;ext=\xff\r\nabc\r\n0\r\n\r\n", b"3\nabc\n0\n\n", b"0\r\nx-trailer: \x00\r\n\r\n",
]  # fmt: skip


@dataclass
class Case:
    data: bytes
    complete: bool  # False: the request is cut short (the gateway may wait for the rest); we only hang up


def _chunked(body: bytes, rng: random.Random) -> bytes:
    cuts = sorted(rng.sample(range(1, len(body)), k=min(3, len(body) - 1))) if len(body) > 1 else []
    parts = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


def cases(rng: random.Random) -> Iterator[Case]:
    """Two in three requests are well-framed HTTP whose contents are odd (they reach the gateway's code); the
    third breaks HTTP itself somewhere (the request line, a header, the framing of its body)."""
    for _ in range(CASES):
        if rng.random() < 0.5:  # a route, mostly with its own method
            method, target = rng.choice(ROUTES).split(b" ")
            method = method if rng.random() < 0.85 else rng.choice(METHODS)
        else:
            method, target = rng.choice((b"GET", b"GET", b"POST", rng.choice(METHODS))), rng.choice(ODD_TARGETS)
        line = b"%s %s %s" % (method, target, b"HTTP/1.1" if rng.random() < 0.9 else b"HTTP/1.0")
        headers = [b"host: gw"] + ([AUTH] if rng.random() < 0.85 else [])
        headers += rng.sample(ODD_HEADERS, k=rng.choice([0, 1, 1, 2]))
        body = rng.choice(BODIES) if method in (b"POST", b"PUT", b"PATCH") or rng.random() < 0.1 else b""
        framing = b"content-length: %d" % len(body)
        if rng.random() < 0.2:
            framing, body = b"transfer-encoding: chunked", _chunked(body, rng)
        complete = True
        if rng.random() < 1 / 3:  # break HTTP: one of these
            broken = rng.random()
            if broken < 0.35:
                line = rng.choice(BAD_LINES)
            elif broken < 0.7:
                headers.append(rng.choice(BAD_HEADERS))
            elif broken < 0.9:
                framing, body = b"transfer-encoding: chunked", rng.choice(BAD_CHUNKS)
                complete = b"0\r\n\r\n" in body
            else:  # a body shorter than its declared length: the gateway waits for the rest, we hang up
                framing, body, complete = b"content-length: %d" % (len(body) + 10), body, False
        headers += [b"content-type: application/json", framing, b"connection: close"]
        yield Case(line + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body, complete)


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"tiny": [sim.url], "tiny-embed": [sim.url]},
        # Bad credentials are part of the fuzz: throttling them would turn the rest into 429s, testing less.
        auth={"failed_auth_per_minute": 1_000_000},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def send(gw: Proc, case: Case) -> bytes:
    """What the gateway answers before it closes the connection (nothing for a request cut short)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the gateway may refuse and close before it has read everything
            sock.sendall(case.data)
        if not case.complete:
            return b""
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        return data


def statuses(answer: bytes) -> list[int]:
    """Every status line in what came back."""
    return [int(line.split(b" ", 2)[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


@dataclass
class Findings:
    answered: int = 0
    seen: dict[int, int] = field(default_factory=dict)
    errors: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # 5xx
    unshaped: list[tuple[bytes, bytes]] = field(default_factory=list)  # an error not in the OpenAI shape
    doubled: list[tuple[bytes, bytes]] = field(default_factory=list)  # more than one final answer to a request
    sniffable: list[tuple[bytes, bytes]] = field(default_factory=list)  # an answer without nosniff


@pytest.fixture(scope="module")
def findings(gw: Proc) -> Findings:
    """The whole fuzz, run once; the tests below judge different things about it."""
    found = Findings()
    for case in cases(random.Random(SEED)):
        answer = send(gw, case)
        while answer.startswith(b"HTTP/1.1 100 "):  # an interim answer to expect: 100-continue
            answer = answer.partition(b"\r\n\r\n")[2]
        final = statuses(answer)
        if not final:
            continue
        found.answered += 1
        status = final[0]
        found.seen[status] = found.seen.get(status, 0) + 1
        if b"\r\nx-content-type-options: nosniff\r\n" not in answer.partition(b"\r\n\r\n")[0].lower() + b"\r\n":
            found.sniffable.append((case.data[:160], answer[:300]))
        if len(final) > 1:
            found.doubled.append((case.data[:160], answer[:400]))
        if status >= 500:
            found.errors.append((status, case.data[:160], answer[:300]))
        elif status >= 400 and not case.data.startswith(b"HEAD "):
            head, _, body = answer.partition(b"\r\n\r\n")
            if b"transfer-encoding: chunked" in head.lower():
                body = body.partition(b"\r\n")[2].rpartition(b"\r\n0\r\n")[0]
            try:
                assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}
            except Exception:
                found.unshaped.append((case.data[:160], answer[:300]))
    print(f"{found.answered} of {CASES} answered; statuses: {dict(sorted(found.seen.items()))}")
    return found


def _examples(items: list) -> str:
    return f"{len(items)}, e.g.:\n" + "\n".join(map(repr, items[:5]))


def test_raw_http_fuzz_finds_no_server_error(gw: Proc, findings: Findings) -> None:
    assert not findings.errors, "server errors: " + _examples(findings.errors)
    assert not findings.unshaped, "errors not in the OpenAI shape: " + _examples(findings.unshaped)
    assert not findings.sniffable, "answers without x-content-type-options: nosniff: " + _examples(findings.sniffable)
    assert findings.answered >= CASES // 2, f"only {findings.answered} of {CASES} answered: the fuzz tested little"
    assert http_get(gw.url + "/healthz")[0] == 200
    assert gw.popen.poll() is None


def test_raw_http_fuzz_gets_one_answer_per_request(findings: Findings) -> None:
    # A refusal written while the app answers the same request would splice two answers into one stream.
    assert not findings.doubled, "requests answered twice: " + _examples(findings.doubled)


def test_raw_http_fuzz_leaves_no_failure_in_the_log(gw: Proc, findings: Findings) -> None:
    # What the client never sees counts too: a handler that failed because the connection under it was
    # refused and half-closed by the edge meanwhile (the answer is then lost, and the error logged).
    log = gw.log()
    failures = [line for line in log.splitlines() if "unhandled_error" in line or "Exception in ASGI" in line]
    assert not failures, _examples([line[:700] for line in failures])
