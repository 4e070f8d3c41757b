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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
import jwt as pyjwt
import orjson

from portcullis.api import dashboard
from portcullis.api.dashboard import DashboardDeps, Session
from portcullis.errors import Forbidden, InvalidRequest, ServiceUnavailable
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity import scopes
from portcullis.identity.auth import require_scope
from portcullis.identity.principal import unstorable
from portcullis.identity.tenancy import ORG_ROLES, TEAM_ROLES, TenancyStore
from portcullis.identity.throttle import peer_address, trusted_networks
from portcullis.obs.logging import get_logger
from portcullis.store import audit

if TYPE_CHECKING:
    from portcullis.config import SsoConfig

log = get_logger("portcullis.console")

_FLOW_S = 600  # a sign-in started and not finished is forgotten after this
_FLOW_PREFIX = "portcullis:console:sso:"
_META_S = 3600  # the provider's discovery document and keys are read again after this
ROLE_SCOPES = (*scopes.DEFAULT, scopes.ROLES)


@dataclass(frozen=True, slots=True)
class Flow:
    """A sign-in under way: what the callback must find again."""

    nonce: str
    verifier: str
    expires: float


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
        self._flows: dict[str, Flow] = {}  # (without Redis: this process's)
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _get(self, url: str) -> dict[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        async with self._http.get(url) as resp:
            if resp.status != 200:
                raise ServiceUnavailable(f"The identity provider answered {resp.status} for {url}.", code="sso_error")
            body = orjson.loads(await resp.read())
            if not isinstance(body, dict):
                raise ServiceUnavailable("The identity provider's answer is not a JSON object.", code="sso_error")
            return body

    async def meta(self) -> dict[str, Any]:
        if self._meta is None or self._meta[1] < time.monotonic():
            found = await self._get(self.config.issuer.rstrip("/") + "/.well-known/openid-configuration")
            if found.get("issuer") != self.config.issuer:
                raise ServiceUnavailable("The identity provider names another issuer.", code="sso_error")
            self._meta = (found, time.monotonic() + _META_S)
        return self._meta[0]

    async def _key(self, kid: str | None) -> pyjwt.PyJWK:
        for fresh in (False, True):
            if fresh or self._keys is None or self._keys[1] < time.monotonic():
                jwks = await self._get(str((await self.meta())["jwks_uri"]))
                self._keys = (pyjwt.PyJWKSet.from_dict(jwks), time.monotonic() + _META_S)
            for key in self._keys[0].keys:
                if kid is None or key.key_id == kid:
                    return key
        raise Forbidden("The ID token is signed with a key the identity provider does not list.", code="sso_error")

    async def start(self, redis: Any) -> str:
        """A new sign-in: the URL to send the browser to."""
        meta = await self.meta()
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        flow = Flow(nonce, verifier, time.time() + _FLOW_S)
        if redis is not None:
            await redis.set(_FLOW_PREFIX + state, orjson.dumps([nonce, verifier]), ex=_FLOW_S)
        else:
            now = time.time()
            self._flows = {k: f for k, f in self._flows.items() if f.expires > now}
            if len(self._flows) >= 10_000:
                self._flows.clear()
            self._flows[state] = flow
        wanted = ["openid", *(s for s in self.config.scopes if s != "openid")]
        query = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.config.redirect_uri,
            "scope": " ".join(wanted),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        return f"{meta['authorization_endpoint']}?{urlencode(query)}"

    async def _flow(self, redis: Any, state: str) -> Flow | None:
        if redis is not None:
            raw = await redis.getdel(_FLOW_PREFIX + state)
            if raw is None:
                return None
            nonce, verifier = orjson.loads(raw)
            return Flow(nonce, verifier, 0.0)
        flow = self._flows.pop(state, None)
        return flow if flow is not None and flow.expires > time.time() else None

    async def finish(self, redis: Any, code: str, state: str) -> dict[str, Any]:
        """The callback: the code exchanged (with the PKCE verifier), the ID token checked; its claims."""
        flow = await self._flow(redis, state)
        if flow is None:
            raise Forbidden("This sign-in is unknown or expired; start again.", code="sso_state_invalid")
        meta = await self.meta()
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.redirect_uri,
            "code_verifier": flow.verifier,
        }
        auth = aiohttp.BasicAuth(self.config.client_id, self.secret)
        async with self._http.post(str(meta["token_endpoint"]), data=form, auth=auth) as resp:
            body = orjson.loads(await resp.read() or b"{}")
            if resp.status != 200 or not isinstance(body, dict) or not isinstance(body.get("id_token"), str):
                reason = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
                raise Forbidden(
                    f"The identity provider refused the sign-in: {reason or resp.status}.", code="sso_error"
                )
        token = body["id_token"]
        header = pyjwt.get_unverified_header(token)
        alg = header.get("alg")
        allowed = meta.get("id_token_signing_alg_values_supported") or ["RS256"]
        if not isinstance(alg, str) or alg not in allowed or alg == "none" or alg.startswith("HS"):
            raise Forbidden("The ID token is signed with an algorithm this gateway does not take.", code="sso_error")
        key = await self._key(header.get("kid"))
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
        except pyjwt.PyJWTError as exc:
            raise Forbidden(f"The ID token is not valid: {exc}.", code="sso_error") from exc
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"], flow.nonce):
            raise Forbidden("The ID token is not this sign-in's (nonce).", code="sso_error")
        return claims


