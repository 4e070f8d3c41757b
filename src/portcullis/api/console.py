"""The management console: the dashboard's page grown to teams, keys, budgets, usage and the audit log, with single
sign-on over OpenID Connect.

Signing in: an admin key (api/dashboard.py), or single sign-on (`dashboard.sso`): the authorization code flow with
PKCE (S256), `state` and `nonce`, against any provider found by its issuer URL (discovery). The ID token is checked
(signature against the provider's JWKS, issuer, audience, expiry, nonce); the user is its `user_claim`, the role its
`role_claim`: `admin` opens everything; `org_admin`, `team_admin`, `member` or `viewer` is recorded as the user's
role where `team_claim` says (an organisation's name, or "<organisation>/<team>"), so the identity provider stays
the source of truth at every sign-in, and the session acts by that role (identity/roles.py). The session is the
dashboard's (a cookie holding a random id, server-side state).

Acting: the page calls `/dashboard/api/<path>`, which is the admin API's `/admin/<path>` run with the session's
principal: the same handlers, scopes, roles and audit entries as an API client gets. A change (any method but GET)
carries the session's CSRF token in `x-csrf-token`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

import aiohttp
import jwt as pyjwt
import orjson

from portcullis.api import dashboard
from portcullis.api.dashboard import DashboardDeps, Session
from portcullis.errors import BadGateway, Forbidden, InvalidRequest
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity import scopes
from portcullis.identity.principal import unstorable
from portcullis.identity.tenancy import ORG_ROLES, TEAM_ROLES, TenancyStore
from portcullis.identity.throttle import peer_address, trusted_networks
from portcullis.obs.logging import get_logger
from portcullis.store import audit

if TYPE_CHECKING:
    from portcullis.config import SsoConfig

log = get_logger("portcullis.console")
T = TypeVar("T")

_FLOW_S = 600  # a sign-in started and not finished is forgotten after this
_FLOW_PREFIX = "portcullis:console:sso:"
_FLOWS_MAX = 10_000  # sign-ins under way one process keeps without Redis (the oldest make room)
_META_S = 3600  # the provider's discovery document and keys are read again after this
_REFETCH_S = 60.0  # an unknown key id has the provider's keys read again at most this often
# The browser that started a sign-in: its callback must come from that browser (a link to someone else's callback
# would sign the victim in as them). SameSite=Lax: it must come back on the provider's top-level redirect.
BROWSER_COOKIE = "portcullis_sso"
ROLE_SCOPES = (*scopes.DEFAULT, scopes.ROLES)
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True, slots=True)
class Flow:
    """A sign-in under way: what the callback must find again."""

    nonce: str
    verifier: str
    browser: str  # SHA-256 of the value in the starting browser's BROWSER_COOKIE
    expires: float


class ProviderError(Exception):
    """The identity provider answered what this gateway cannot use: a 502 (sso_error), never a 500."""


class SsoClient:
    """The gateway as a relying party of one OpenID provider (a confidential client)."""

    def __init__(self, config: SsoConfig) -> None:
        self.config = config
        secret = os.environ.get(config.client_secret_env)
        if not secret:
            raise ValueError(
                f"dashboard.sso: the client secret is not set: put it in the environment variable "
                f"{config.client_secret_env} (or name another one in dashboard.sso.client_secret_env)"
            )
        self.secret = secret
        self._meta: tuple[dict[str, Any], float] | None = None
        self._keys: tuple[pyjwt.PyJWKSet, float] | None = None
        self._refetched = -_REFETCH_S  # when an unknown key id last had the keys read again (monotonic)
        self._flows: dict[str, Flow] = {}  # (without Redis: this process's, oldest first)
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._http

    async def _get(self, url: str) -> dict[str, Any]:
        try:
            async with self._client().get(url) as resp:
                status, raw = resp.status, await resp.read()
            body = orjson.loads(raw) if status == 200 else None
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise ProviderError(f"{url}: {type(exc).__name__}") from exc
        if not isinstance(body, dict):
            raise ProviderError(f"{url}: HTTP {status}, not a JSON object")
        return body

    async def meta(self) -> dict[str, Any]:
        if self._meta is None or self._meta[1] < time.monotonic():
            found = await self._get(self.config.issuer.rstrip("/") + "/.well-known/openid-configuration")
            if found.get("issuer") != self.config.issuer:
                raise ProviderError("its discovery document names another issuer")
            for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(found.get(endpoint), str):
                    raise ProviderError(f"its discovery document has no {endpoint}")
            self._meta = (found, time.monotonic() + _META_S)
        return self._meta[0]

    async def _key(self, kid: str | None, alg: str) -> pyjwt.PyJWK:
        """The provider's key for a token: by its id, and of the algorithm's kind (an RS256 token meets an RSA key).
        An unknown id has the keys read again (the provider rotated them), at most once a minute."""
        kind = _KEY_TYPES.get(alg[:2])
        for fresh in (False, True):
            now = time.monotonic()
            if fresh:
                if now - self._refetched < _REFETCH_S:
                    break
                self._refetched = now
            if fresh or self._keys is None or self._keys[1] < now:
                try:
                    keys = pyjwt.PyJWKSet.from_dict(await self._get(str((await self.meta())["jwks_uri"])))
                except pyjwt.PyJWTError as exc:
                    raise ProviderError(f"its keys: {exc}") from exc
                self._keys = (keys, now + _META_S)
            for key in self._keys[0].keys:
                if (kid is None or key.key_id == kid) and (kind is None or key.key_type == kind):
                    return key
        raise Forbidden("The ID token is signed with a key the identity provider does not list.", code="sso_error")

    async def start(self, redis: Any) -> tuple[str, str]:
        """A new sign-in: the URL to send the browser to, and the value for its BROWSER_COOKIE."""
        meta = await self.meta()
        state, nonce, verifier, browser = (secrets.token_urlsafe(32) for _ in range(4))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        flow = Flow(nonce, verifier, _digest(browser), time.time() + _FLOW_S)
        if redis is not None:
            await redis.set(_FLOW_PREFIX + state, orjson.dumps([nonce, verifier, flow.browser]), ex=_FLOW_S)
        else:
            now, flows = time.time(), self._flows
            while flows and (len(flows) >= _FLOWS_MAX or next(iter(flows.values())).expires <= now):
                del flows[next(iter(flows))]  # the oldest: expired, or making room (O(1) each)
            flows[state] = flow
        query = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.config.redirect_uri,
            "scope": " ".join(["openid", *(s for s in self.config.scopes if s != "openid")]),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        return f"{meta['authorization_endpoint']}?{urlencode(query)}", browser

    async def _flow(self, redis: Any, state: str) -> Flow | None:
        """The sign-in `state` names, taken (each is good for one callback)."""
        if redis is not None:
            raw = await redis.getdel(_FLOW_PREFIX + state)
            if raw is None:
                return None
            nonce, verifier, browser = orjson.loads(raw)
            return Flow(nonce, verifier, browser, 0.0)
        flow = self._flows.pop(state, None)
        return flow if flow is not None and flow.expires > time.time() else None

    async def finish(self, redis: Any, code: str, state: str, browser: str | None) -> dict[str, Any]:
        """The callback: the code exchanged (with the PKCE verifier), the ID token checked; its claims. `browser`: the
        BROWSER_COOKIE the callback came with (the sign-in must have started in this browser)."""
        flow = await self._flow(redis, state)
        if flow is None:
            raise Forbidden("This sign-in is unknown or expired; start again.", code="sso_state_invalid")
        if browser is None or not hmac.compare_digest(_digest(browser), flow.browser):
            raise Forbidden("This sign-in was started in another browser; start again.", code="sso_state_invalid")
        meta = await self.meta()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.redirect_uri,
            "code_verifier": flow.verifier,
        }
        auth = aiohttp.BasicAuth(self.config.client_id, self.secret)
        try:
            async with self._client().post(str(meta["token_endpoint"]), data=form, auth=auth) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(f"its token endpoint: {type(exc).__name__}") from exc
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            body = None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("id_token"), str):
            refused = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), str) else status
            raise Forbidden(f"The identity provider refused the sign-in ({refused}).", code="sso_error")
        token = body["id_token"]
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError as exc:
            raise ProviderError(f"its ID token: {exc}") from exc
        alg, kid = header.get("alg"), header.get("kid")
        allowed = meta.get("id_token_signing_alg_values_supported") or ["RS256"]
        if not isinstance(alg, str) or alg not in allowed or alg == "none" or alg.startswith("HS"):
            raise Forbidden("The ID token is signed with an algorithm this gateway does not take.", code="sso_error")
        key = await self._key(kid if isinstance(kid, str) else None, alg)
        try:
            claims: dict[str, Any] = pyjwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.config.client_id,
                issuer=self.config.issuer,
                leeway=30,
                options={"require": ["exp", "iat", "sub"]},
            )
        except (pyjwt.PyJWTError, TypeError, ValueError) as exc:
            raise Forbidden(f"The ID token is not valid: {exc}.", code="sso_error") from exc
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), flow.nonce.encode()):
            raise Forbidden("The ID token is not this sign-in's (nonce).", code="sso_error")
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != self.config.client_id:
            raise Forbidden("The ID token was issued to another client (azp).", code="sso_error")
        return claims


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def _provider(call: Awaitable[T]) -> T:
    """A call to the identity provider: what it answered that cannot be used is a 502 (sso_error)."""
    try:
        return await call
    except ProviderError as exc:
        log.warning("sso_provider_error", error=str(exc))
        raise BadGateway(f"The identity provider's answer cannot be used: {exc}.", code="sso_error") from exc


def _browser_cookie(value: str, max_age: int) -> tuple[bytes, bytes]:
    attributes = f"Path=/dashboard/sso; Max-Age={max_age}; HttpOnly; Secure; SameSite=Lax"
    return b"set-cookie", f"{BROWSER_COOKIE}={value}; {attributes}".encode()


# -- the routes ----------------------------------------------------------------------------------------


def _sso(api: DashboardDeps) -> SsoClient:
    sso: SsoClient | None = api.sso
    if sso is None:
        raise Forbidden("Single sign-on is not configured on this gateway (dashboard.sso).", code="sso_not_configured")
    return sso


async def sso_start(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """GET /dashboard/sso: off to the identity provider (this browser marked as the one that started)."""
    _, redis = dashboard.store_of(api)
    url, browser = await _provider(_sso(api).start(redis))
    headers = [(b"location", url.encode()), _browser_cookie(browser, _FLOW_S), *dashboard.SECURITY]
    await req.respond(303, b"", headers)


async def sso_callback(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """GET /dashboard/sso/callback?code&state: the provider's answer; a session, and on to the console."""
    from portcullis.api.common import query_params

    sso = _sso(api)
    query = query_params(req)
    if "error" in query:
        raise Forbidden("The identity provider did not sign you in.", code="sso_error")
    code, state = query.get("code"), query.get("state")
    if not code or not state:
        raise InvalidRequest("The sign-in's answer lacks its code or state.", code="sso_error")
    sessions, redis = dashboard.store_of(api)
    claims = await _provider(sso.finish(redis, code, state, dashboard.cookie_value(req, BROWSER_COOKIE)))
    user, role, where = (claims.get(c) for c in (sso.config.user_claim, sso.config.role_claim, sso.config.team_claim))
    if not isinstance(user, str) or not user or unstorable(user) is not None:
        raise Forbidden(f"The ID token's {sso.config.user_claim!r} claim is not a user name.", code="sso_no_user")
    if sso.config.user_claim == "email" and claims.get("email_verified") is not True:
        # An address the provider did not verify could be anyone's: keys and roles go by this name.
        raise Forbidden("The identity provider has not verified your e-mail address.", code="sso_no_user")
    granted = await _role(api, user, role, where, req)
    session = Session(
        user=user,
        tier=api.config.auth.jwt.default_tier,
        scopes=granted,
        via="sso",
        key_id=None,
        csrf=secrets.token_urlsafe(32),
        expires=time.time() + sessions.ttl_s,
    )
    sid = await sessions.create(redis, session)  # (a new id: one the browser brought is never kept)
    log.info("console_sign_in", user=user, role=role, via="sso")
    headers = [
        (b"location", b"/dashboard"),
        dashboard.session_cookie(sid, sessions.ttl_s),
        _browser_cookie("", 0),
        *dashboard.SECURITY,
    ]
    await req.respond(303, b"", headers)


