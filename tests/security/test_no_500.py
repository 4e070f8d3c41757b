"""Issue 17, points 9 and 10: no input makes a 500, and routing matches the path as sent.

Each input here made the gateway answer 500 (or reach a handler it should not) before the fix. They go to a
real gateway over a raw socket, so nothing in between (an HTTP client's URL normalisation) changes them.
The gateway runs on PostgreSQL: a NUL in a query parameter only fails there (SQLite takes it).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from conftest import scratch_postgres
from procs import ADMIN_KEY, Proc, gateway_config, start_gateway

CHAT = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}]}'
DIGITS = b"9" * 5000  # past int()'s 4300-digit limit for string conversion


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    with scratch_postgres("portcullis_no500") as database_url:
        url = re.sub(r"^postgresql://", "postgresql+asyncpg://", database_url)  # (the env may name no driver)
        cfg = gateway_config({"tiny": [sim.url]}, store={"database_url": url})
        proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
        yield proc
        proc.stop()


def read_response(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 answer: status, headers and body (de-chunked), read by its framing (not to the close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += _recv(sock)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += _recv(sock)
            if size == 0:
                return status, headers, body
            body, rest = body + rest[:size], rest[size + 2 :]
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        rest += _recv(sock)
    return status, headers, rest[:length]


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the gateway closed the connection before a whole answer")
    return chunk


def exchange(gw: Proc, head: bytes, body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request as raw bytes on its own connection, and its answer."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head + body)
        return read_response(sock)


def call(gw: Proc, method: str, target: str, body: bytes | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    head = f"{method} {target} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {ADMIN_KEY}\r\nconnection: close\r\n"
    if body is not None:
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return exchange(gw, head.encode() + b"\r\n", body or b"")


def openai_error(status: int, body: bytes) -> dict:
    assert 400 <= status < 500, (status, body[:300])
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("route", ["/v1/files", "/v1/batches"])
@pytest.mark.parametrize("limit", ["%C2%B2", "9" * 5000, "%EF%BC%91"])  # superscript two, 5000 digits, fullwidth one
def test_an_odd_integer_in_the_query_is_400(gw: Proc, route: str, limit: str) -> None:
    status, _, body = call(gw, "GET", f"{route}?limit={limit}")
    error = openai_error(status, body)
    assert (status, error["param"], error["code"]) == (400, "limit", "invalid_value")


@pytest.mark.parametrize("target", ["/admin/keys?user=%00", "/v1/files?after=%00", "/admin/usage?model=%00"])
def test_a_nul_in_the_query_is_400_not_a_database_error(gw: Proc, target: str) -> None:
    status, _, body = call(gw, "GET", target)
    assert openai_error(status, body)["code"] == "invalid_value"
    assert status == 400


def test_a_5000_digit_number_in_a_json_body_is_400(gw: Proc) -> None:
    # As a JSON number orjson refuses it (400 invalid_json); inside a string a handler parsed it with int().
    window = b'{"input_file_id":"file-x","endpoint":"/v1/chat/completions","completion_window":"' + DIGITS + b'h"}'
    status, _, body = call(gw, "POST", "/v1/batches", window)
    assert (status, openai_error(status, body)["param"]) == (400, "completion_window")
    status, _, body = call(gw, "POST", "/v1/chat/completions", CHAT[:-1] + b',"max_tokens":' + DIGITS + b"}")
    assert (status, openai_error(status, body)["code"]) == (400, "invalid_json")
    status, _, body = call(gw, "POST", "/admin/keys", b'{"user":"u","tier":"free","expires_in_s":"' + DIGITS + b'"}')
    assert (status, openai_error(status, body)["param"]) == (400, "expires_in_s")


@pytest.mark.parametrize(
    ("target", "body", "param"),
    [
        ("/admin/keys", b'{"user":"u","tier":"free","expires_in_s":1e308}', "expires_in_s"),
        ("/admin/keys/00000000000000ad/rotate", b'{"grace_s":1e308}', "grace_s"),
    ],
)
def test_a_huge_key_lifetime_is_400_not_an_overflow(gw: Proc, target: str, body: bytes, param: str) -> None:
    status, _, raw = call(gw, "POST", target, body)
    assert (status, openai_error(status, raw)["param"]) == (400, param)


def test_a_websocket_upgrade_is_a_4xx_in_the_openai_shape(gw: Proc) -> None:
    head = (
        b"GET /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
        b"authorization: Bearer " + ADMIN_KEY.encode() + b"\r\n\r\n"
    )
    status, _, body = exchange(gw, head)
    openai_error(status, body)


def sent_to(sent: list[dict]) -> Callable[[dict], Awaitable[None]]:
    async def send(message: dict) -> None:
        sent.append(message)

    return send


@pytest.mark.asyncio
async def test_a_websocket_scope_reaching_the_app_is_refused_in_the_openai_shape() -> None:
    # The served gateway does not upgrade at all; an app under a server that does must still not 500.
    from portcullis.app import Gateway
    from portcullis.config import build_config

    scope = {"type": "websocket", "path": "/v1/chat/completions", "headers": []}
    app = Gateway(build_config(gateway_config({"tiny": ["http://127.0.0.1:1"]}), source="(test)", environ={}))
    for extensions, expected in (({"websocket.http.response": {}}, "websocket.http.response.start"), ({}, "close")):
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "websocket.connect"}

        await app(scope | {"extensions": extensions}, receive, sent_to(sent))
        assert sent[0]["type"].endswith(expected), sent
        if expected != "close":
            assert sent[0]["status"] == 400
            assert (b"x-content-type-options", b"nosniff") in sent[0]["headers"]
            assert orjson.loads(sent[1]["body"])["error"]["code"] == "websocket_not_supported"


@pytest.mark.parametrize(
    "target",
    [
        "/%61dmin/keys",  # percent-encoded 'a'
        "/admin/%6Beys",
        "/admin/keys%0a",  # a trailing newline
        "/admin/keys/00000000000000ad%0a",
        "/admin/keys/00000000000000a%64",
        "/v1/chat/%63ompletions",
    ],
)
def test_an_encoded_or_newline_path_does_not_reach_a_handler(gw: Proc, target: str) -> None:
    method = "POST" if "chat" in target else "GET"
    status, _, body = call(gw, method, target, CHAT if method == "POST" else None)
    error = openai_error(status, body)
    assert (status, error["code"]) == (404, "unknown_url"), error


def test_a_path_parameter_is_still_decoded(gw: Proc) -> None:
    status, _, body = call(gw, "GET", "/v1/models/ti%6Ey")  # an id percent-encoded by a client library
    assert status == 200 and orjson.loads(body)["id"] == "tiny"
    status, _, body = call(gw, "GET", "/v1/models/tiny%0a")  # decoded, the newline stays part of the id
    assert (status, openai_error(status, body)["code"]) == (404, "model_not_found")


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("GET", "/healthz", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/chat/completions", b"{"),
        ("GET", "/nowhere", None),
        ("GET", "/dashboard", None),
        ("DELETE", "/v1/chat/completions", None),
    ],
)
def test_every_response_says_nosniff(gw: Proc, method: str, target: str, body: bytes | None) -> None:
    _, headers, _ = call(gw, method, target, body)
    assert headers.get(b"x-content-type-options") == b"nosniff", headers