# -- the routes ----------------------------------------------------------------------------------------


def _sso(api: DashboardDeps) -> SsoClient:
    sso: SsoClient | None = api.sso
    if sso is None:
        raise Forbidden("Single sign-on is not configured on this gateway (dashboard.sso).", code="sso_not_configured")
    return sso


async def sso_start(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """GET /dashboard/sso: off to the identity provider."""
    _, redis = dashboard.store_of(api)
    url = await _sso(api).start(redis)
    await req.respond(303, b"", [(b"location", url.encode()), *dashboard.SECURITY])


async def sso_callback(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """GET /dashboard/sso/callback?code&state: the provider's answer; a session, and on to the console."""
    from portcullis.api.common import query_params

    sso = _sso(api)
    query = query_params(req)
    if "error" in query:
        raise Forbidden(f"The identity provider did not sign you in: {query['error']}.", code="sso_error")
    code, state = query.get("code"), query.get("state")
    if not code or not state:
        raise InvalidRequest("The sign-in's answer lacks its code or state.", code="sso_error")
    sessions, redis = dashboard.store_of(api)
    claims = await sso.finish(redis, code, state)
    user, role, where = (claims.get(c) for c in (sso.config.user_claim, sso.config.role_claim, sso.config.team_claim))
    if not isinstance(user, str) or not user or unstorable(user) is not None:
        raise Forbidden(f"The ID token's {sso.config.user_claim!r} claim is not a user name.", code="sso_no_user")
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
    old = dashboard.cookie_token(req)
    if old is not None:  # never keep an id it did not make (session fixation)
        await sessions.delete(redis, old)
    sid = await sessions.create(redis, session)
    log.info("console_sign_in", user=user, role=role, via="sso")
    await req.respond(
        303,
        b"",
        [(b"location", b"/dashboard"), dashboard.session_cookie(sid, sessions.ttl_s), *dashboard.SECURITY],
    )


async def _role(api: DashboardDeps, user: str, role: Any, where: Any, req: Request) -> tuple[str, ...]:
    """The session's scopes from the role claim; a role in a level is recorded where the claim says (audited)."""
    if role == "admin":
        return tuple(sorted(scopes.ALL))
    if role not in (*ORG_ROLES, *TEAM_ROLES) or not isinstance(where, str) or not where:
        raise Forbidden("Your identity provider gave you no role this gateway knows.", code="sso_no_role")
    tenancy = TenancyStore(api.engine)
    server = api.config.server
    source = peer_address(req.scope, trusted_networks(server.trusted_proxies), server.trusted_proxy_hops)
    actor = audit.Actor(user=user, via="sso", source=source, request_id=req.request_id)
    if role in ORG_ROLES:
        org = next((o for o in await tenancy.orgs() if o.name == where), None)
        if org is None:
            raise Forbidden(f"No organisation '{where}' for your role.", code="sso_no_role")
        await tenancy.set_member(None, org.id, user, role, actor=actor)
    else:
        placed = await tenancy.placement(where)
        team = await tenancy.team(placed.team_id) if placed is not None else None
        if team is None or team.org_id is None:
            raise Forbidden(f"No team '{where}' for your role.", code="sso_no_role")
        await tenancy.set_member(team, team.org_id, user, role, actor=actor)
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
    if not (route.by_roles and scopes.ROLES in principal.scopes):
        require_scope(principal, route.scope)
    ex.principal = principal
    await route.handler(route.deps, req, ex, *args)


async def _session(api: DashboardDeps, req: Request) -> Session:
    signed_in = await dashboard.signed_in(api, req)
    if signed_in is None:
        raise Forbidden("Sign in to the console.", code="dashboard_sign_in")
    return signed_in[1]
