"""The console's relying party (api/console.py SsoClient) against a stub identity provider that answers what a test
makes it answer: every check of the ID token and of the sign-in's state must refuse what it is there to refuse.
(The whole flow against a real provider: test_console_sso.py.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from portcullis.api.console import ProviderError, SsoClient
from portcullis.config import SsoConfig
from portcullis.errors import Forbidden

CLIENT = "console"
PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Stub:
    """The provider: discovery, keys, and a token endpoint answering `self.answer` (a function of the nonce)."""

    def __init__(self) -> None:
        self.issuer = ""
        self.answer: Any = None
        self.kid = "k1"
        self.issuer_named: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_post("/token", self.token)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer_named or self.issuer,
                "authorization_endpoint": self.issuer + "/auth",
                "token_endpoint": self.issuer + "/token",
                "jwks_uri": self.issuer + "/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def jwks(self, request: web.Request) -> web.Response:
        jwk = pyjwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE.public_key(), as_dict=True)
        return web.json_response({"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]})

    async def token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        assert form["grant_type"] == "authorization_code" and form["code_verifier"]
        return await self.answer(request)


@pytest.fixture
async def stub(unused_tcp_port: int) -> AsyncIterator[Stub]:
    found = Stub()
    runner = web.AppRunner(found.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    found.issuer = f"http://127.0.0.1:{unused_tcp_port}"
    yield found
    await runner.cleanup()


@pytest.fixture
async def client(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SsoClient]:
    monkeypatch.setenv("PORTCULLIS_SSO_CLIENT_SECRET", "s3cret")
    sso = SsoClient(SsoConfig(issuer=stub.issuer, client_id=CLIENT, redirect_uri="http://gw/dashboard/sso/callback"))
    yield sso
    await sso.close()


def id_token(stub: Stub, nonce: str, **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": stub.issuer, "aud": CLIENT, "sub": "u1", "iat": now, "exp": now + 300, "nonce": nonce, **over}
    claims = {k: v for k, v in claims.items() if v is not None}
    return pyjwt.encode(claims, PRIVATE, algorithm="RS256", headers={"kid": stub.kid})


async def begin(client: SsoClient) -> tuple[str, str, str]:
    """A sign-in started: its state, its nonce (as the provider would see them) and the browser's cookie value."""
    url, browser = await client.start(None)
    query = parse_qs(urlparse(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    return query["state"][0], query["nonce"][0], browser


def answering(token: Any, status: int = 200) -> Any:
    async def answer(request: web.Request) -> web.StreamResponse:
        if isinstance(token, str) and not token.startswith("{"):
            return web.json_response({"id_token": token, "token_type": "Bearer"}, status=status)
        return web.Response(text=str(token), status=status, content_type="text/html")

    return answer


async def test_a_valid_token_signs_in_once(stub: Stub, client: SsoClient) -> None:
    state, nonce, browser = await begin(client)
    stub.answer = answering(id_token(stub, nonce, email="a@example.com"))
    claims = await client.finish(None, "code", state, browser)
    assert claims["sub"] == "u1" and claims["email"] == "a@example.com"
    with pytest.raises(Forbidden) as replayed:  # a state is good for one callback
        await client.finish(None, "code", state, browser)
    assert replayed.value.code == "sso_state_invalid"


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": "another"},
        {"aud": "someone-else"},
        {"iss": "https://evil.example"},
        {"exp": int(time.time()) - 3600},
        {"iat": None},
        {"aud": [CLIENT, "other"], "azp": "other"},
    ],
    ids=["nonce", "audience", "issuer", "expired", "no-iat", "azp"],
)
async def test_a_token_failing_a_check_is_refused(stub: Stub, client: SsoClient, change: dict[str, Any]) -> None:
    state, nonce, browser = await begin(client)
    claims = {"nonce": nonce, **change}
    stub.answer = answering(id_token(stub, **claims))
    with pytest.raises(Forbidden) as refused:
        await client.finish(None, "code", state, browser)
    assert refused.value.code == "sso_error"


async def test_unsigned_hmac_and_unknown_key_tokens_are_refused(stub: Stub, client: SsoClient) -> None:
    now = int(time.time())
    for forged in (
        pyjwt.encode({"iss": stub.issuer, "aud": CLIENT, "sub": "u", "iat": now, "exp": now + 60}, None, "none"),
        pyjwt.encode({"iss": stub.issuer, "aud": CLIENT, "sub": "u", "iat": now, "exp": now + 60}, "s3cret", "HS256"),
    ):
        state, _, browser = await begin(client)
        stub.answer = answering(forged)
        with pytest.raises(Forbidden):
            await client.finish(None, "code", state, browser)
    state, nonce, browser = await begin(client)
    stub.answer = answering(id_token(stub, nonce))
    stub.kid = "rotated-away"  # the token names a key the provider does not list
    token = id_token(stub, nonce)
    stub.kid = "k1"
    stub.answer = answering(token)
    with pytest.raises(Forbidden) as unknown:
        await client.finish(None, "code", state, browser)
    assert "does not list" in unknown.value.message


async def test_another_browser_and_bad_provider_answers_are_refused_not_500(stub: Stub, client: SsoClient) -> None:
    state, nonce, _ = await begin(client)
    stub.answer = answering(id_token(stub, nonce))
    with pytest.raises(Forbidden) as elsewhere:
        await client.finish(None, "code", state, "another-browsers-cookie")
    assert elsewhere.value.code == "sso_state_invalid"
    state, _, browser = await begin(client)
    stub.answer = answering("<html>proxy error</html>", status=502)
    with pytest.raises(Forbidden):  # the provider refused: said, not a crash
        await client.finish(None, "code", state, browser)
    state, _, browser = await begin(client)
    stub.answer = answering("not.a.jwt")
    with pytest.raises(ProviderError):  # (a 502 sso_error at the route)
        await client.finish(None, "code", state, browser)
    stub.issuer_named = "https://impostor.example"
    client._meta = None
    with pytest.raises(ProviderError):
        await client.start(None)
