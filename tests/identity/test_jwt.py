"""JWT: what is accepted, every listed attack refused, and the gateway path with `token mint`."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import openai
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from procs import Proc, gateway_config, start_gateway

from portcullis.config import JwtConfig
from portcullis.identity.jwt import InvalidToken, JwtSetupError, JwtVerifier

SECRET = "jwt-test-secret-0123456789abcdef0123456789abcdef"
TIERS = {"free", "premium"}


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "dana", "exp": now + 300, "iat": now, "nbf": now, "scope": "chat:write models:read", **over}


def _pem_public(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def hs(monkeypatch: pytest.MonkeyPatch) -> JwtVerifier:
    monkeypatch.setenv("PORTCULLIS_JWT_SECRET", SECRET)
    return JwtVerifier(JwtConfig(enabled=True, issuer="https://idp", audience="portcullis", leeway_s=5), TIERS)


def _hs_token(**over: Any) -> str:
    body = {**_claims(iss="https://idp", aud="portcullis"), **over}
    return pyjwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


def test_valid_hs256_maps_claims(hs: JwtVerifier) -> None:
    p = hs.verify(_hs_token(tier="premium", models=["tiny"]))
    assert (p.user, p.tier, p.via) == ("jwt:dana", "premium", "jwt")  # the token namespace, apart from key users
    assert p.scopes == {"chat:write", "models:read"} and p.models == {"tiny"}
    perms = hs.verify(_hs_token(scope=None, permissions=["embeddings:write", "not-a-scope"]))
    assert perms.scopes == {"embeddings:write"}


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        # (times as offsets from when the test runs: parameters are made when the suite is collected, and a long
        # suite reaches this test more than ten minutes later)
        ({"exp": -60}, "expired"),
        ({"nbf": 600}, "not yet valid"),
        ({"iat": 600}, "issued in the future"),
        ({"iss": "https://evil"}, "wrong issuer"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"sub": None}, "no subject"),
        ({"tier": "platinum"}, "unknown tier"),
    ],
)
def test_bad_claims_are_refused(hs: JwtVerifier, claims: dict[str, Any], reason: str) -> None:
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf", "iat") else v for k, v in claims.items()}
    body = {**_claims(iss="https://idp", aud="portcullis"), **claims}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(InvalidToken):
        hs.verify(pyjwt.encode(body, SECRET, algorithm="HS256"))


def test_missing_exp_is_refused(hs: JwtVerifier) -> None:
    body = {k: v for k, v in _claims(iss="https://idp", aud="portcullis").items() if k != "exp"}
    with pytest.raises(InvalidToken):
        hs.verify(pyjwt.encode(body, SECRET, algorithm="HS256"))


def test_alg_none_is_refused(hs: JwtVerifier) -> None:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    token = b64({"alg": "none", "typ": "JWT"}) + "." + b64(_claims(iss="https://idp", aud="portcullis")) + "."
    with pytest.raises(InvalidToken, match="not accepted"):
        hs.verify(token)


def test_wrong_secret_and_garbage_are_refused(hs: JwtVerifier) -> None:
    with pytest.raises(InvalidToken):
        hs.verify(pyjwt.encode(_claims(iss="https://idp", aud="portcullis"), "x" * 40, algorithm="HS256"))
    with pytest.raises(InvalidToken):
        hs.verify("not.a.token")


def test_algorithm_confusion_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An HS256 token whose HMAC key is our RSA *public* key must not pass, whatever is configured."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = _pem_public(private)
    (tmp_path / "pub.pem").write_bytes(pem)
    forged = pyjwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda key: key  # PyJWT refuses PEM as an HMAC key itself
    token = forged.encode(orjson.dumps(_claims()), pem, algorithm="HS256")
    rs_only = JwtVerifier(JwtConfig(enabled=True, algorithms=["RS256"], public_key_file=tmp_path / "pub.pem"), TIERS)
    with pytest.raises(InvalidToken, match="not accepted"):
        rs_only.verify(token)
    monkeypatch.setenv("PORTCULLIS_JWT_SECRET", SECRET)
    both = JwtVerifier(
        JwtConfig(enabled=True, algorithms=["HS256", "RS256"], public_key_file=tmp_path / "pub.pem"), TIERS
    )
    with pytest.raises(InvalidToken):
        both.verify(token)
    assert both.verify(pyjwt.encode(_claims(), private, algorithm="RS256")).user == "jwt:dana"


def test_jwks_picks_keys_by_kid_and_refuses_unknown_kid(tmp_path: Path) -> None:
    old, new = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks = {"keys": []}
    for kid, key in (("old", old), ("new", new)):
        jwk = orjson.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwks["keys"].append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
    (tmp_path / "jwks.json").write_bytes(orjson.dumps(jwks))
    v = JwtVerifier(JwtConfig(enabled=True, algorithms=["RS256"], jwks_file=tmp_path / "jwks.json"), TIERS)
    for kid, key in (("old", old), ("new", new)):  # both signing keys valid during a rotation
        assert v.verify(pyjwt.encode(_claims(), key, algorithm="RS256", headers={"kid": kid})).user == "jwt:dana"
    with pytest.raises(InvalidToken, match="kid"):
        v.verify(pyjwt.encode(_claims(), new, algorithm="RS256", headers={"kid": "stranger"}))
    with pytest.raises(InvalidToken):  # the right kid, the wrong key
        v.verify(pyjwt.encode(_claims(), old, algorithm="RS256", headers={"kid": "new"}))


def test_es256_with_a_pem_public_key(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(_pem_public(private))
    v = JwtVerifier(JwtConfig(enabled=True, algorithms=["ES256"], public_key_file=tmp_path / "ec.pem"), TIERS)
    assert v.verify(pyjwt.encode(_claims(), private, algorithm="ES256")).user == "jwt:dana"


def test_no_key_material_is_a_setup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTCULLIS_JWT_SECRET", raising=False)
    with pytest.raises(JwtSetupError, match="no secret"):
        JwtVerifier(JwtConfig(enabled=True), TIERS)
    with pytest.raises(JwtSetupError, match="public_key_file"):
        JwtVerifier(JwtConfig(enabled=True, algorithms=["RS256"]), TIERS)


def test_gateway_accepts_minted_tokens_and_refuses_to_start_without_a_secret(sim: Proc, tmp_path: Path) -> None:
    cfg = gateway_config({"tiny": [sim.url]}, auth={"jwt": {"enabled": True, "issuer": "portcullis-test"}})
    env = {"PORTCULLIS_JWT_SECRET": SECRET}
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz", env=env)
    try:
        cfg_path = tmp_path / "mint.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        minted = subprocess.run(
            [
                sys.executable,
                "-m",
                "portcullis",
                "token",
                "mint",
                "--config",
                str(cfg_path),
                "--sub",
                "erin",
                "--scopes",
                "chat:write",
                "--ttl",
                "5m",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PORTCULLIS_JWT_SECRET": SECRET, "PATH": "/usr/bin"},
        )
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        with pytest.raises(openai.PermissionDeniedError):
            c.models.list()  # the token carries chat:write only
        bad = openai.OpenAI(base_url=gw.url + "/v1", api_key=token[:-3] + "abc", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
        assert info.value.code == "invalid_token"
        assert 'error="invalid_token"' in info.value.response.headers["www-authenticate"]
    finally:
        gw.stop()
    no_secret = subprocess.run(
        [sys.executable, "-m", "portcullis", "serve", "--config", str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PORTCULLIS_KEY_SECRET": "k" * 40, "PATH": "/usr/bin"},
    )
    assert no_secret.returncode == 1 and "auth.jwt" in no_secret.stderr and "secret" in no_secret.stderr