async def _role(api: DashboardDeps, user: str, role: Any, where: Any, req: Request) -> tuple[str, ...]:
    """The session's scopes from the role claim. A role in a level is recorded where the claim says (audited), and
    the roles the provider gave before are taken back: it stays the source of truth for what it gives."""
    if role != "admin" and (role not in (*ORG_ROLES, *TEAM_ROLES) or not isinstance(where, str) or not where):
        raise Forbidden("Your identity provider gave you no role this gateway knows.", code="sso_no_role")
    tenancy = TenancyStore(api.engine)
    server = api.config.server
    source = peer_address(req.scope, trusted_networks(server.trusted_proxies), server.trusted_proxy_hops)
    actor = audit.Actor(user=user, via="sso", source=source, request_id=req.request_id)
    if role == "admin":
        await tenancy.drop_sso_roles(user, ("", ""), actor=actor)
        return tuple(sorted(scopes.ALL))
    if role in ORG_ROLES:
        org = next((o for o in await tenancy.orgs() if o.name == where), None)
        if org is None:
            raise Forbidden(f"No organisation '{where}' for your role.", code="sso_no_role")
        await tenancy.drop_sso_roles(user, (org.id, ""), actor=actor)
        await tenancy.set_member(None, org.id, user, role, actor=actor, source="sso")
    else:
        placed = await tenancy.placement(where)
        team = await tenancy.team(placed.team_id) if placed is not None else None
        if team is None or team.org_id is None:
            raise Forbidden(f"No team '{where}' for your role.", code="sso_no_role")
        await tenancy.drop_sso_roles(user, (team.org_id, team.id), actor=actor)
        await tenancy.set_member(team, team.org_id, user, role, actor=actor, source="sso")
    return tuple(sorted(ROLE_SCOPES))


