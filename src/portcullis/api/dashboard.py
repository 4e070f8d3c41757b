"""The operator dashboard: `/dashboard`, a page that polls `/dashboard/data` every second.

Sign-in takes an admin key (scope `admin:read`) in a form and opens a *session*: a random id in a cookie the
page's script cannot read (`HttpOnly`), sent only to `/dashboard` paths (`Path`), only over HTTPS or to
localhost (`Secure`), never with cross-site requests (`SameSite=Strict`). The key itself never leaves the
sign-in request: the session, kept server-side (in Redis when the gateway has one, so every process knows
it; else in this process), holds the key's id, and every data request checks that key again in the
database, so a revoked key stops the dashboard at once. Sessions end after `dashboard.session_ttl_s`, and
signing out deletes them everywhere; a cookie copied from a browser is worth nothing after either.

Both forms carry a CSRF token: the sign-in form one also set as a cookie (double submit: nothing is stored
for a visitor who has not signed in, so the form costs the gateway nothing), the sign-out form the session's
own. A request without the right token gets 403 before anything else is looked at.

Nothing here is on the API's hot path: the time series come from a sampler that reads the request metrics
every two seconds (obs/timeline.py), the rest from live state (admission, catalog) and, for the tables, the
database. The pages are plain HTML with their script and styles in static files served from here (the
Content-Security-Policy allows no inline script or style) and hand-drawn SVG charts: no build step, no
third-party code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import jwt as pyjwt
import orjson
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from portcullis.api.common import Live
from portcullis.errors import Forbidden, GatewayError, NotFound, ServiceUnavailable
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity import scopes
from portcullis.identity.principal import Principal
from portcullis.jobs.store import batch_object
from portcullis.quota import usage
from portcullis.quota.plan import user_budget_of

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from portcullis.config import Config
    from portcullis.identity.auth import Identity
    from portcullis.identity.keys import KeyStore
    from portcullis.jobs.store import BatchStore
    from portcullis.obs.timeline import Timeline
    from portcullis.routing.admission import Admission
    from portcullis.routing.catalog import Catalog
    from portcullis.store.health import DatabaseHealth

COOKIE = "portcullis_dashboard"
CSRF_COOKIE = "portcullis_dashboard_csrf"
_REDIS_PREFIX = "portcullis:dashboard:session:"
_HTML = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
SECURITY = _SECURITY = [
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
]
_STATIC_TYPES = {"js": b"text/javascript; charset=utf-8", "css": b"text/css; charset=utf-8"}
_STATIC = ("dashboard.js", "console.js", "dashboard.css", "login.css")
# What secrets.token_urlsafe(32) makes: anything else in a cookie or form is refused before any lookup.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_LOGIN_CSRF_S = 3600  # the sign-in form's token: a form left open longer is simply shown again
_MEMORY_MAX = 10_000  # sessions one process keeps without Redis (only admins make them; a bound all the same)


def _page(name: str) -> bytes:
    return resources.files("portcullis.api").joinpath(f"static/{name}").read_bytes()


_FILES = {name: _page(name) for name in _STATIC}
SSO_LINK = [False]  # the sign-in form offers single sign-on (set at composition when dashboard.sso is configured)


def _cookie(req: Request, name: str = COOKIE) -> str | None:
    raw = req.header(b"cookie")
    if not raw:
        return None
    for part in raw.decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


def _token(value: str | None) -> str | None:
    return value if value is not None and _TOKEN.fullmatch(value) else None


def cookie_value(req: Request, name: str) -> str | None:
    """A cookie's value, if it has the shape of a token this module makes (secrets.token_urlsafe(32))."""
    return _token(_cookie(req, name))


def cookie_token(req: Request) -> str | None:
    """The session id the request's cookie holds, if it has the shape of one."""
    return _token(_cookie(req))


def session_cookie(sid: str, max_age: float) -> tuple[bytes, bytes]:
    return _set_cookie(COOKIE, sid, max(1, int(max_age)))


