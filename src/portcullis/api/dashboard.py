"""The operator dashboard: `/dashboard`, a page that polls `/dashboard/data` every second.

Sign-in takes an admin key (scope `admin:read`) in a form and keeps it in a cookie the page's script cannot
read (`HttpOnly`), sent only to `/dashboard` paths (`Path`), only over HTTPS or to localhost (`Secure`), never
with cross-site requests (`SameSite=Strict`); every data request authenticates it afresh, so a revoked key
stops the dashboard within the key cache's time. Nothing here is on the API's hot path: the time series
come from a sampler that reads the request metrics every two seconds (obs/timeline.py), the rest from live
state (admission, catalog) and, for the tables, the database.

The page is plain HTML with an inline script and hand-drawn SVG charts: no build step, no third-party code.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from portcullis.errors import Forbidden, GatewayError, Unauthenticated
from portcullis.http import Request
from portcullis.identity import scopes
from portcullis.identity.principal import Principal
from portcullis.jobs.store import batch_object
from portcullis.quota import usage
from portcullis.quota.plan import user_budget_of
from portcullis.upstream.exchange import Exchange

if TYPE_CHECKING:
    from portcullis.app import Gateway

COOKIE = "portcullis_dashboard"
_HTML = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
_SECURITY = [
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"),
]
_SESSION_S = 8 * 3600


def _page(name: str) -> bytes:
    return resources.files("portcullis.api").joinpath(f"static/{name}").read_bytes()


def _cookie(req: Request) -> str | None:
    raw = req.header(b"cookie")
    if not raw:
        return None
    for part in raw.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


async def _signed_in(gw: Gateway, req: Request) -> Principal | None:
    """The principal of the dashboard's cookie, if it still holds a key with admin:read."""
    key = _cookie(req)
    if key is None:
        return None
    assert gw.identity is not None
    try:
        principal = await gw.identity.authenticate(req, credential=key)
    except Unauthenticated:
        return None
    return principal if scopes.ADMIN_READ in principal.scopes else None


async def page(gw: Gateway, req: Request, ex: Exchange) -> None:
    """GET /dashboard: the dashboard, or the sign-in form."""
    ex.principal = await _signed_in(gw, req)
    body = _page("dashboard.html" if ex.principal is not None else "login.html")
    await req.respond(200, body, _HTML + _SECURITY)


async def login(gw: Gateway, req: Request, ex: Exchange) -> None:
    """POST /dashboard/login (a form with `key`): the cookie, and back to the dashboard."""
    body = await req.read_body(16_384)
    key = (parse_qs(body.decode("latin-1")).get("key") or [""])[0].strip()
    assert gw.identity is not None
    try:
        principal = await gw.identity.authenticate(req, credential=key) if key else None
    except GatewayError:
        principal = None
    if principal is None or scopes.ADMIN_READ not in principal.scopes:
        login_page = _page("login.html").replace(
            b"<!--error-->", b'<p class="error">That key cannot open the dashboard.</p>'
        )
        await req.respond(401, login_page, _HTML + _SECURITY)
        return
    ex.principal = principal
    cookie = f"{COOKIE}={key}; Path=/dashboard; Max-Age={_SESSION_S}; HttpOnly; Secure; SameSite=Strict"
    await req.respond(303, b"", [(b"location", b"/dashboard"), (b"set-cookie", cookie.encode()), *_SECURITY])


async def logout(gw: Gateway, req: Request, ex: Exchange) -> None:
    cookie = f"{COOKIE}=; Path=/dashboard; Max-Age=0; HttpOnly; Secure; SameSite=Strict"
    await req.respond(303, b"", [(b"location", b"/dashboard"), (b"set-cookie", cookie.encode())])


async def data(gw: Gateway, req: Request, ex: Exchange) -> None:
    """GET /dashboard/data: everything the page shows, as JSON."""
    principal = await _signed_in(gw, req)
    if principal is None:
        raise Forbidden("Sign in to the dashboard with an admin key.", code="dashboard_sign_in")
    ex.principal = principal
    await req.respond_json(200, await snapshot(gw))


async def snapshot(gw: Gateway) -> dict[str, Any]:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    month = today[:8] + "01"
    out: dict[str, Any] = {
        "now": time.time(),
        "draining": gw.draining,
        "models": _models(gw),
        "series": gw.timeline.series(),
        "top_keys": [],
        "budgets": [],
        "batches": [],
        "errors": [],
    }
    try:
        rows = await usage.aggregate(gw.engine, group_by=["key", "user"], since=today)
        rows.sort(key=lambda r: (r["cost"], r["total_tokens"]), reverse=True)
        out["top_keys"] = [
            {k: r[k] for k in ("key", "user", "requests", "total_tokens", "cost", "errors")} for r in rows[:10]
        ]
        out["budgets"] = await _budgets(gw, today, month)
    except Exception as exc:  # the database is away: the live part still shows
        out["errors"].append(f"usage: {type(exc).__name__}")
    if gw.batch_store is not None:
        try:
            out["batches"] = await _batches(gw)
        except Exception as exc:
            out["errors"].append(f"batches: {type(exc).__name__}")
    return out


def _models(gw: Gateway) -> list[dict[str, Any]]:
    models = []
    for name, gate in gw.admission.gates.items():
        capacity = gate.capacity()
        models.append(
            {
                "model": name,
                "enabled": name not in gw.catalog.disabled,
                "slots_in_use": gate.holding,
                "slots": capacity if capacity < 1 << 20 else None,
                "queue": gate.depth,
                "replicas": [
                    {
                        "name": r.name,
                        "state": r.state.value,
                        "breaker": r.breaker.state.value,
                        "in_flight": r.in_flight,
                        "slots": r.limit,
                        "last_error": r.last_error,
                    }
                    for r in gate.replicas
                ],
            }
        )
    return models


async def _budgets(gw: Gateway, today: str, month: str) -> list[dict[str, Any]]:
    """Budgets (a key's own, its user's) at half their limit or more, fullest first."""
    if gw.keys is None:
        return []
    keys = [k for k in await gw.keys.list() if k.revoked_at is None]
    spent = {
        period: await usage.aggregate(gw.engine, group_by=["key", "user"], since=since)
        for period, since in (("day", today), ("month", month))
    }
    by_key = {p: {r["key"]: r["cost"] for r in rows} for p, rows in spent.items()}
    by_user: dict[str, dict[str, float]] = {p: {} for p in spent}
    for p, rows in spent.items():
        for r in rows:
            by_user[p][r["user"]] = by_user[p].get(r["user"], 0.0) + r["cost"]
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key in keys:
        user_budget = user_budget_of(gw.config, key.user, gw.config.tiers.get(key.tier))
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


async def _batches(gw: Gateway) -> list[dict[str, Any]]:
    store = gw.batch_store
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
