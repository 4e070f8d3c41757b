"""Issue 17, the JWT parts of points 9 and 10, against real gateway processes that take only JWTs (no key store).

No token makes a 500: a JWKS mixing RSA, EC and symmetric keys with a `kid` naming a key of the wrong family,
and signed claims of the wrong type, are each a 401 in the OpenAI error shape, and every such refusal counts
for the failed-auth throttle. A token's grant is capped by the configuration (scopes dropped, a tier refused),
its `models` claim must be a list, several credential headers are a 400, and `DELETE /v1/models/{id}` works on
a JWT-only gateway.
"""

from __future__ import annotations

import base64
import http.client
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt as pyjwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from procs import Proc, gateway_config, start_gateway

SECRET = "hardening-test-secret-0123456789abcdef0123456789"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ALL_SCOPES = "chat:write models:read models:write models:delete"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "dana", "exp": now + 300, "iat": now, "scope": ALL_SCOPES, **over}


def forge(header: dict[str, Any], claims: dict[str, Any], key: Any, alg: str) -> str:
    """A correctly signed token with any header and claims (PyJWT's encoder refuses e.g. a non-string kid)."""
    signing_input = f"{_b64(orjson.dumps({'alg': alg, 'typ': 'JWT', **header}))}.{_b64(orjson.dumps(claims))}"
    signature = pyjwt.algorithms.get_default_algorithms()[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{_b64(signature)}"


def hs(**over: Any) -> str:
    return forge({}, _claims(**over), SECRET.encode(), "HS256")


def call(
    gw: Proc, method: str, path: str, headers: list[tuple[str, str]], body: Any = None
) -> tuple[int, dict[str, str], Any]:
    """One request with exactly these headers (a name may repeat); status, headers, JSON body."""
    url = urlsplit(gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.putrequest(method, path)
        data = orjson.dumps(body) if body is not None else b""
        for name, value in [*headers, ("content-type", "application/json"), ("content-length", str(len(data)))]:
            conn.putheader(name, value)
        conn.endheaders(data)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, orjson.loads(resp.read() or b"null")
    finally:
        conn.close()


def bearer(gw: Proc, method: str, path: str, token: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    return call(gw, method, path, [("authorization", f"Bearer {token}")], body)


def assert_openai_error(body: Any, status: int, code: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], (status, body)


def _jwks(path: Path) -> Path:
    """RSA, EC and a symmetric key side by side, as identity providers' key sets may have them."""
    keys = [
        {**orjson.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "rsa"},
        {**orjson.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key())), "kid": "ec"},
        {"kty": "oct", "k": _b64(b"a-symmetric-key-in-the-key-set-0123456789"), "kid": "oct"},
    ]
    path.write_bytes(orjson.dumps({"keys": keys}))
    return path


def _jwt_only(sim: Proc, tmp: Path, failed_auth_per_minute: int, **jwt: Any) -> Proc:
    """A gateway without API keys: HS256 with the secret, RS256/ES256 from the mixed JWKS."""
    jwks = str(_jwks(tmp / f"jwks-{time.monotonic_ns()}.json"))
    cfg = gateway_config(
        {"tiny": [sim.url], "other": [sim.url]},
        auth={
            "api_keys": False,
            "failed_auth_per_minute": failed_auth_per_minute,
            "jwt": {"enabled": True, "algorithms": ["HS256", "RS256", "ES256"], "jwks_file": jwks, **jwt},
        },
    )
    return start_gateway(cfg, tmp, ready_path="/readyz", env={"PORTCULLIS_JWT_SECRET": SECRET})


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    proc = _jwt_only(
        sim,
        module_tmp,
        # Bad tokens are this module's business: throttling them would turn its later answers into 429s.
        failed_auth_per_minute=1_000_000,
        allowed_scopes=["chat:write", "models:read", "models:write", "models:delete"],
        allowed_tiers=["free"],
    )
    yield proc
    proc.stop()


MISMATCHED = {
    "RS256 token, kid of the EC key": lambda: forge({"kid": "ec"}, _claims(), RSA_KEY, "RS256"),
    "ES256 token, kid of the RSA key": lambda: forge({"kid": "rsa"}, _claims(), EC_KEY, "ES256"),
    "RS256 token, kid of the symmetric key": lambda: forge({"kid": "oct"}, _claims(), RSA_KEY, "RS256"),
    "kid that is a list": lambda: forge({"kid": ["rsa"]}, _claims(), RSA_KEY, "RS256"),
    "kid that is an object": lambda: forge({"kid": {"k": "rsa"}}, _claims(), RSA_KEY, "RS256"),
}


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_a_kid_of_the_wrong_key_type_is_401(gw: Proc, case: str) -> None:
    # The control: each key of the set verifies the tokens of its own family.
    for token in (forge({"kid": "rsa"}, _claims(), RSA_KEY, "RS256"), forge({"kid": "ec"}, _claims(), EC_KEY, "ES256")):
        status, _, body = bearer(gw, "GET", "/v1/models", token)
        assert status == 200, body
    status, headers, body = bearer(gw, "GET", "/v1/models", MISMATCHED[case]())
    assert status == 401, (case, body)
    assert_openai_error(body, status, "invalid_token")
    assert headers["www-authenticate"].startswith('Bearer realm="portcullis", error="invalid_token"')


WRONG_TYPES = {
    "scope: 5": {"scope": 5},
    "scp: object": {"scope": None, "scp": {"chat:write": True}},
    "permissions: [1]": {"scope": None, "permissions": [1]},
    'exp: "x"': {"exp": "x"},
    "exp: []": {"exp": []},
    "sub: {}": {"sub": {}},
    "tier: []": {"tier": []},
    "tier: 5": {"tier": 5},
    'models: "tiny"': {"models": "tiny"},  # read as "no list" it used to grant every model
    "models: [1]": {"models": [1]},
    "models: null": {"models": None},
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_signed_claims_of_the_wrong_type_are_401(gw: Proc, case: str) -> None:
    # The control: claims of the right types, a models list restricting the token.
    status, _, body = bearer(gw, "GET", "/v1/models", hs(tier="free", models=["tiny"], scp=["models:read"]))
    assert status == 200 and {m["id"] for m in body["data"]} == {"tiny"}, body
    over = WRONG_TYPES[case]
    claims = {k: v for k, v in _claims(**over).items() if not (k == "scope" and v is None)}
    status, _, body = bearer(gw, "GET", "/v1/models", forge({}, claims, SECRET.encode(), "HS256"))
    assert status == 401, (case, body)
    assert_openai_error(body, status, "invalid_token")


def test_scopes_beyond_the_configured_cap_are_dropped(gw: Proc) -> None:
    greedy = hs(scope=f"{ALL_SCOPES} admin:read keys:admin usage:read")
    status, _, body = bearer(gw, "GET", "/v1/models", greedy)
    assert status == 200, body  # the token works for what it may do ...
    for path in ("/admin/models", "/admin/keys", "/admin/usage"):
        status, _, body = bearer(gw, "GET", path, greedy)
        assert status == 403, (path, body)  # ... and nothing more
        assert_openai_error(body, status, "missing_scope")


def test_a_tier_beyond_the_configured_cap_is_refused(gw: Proc) -> None:
    assert bearer(gw, "GET", "/v1/models", hs(tier="free"))[0] == 200
    status, _, body = bearer(gw, "GET", "/v1/models", hs(tier="premium"))  # a configured tier, not allowed
    assert status == 401, body
    assert_openai_error(body, status, "invalid_token")


@pytest.mark.parametrize("name", ["authorization", "api-key", "x-api-key"])
def test_several_credential_headers_are_400(gw: Proc, name: str) -> None:
    first, second = hs(sub="dana"), hs(sub="erin")
    values = [f"Bearer {first}", f"Bearer {second}"] if name == "authorization" else [first, second]
    status, _, body = call(gw, "GET", "/v1/models", [(name, v) for v in values])
    assert status == 400, body
    assert_openai_error(body, status, "duplicate_credentials")
    assert body["error"]["param"] == name


def test_delete_model_works_with_jwt_only(gw: Proc) -> None:
    token = hs()
    chat = {"model": "other", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert bearer(gw, "GET", "/v1/models/other", token)[0] == 200
    status, _, body = bearer(gw, "DELETE", "/v1/models/other", hs(models=["tiny"]))  # beyond its models claim
    assert status == 403, body
    assert_openai_error(body, status, "model_not_allowed")
    status, _, body = bearer(gw, "DELETE", "/v1/models/other", token)
    assert status == 200, body
    assert body == {"id": "other", "object": "model", "deleted": True}
    status, _, body = bearer(gw, "POST", "/v1/chat/completions", token, chat)
    assert status == 404, body
    assert_openai_error(body, status, "model_not_found")
    assert bearer(gw, "GET", "/v1/models/tiny", token)[0] == 200  # the others stay
    # Switching it back on needs the model grant too (it did not).
    status, _, body = bearer(gw, "POST", "/admin/models/other/enable", hs(models=["tiny"]))
    assert status == 403, body
    assert_openai_error(body, status, "model_not_allowed")
    status, _, body = bearer(gw, "POST", "/admin/models/other/enable", token)
    assert status == 200, body
    assert bearer(gw, "POST", "/v1/chat/completions", token, chat)[0] == 200


def test_refused_tokens_count_for_the_failed_auth_throttle(sim: Proc, tmp_path: Path) -> None:
    limit = 3
    # A gateway of its own: its failed-auth limit is tiny, and this module's other refusals must not count.
    gw = _jwt_only(sim, tmp_path, failed_auth_per_minute=limit)
    try:
        statuses = []
        for attempt in range(limit + 2):
            token = MISMATCHED["RS256 token, kid of the EC key"]() if attempt % 2 else hs(tier=[])
            status, _, body = bearer(gw, "GET", "/v1/models", token)
            assert status in (401, 429), body
            statuses.append(status)
        assert statuses[-1] == 429 and statuses.count(401) <= limit, statuses
        assert_openai_error(body, 429, "too_many_failed_auth")
    finally:
        gw.stop()