def _set_cookie(name: str, value: str, max_age: int) -> tuple[bytes, bytes]:
    attributes = f"Path=/dashboard; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    return b"set-cookie", f"{name}={value}; {attributes}".encode()


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    tier: str
    scopes: tuple[str, ...]
    via: str  # "api_key": key_id is checked on every request; "jwt": the session ends with the token
    key_id: str | None
    csrf: str
    expires: float  # POSIX time

    def principal(self) -> Principal:
        return Principal(
            user=self.user, tier=self.tier, scopes=frozenset(self.scopes), key_id=self.key_id, via=self.via
        )


class Sessions:
    """Dashboard sessions by the SHA-256 of their id (a dump of Redis or of this process holds no usable id):
    in Redis when the gateway has one, with Redis's own expiry; else in this process's memory."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._memory: dict[str, Session] = {}
        # Session → when this process last saw its key accepted by the database (time.monotonic()): while
        # the database is away, a key verified recently enough is trusted, as the key cache does.
        self._verified: dict[str, float] = {}

    @staticmethod
    def _name(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    async def create(self, redis: Redis | None, session: Session) -> str:
        sid = secrets.token_urlsafe(32)
        name = self._name(sid)
        if len(self._verified) > 2 * _MEMORY_MAX:  # entries of sessions that ended elsewhere (other processes)
            self._verified.clear()  # only costs a database check on those sessions' next refresh
        if redis is None:
            self._prune()
            self._memory[name] = session
        else:
            ttl_ms = max(1, int((session.expires - time.time()) * 1000))
            await _redis(redis.set(_REDIS_PREFIX + name, orjson.dumps(session), px=ttl_ms))
        self._verified[name] = time.monotonic()
        return sid

    async def get(self, redis: Redis | None, sid: str) -> Session | None:
        name = self._name(sid)
        if redis is None:
            session = self._memory.get(name)
        else:
            raw = await _redis(redis.get(_REDIS_PREFIX + name))
            session = None if raw is None else _session(raw)
        if session is not None and session.expires <= time.time():
            await self.delete(redis, sid)
            return None
        return session

    async def delete(self, redis: Redis | None, sid: str) -> None:
        name = self._name(sid)
        self._memory.pop(name, None)
        self._verified.pop(name, None)
        if redis is not None:
            await _redis(redis.delete(_REDIS_PREFIX + name))

    def verified(self, sid: str, ok: bool) -> None:
        name = self._name(sid)
        if ok:
            self._verified[name] = time.monotonic()
        else:
            self._verified.pop(name, None)

    def verified_within(self, sid: str, seconds: float) -> bool:
        seen = self._verified.get(self._name(sid))
        return seen is not None and time.monotonic() - seen <= seconds

    def _prune(self) -> None:
        now = time.time()
        for name in [n for n, s in self._memory.items() if s.expires <= now]:
            del self._memory[name]
            self._verified.pop(name, None)
        while len(self._memory) >= _MEMORY_MAX:  # the oldest go first (insertion order)
            name = next(iter(self._memory))
            del self._memory[name]
            self._verified.pop(name, None)


@dataclass(frozen=True, slots=True)
class DashboardDeps(Live):
    """What the dashboard reads (its sign-in checks an admin key; its data is most of the gateway's state)."""

    config: Config
    catalog: Catalog
    admission: Admission
    timeline: Timeline
    engine: AsyncEngine
    db_health: DatabaseHealth
    batch_store: BatchStore | None
    dashboard_sessions: Sessions
    # Made at preflight: the key store (None: API keys are off), authentication.
    key_store: Callable[[], KeyStore | None]
    authentication: Callable[[], Identity | None]
    # The console (api/console.py): the admin routes by method and path (the dispatcher's), single sign-on.
    admin_route: Callable[[str, str], tuple[Any, tuple[str, ...]]] = lambda method, path: (None, ())
    sso_client: Callable[[], Any] = lambda: None  # console.SsoClient when dashboard.sso is configured (preflight)
    # Hosts that load models on demand (hosts/schedule.py Host.snapshot): each model's state, load time; swaps.
    host_snapshots: Callable[[], list[dict[str, Any]]] = lambda: []

    @property
    def keys(self) -> KeyStore | None:
        return self.key_store()

    @property
    def identity(self) -> Identity | None:
        return self.authentication()

    @property
    def sso(self) -> Any:
        return self.sso_client()


def _session(raw: bytes) -> Session | None:
    try:
        fields = orjson.loads(raw)
        return Session(**{**fields, "scopes": tuple(fields["scopes"])})
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None  # not one of ours (or an older layout): no session


async def _redis(call: Any) -> Any:
    try:
        return await call
    except (RedisError, OSError, TimeoutError) as exc:
        raise ServiceUnavailable(
            "The dashboard's session store (Redis) did not answer; try again shortly.",
            code="session_store_unavailable",
            headers={"Retry-After": "2"},
        ) from exc


def store_of(api: DashboardDeps) -> tuple[Sessions, Redis | None]:
    return api.dashboard_sessions, api.bus.redis if api.bus is not None else None


async def signed_in(api: DashboardDeps, req: Request) -> tuple[str, Session] | None:
    """The session of the request's cookie, if it is live and its key still holds admin:read."""
    sid = _token(_cookie(req))
    if sid is None:
        return None
    sessions, redis = store_of(api)
    session = await sessions.get(redis, sid)
    if session is None:
        return None
    if session.key_id is not None and not await _key_admits(api, sessions, sid, session.key_id):
        await sessions.delete(redis, sid)
        return None
    return sid, session


async def _key_admits(api: DashboardDeps, sessions: Sessions, sid: str, key_id: str) -> bool:
    """Whether the session's key is still live with admin:read, asked of the database (the dashboard polls
    once a second: one primary-key read). While the database is away, a key this process saw accepted
    within `auth.key_cache_stale_s` stands, as the key cache serves it to the API; else 503."""
    if api.keys is None:
        return False
    stale_s = api.config.auth.key_cache_stale_s
    if api.db_health.degraded and sessions.verified_within(sid, stale_s):
        return True
    try:
        async with asyncio.timeout(api.config.auth.key_lookup_timeout_s):
            record = await api.keys.get(key_id)
    except (OSError, TimeoutError, SQLAlchemyError) as exc:
        api.db_health.failed(exc)
        if sessions.verified_within(sid, stale_s):
            return True
        raise ServiceUnavailable(
            "The dashboard's key cannot be checked right now; try again shortly.",
            code="auth_store_unavailable",
            headers={"Retry-After": "2"},
        ) from exc
    ok = record is not None and record.usable_at(datetime.now(UTC)) and scopes.ADMIN_READ in record.scopes
    sessions.verified(sid, ok)
    return ok


def _with_csrf(page: bytes, token: str) -> bytes:
    return page.replace(b"{{csrf}}", token.encode())  # a token is [A-Za-z0-9_-]: nothing to escape


async def _login_form(req: Request, status: int, error: bool = False) -> None:
    """The sign-in form with its CSRF token, set again as a cookie (double submit)."""
    token = _token(_cookie(req, CSRF_COOKIE)) or secrets.token_urlsafe(32)
    body = _with_csrf(_page("login.html"), token)
    if SSO_LINK[0]:
        body = body.replace(
            b"<!--sso-->", b'<p class="sso"><a id="sso" href="/dashboard/sso">Sign in with single sign-on</a></p>'
        )
    if error:
        body = body.replace(b"<!--error-->", b'<p class="error">That key cannot open the dashboard.</p>')
    await req.respond(status, body, [*_HTML, *_SECURITY, _set_cookie(CSRF_COOKIE, token, _LOGIN_CSRF_S)])


def _csrf_matches(expected: str | None, form: dict[str, list[str]]) -> bool:
    sent = (form.get("csrf") or [""])[0]
    return expected is not None and bool(sent) and hmac.compare_digest(sent.encode(), expected.encode())


async def _form(req: Request) -> dict[str, list[str]]:
    return parse_qs((await req.read_body(16_384)).decode("latin-1"))


async def page(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """GET /dashboard: the dashboard, or the sign-in form."""
    found = await signed_in(api, req)
    if found is None:
        await _login_form(req, 200)
        return
    ex.principal = found[1].principal()
    await req.respond(200, _with_csrf(_page("dashboard.html"), found[1].csrf), _HTML + _SECURITY)


async def static(api: DashboardDeps, req: Request, ex: Exchange, name: str) -> None:
    """GET /dashboard/static/NAME: the pages' script and styles (public: they hold nothing secret)."""
    body = _FILES.get(name)
    if body is None:
        raise NotFound(f"No dashboard file {name!r}.")
    kind = _STATIC_TYPES[name.rsplit(".", 1)[1]]
    await req.respond(200, body, [(b"content-type", kind), (b"cache-control", b"no-cache")])


async def login(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """POST /dashboard/login (a form with `key` and `csrf`): a new session, its cookie, and back to the
    dashboard."""
    form = await _form(req)
    if not _csrf_matches(_token(_cookie(req, CSRF_COOKIE)), form):
        raise Forbidden(
            "The sign-in form's CSRF token is missing or wrong; load /dashboard and sign in from there.",
            code="csrf_token_invalid",
        )
    key = (form.get("key") or [""])[0].strip()
    assert api.identity is not None
    try:
        principal = await api.identity.authenticate(req, credential=key) if key else None
    except GatewayError:
        principal = None
    if principal is None or scopes.ADMIN_READ not in principal.scopes:
        await _login_form(req, 401, error=True)
        return
    ex.principal = principal
    sessions, redis = store_of(api)
    expires = time.time() + sessions.ttl_s
    if principal.via == "jwt":
        # The token is not kept: the session ends when it does (it was verified a moment ago).
        expires = min(expires, float(pyjwt.decode(key, options={"verify_signature": False})["exp"]))
    old = _token(_cookie(req))
    if old is not None:  # a new sign-in never keeps an id it did not make (session fixation)
        await sessions.delete(redis, old)
    session = Session(
        user=principal.user,
        tier=principal.tier,
        scopes=tuple(sorted(principal.scopes)),
        via=principal.via,
        key_id=principal.key_id,
        csrf=secrets.token_urlsafe(32),
        expires=expires,
    )
    sid = await sessions.create(redis, session)
    await req.respond(
        303,
        b"",
        [
            (b"location", b"/dashboard"),
            _set_cookie(COOKIE, sid, max(1, int(expires - time.time()))),
            _set_cookie(CSRF_COOKIE, "", 0),
            *_SECURITY,
        ],
    )


async def logout(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """POST /dashboard/logout (a form with the session's `csrf`): the session is deleted server-side."""
    form = await _form(req)
    sid = _token(_cookie(req))
    sessions, redis = store_of(api)
    session = await sessions.get(redis, sid) if sid is not None else None
    if session is not None:
        if not _csrf_matches(session.csrf, form):
            raise Forbidden(
                "The sign-out form's CSRF token is missing or wrong; sign out from the dashboard's page.",
                code="csrf_token_invalid",
            )
        assert sid is not None
        await sessions.delete(redis, sid)
    await req.respond(303, b"", [(b"location", b"/dashboard"), _set_cookie(COOKIE, "", 0), *_SECURITY])


async def data(api: DashboardDeps, req: Request, ex: Exchange) -> None:
    """GET /dashboard/data: everything the page shows, as JSON."""
    found = await signed_in(api, req)
    if found is None:
        raise Forbidden("Sign in to the dashboard with an admin key.", code="dashboard_sign_in")
    if scopes.ADMIN_READ not in found[1].scopes:  # (a console session acting by a role)
        raise Forbidden("The live view needs admin:read.", code="missing_scope", param=scopes.ADMIN_READ)
    ex.principal = found[1].principal()
    await req.respond_json(200, await snapshot(api))


async def snapshot(api: DashboardDeps) -> dict[str, Any]:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    month = today[:8] + "01"
    out: dict[str, Any] = {
        "now": time.time(),
        "draining": api.draining,
        "models": _models(api),
        "hosts": api.host_snapshots(),
        "series": api.timeline.series(),
        "top_keys": [],
        "budgets": [],
        "batches": [],
        "errors": [],
    }
    try:
        rows = await usage.aggregate(api.engine, group_by=["key", "user"], since=today)
        rows.sort(key=lambda r: (r["cost"], r["total_tokens"]), reverse=True)
        out["top_keys"] = [
            {k: r[k] for k in ("key", "user", "requests", "total_tokens", "cost", "errors")} for r in rows[:10]
        ]
        out["budgets"] = await _budgets(api, today, month)
    except Exception as exc:  # the database is away: the live part still shows
        out["errors"].append(f"usage: {type(exc).__name__}")
    if api.batch_store is not None:
        try:
            out["batches"] = await _batches(api)
        except Exception as exc:
            out["errors"].append(f"batches: {type(exc).__name__}")
    return out


def _models(api: DashboardDeps) -> list[dict[str, Any]]:
    models = []
    for o in api.admission.outlooks():
        name = o.model
        models.append(
            {
                "model": name,
                "enabled": o.enabled,
                "slots_in_use": o.in_use,
                "slots": o.capacity,
                "queue": o.depth,
                "replicas": [
                    {
                        "name": r.name,
                        "state": r.state.value,
                        "breaker": r.breaker.state.value,
                        "in_flight": r.in_flight,
                        "slots": r.limit,
                        "last_error": r.last_error,
                    }
                    for r in api.catalog.models[name]
                ],
            }
        )
    return models


async def _budgets(api: DashboardDeps, today: str, month: str) -> list[dict[str, Any]]:
    """Budgets (a key's own, its user's) at half their limit or more, fullest first."""
    if api.keys is None:
        return []
    keys = [k for k in await api.keys.list() if k.revoked_at is None]
    spent = {
        period: await usage.aggregate(api.engine, group_by=["key", "user"], since=since)
        for period, since in (("day", today), ("month", month))
    }
    by_key = {p: {r["key"]: r["cost"] for r in rows} for p, rows in spent.items()}
    by_user: dict[str, dict[str, float]] = {p: {} for p in spent}
    for p, rows in spent.items():
        for r in rows:
            by_user[p][r["user"]] = by_user[p].get(r["user"], 0.0) + r["cost"]
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key in keys:
        user_budget = user_budget_of(api.config, key.user, api.config.tiers.get(key.tier))
        for period in ("day", "month"):
            limits = [
                ("key", key.id, (key.budget or {}).get(period), by_key[period].get(key.id, 0.0)),
                ("user", key.user, getattr(user_budget, period), by_user[period].get(key.user, 0.0)),
            ]
            for subject, who, limit, used in limits:
                if limit and used >= 0.5 * limit:
                    found[subject, who, period] = {
                        "subject": subject,
                        "who": who,
                        "period": period,
                        "spent": round(used, 6),
                        "limit": limit,
                        "share": round(used / limit, 4),
                    }
    return sorted(found.values(), key=lambda b: b["share"], reverse=True)[:20]


async def _batches(api: DashboardDeps) -> list[dict[str, Any]]:
    store = api.batch_store
    assert store is not None
    rows = await store.list_batches(None, 10, None)
    counts = await store.counts_many([r.id for r in rows])
    out = []
    for row in rows:
        obj = batch_object(row, counts.get(row.id))
        c = obj["request_counts"]
        out.append(
            {
                "id": obj["id"],
                "status": obj["status"],
                "total": c["total"],
                "completed": c["completed"],
                "failed": c["failed"],
                "progress": round((c["completed"] + c["failed"]) / c["total"], 4) if c["total"] else 0.0,
                "created_at": obj["created_at"],
            }
        )
    return out