async def me(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """GET /dashboard/api/me: who the session is, what it may do."""
    session = await _session(api, req)
    roles = await TenancyStore(api.engine).roles_of(session.user)
    await req.respond_json(
        200, {"user": session.user, "via": session.via, "scopes": list(session.scopes), "roles": roles}
    )


async def admin_api(api: DashboardDeps, req: Request, ex: Exchange, rest: str) -> None:
    """/dashboard/api/<rest>: the admin API's /admin/<rest>, as the session's principal."""
    session = await _session(api, req)
    if req.method != "GET":
        sent = req.header(b"x-csrf-token") or b""
        if not sent or not hmac.compare_digest(sent, session.csrf.encode()):
            raise Forbidden(
                "A change from the console carries its CSRF token (x-csrf-token).", code="csrf_token_invalid"
            )
    raw = req.path[len("/dashboard/api/") :]
    route, args = api.admin_route(req.method, "/admin/" + raw)
    principal = session.principal()
    route.check(principal)
    ex.principal = principal
    await route.handler(route.deps, req, ex, *args)


async def _session(api: DashboardDeps, req: Request) -> Session:
    signed_in = await dashboard.signed_in(api, req)
    if signed_in is None:
        raise Forbidden("Sign in to the console.", code="dashboard_sign_in")
    return signed_in[1]
