"""Issue 17, point 5: one principal namespace per identity source.

A JWT whose `sub` is an API-key user's name must reach nothing of that user's: not their files (404), not
their cache entries (a miss, not their answer), and no key user may be created in the token namespace. A
subject mapped explicitly in `auth.jwt.users` does share, which is the way to join the two on purpose.
Everything runs against a real gateway process.
"""

from __future__ import annotations

import http.client
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt as pyjwt
import openai
import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, start_gateway, wait_until

SECRET = "namespace-test-secret-0123456789abcdef0123456789"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "a question"}], "max_tokens": 4, "temperature": 0}


def token(sub: str, scope: str = "chat:write batches:write models:read") -> str:
    now = int(time.time())
    return pyjwt.encode({"sub": sub, "exp": now + 300, "iat": now, "scope": scope}, SECRET, algorithm="HS256")


def call(gw: Proc, method: str, path: str, credential: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    """One request; status, headers (lower-case names) and the JSON body (or the raw bytes)."""
    url = urlsplit(gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        headers = {"authorization": f"Bearer {credential}"}
        data = None
        if body is not None:
            data, headers["content-type"] = orjson.dumps(body), "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = raw
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
    finally:
        conn.close()


def new_key(gw: Proc, user: str) -> tuple[int, Any]:
    status, _, body = call(
        gw, "POST", "/admin/keys", ADMIN_KEY, {"user": user, "tier": "free", "scopes": ["chat:write", "batches:write"]}
    )
    return status, body


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"tiny": [sim.url]},
        auth={"jwt": {"enabled": True, "users": {"bob-at-idp": "bob"}}},
        cache={"enabled": True, "backend": "memory", "scope": "tenant"},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz", env={"PORTCULLIS_JWT_SECRET": SECRET})
    yield proc
    proc.stop()


def _upload(gw: Proc, key: str) -> str:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
    return client.files.create(file=("in.jsonl", io.BytesIO(orjson.dumps(line) + b"\n")), purpose="batch").id


def test_a_token_named_like_a_key_user_reads_none_of_their_files(gw: Proc) -> None:
    status, alice = new_key(gw, "alice")
    assert status == 201, alice
    file_id = _upload(gw, alice["key"])
    assert call(gw, "GET", f"/v1/files/{file_id}", alice["key"])[0] == 200  # the owner reads it

    impostor = token("alice")
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        status, _, body = call(gw, "GET", path, impostor)
        assert status == 404, (path, status, body)
        assert body["error"]["type"] and body["error"]["message"]
    status, _, listing = call(gw, "GET", "/v1/files", impostor)
    assert status == 200 and file_id not in {f["id"] for f in listing["data"]}
    assert call(gw, "DELETE", f"/v1/files/{file_id}", impostor)[0] == 404
    assert call(gw, "GET", f"/v1/files/{file_id}", alice["key"])[0] == 200  # still there


def test_a_token_named_like_a_key_user_gets_no_hit_on_their_cache(gw: Proc) -> None:
    status, carol = new_key(gw, "carol")
    assert status == 201, carol
    status, headers, first = call(gw, "POST", "/v1/chat/completions", carol["key"], CHAT)
    assert status == 200, first
    # The entry is stored off the request path: the owner's own repeat is a hit once it is there.
    wait_until(
        lambda: call(gw, "POST", "/v1/chat/completions", carol["key"], CHAT)[1].get("x-portcullis-cache") == "hit",
        timeout=10,
        what="carol's answer to be cached",
    )
    status, headers, _ = call(gw, "POST", "/v1/chat/completions", token("carol"), CHAT)
    assert status == 200
    assert headers.get("x-portcullis-cache") == "miss", headers


def test_no_key_user_can_be_created_in_the_token_namespace(gw: Proc) -> None:
    status, body = new_key(gw, "jwt:alice")
    assert status == 400, body
    assert body["error"]["param"] == "user" and body["error"]["code"] == "invalid_value"
    assert "jwt:" in body["error"]["message"]


def test_a_subject_mapped_in_the_config_shares_on_purpose(gw: Proc) -> None:
    status, bob = new_key(gw, "bob")
    assert status == 201, bob
    file_id = _upload(gw, bob["key"])
    assert call(gw, "GET", f"/v1/files/{file_id}", token("bob-at-idp"))[0] == 200  # mapped to bob
    assert call(gw, "GET", f"/v1/files/{file_id}", token("bob"))[0] == 404  # jwt:bob is someone else
