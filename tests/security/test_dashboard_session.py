"""Attacks on the dashboard's sign-in, against real gateway processes (issue 17, point 10).

The cookie must not hold the admin key (a copied cookie would be the key); a forged id, the key itself, or the id
of a session that was signed out or has expired opens nothing; the sign-in and sign-out forms refuse a post
without their CSRF token (403); the pages' Content-Security-Policy allows no inline script, and the pages load
their script and styles from the gateway; with Redis, a session signed in on one gateway process works on
another and signing out on either ends it on both (without Redis, sessions live in the process)."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from dashboard_http import CSRF_COOKIE, SESSION_COOKIE, csrf_of, data, request, sign_in, sign_in_answer, sign_out
from procs import ADMIN_KEY, Proc, gateway_config, http_post, start_gateway, wait_until

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """One gateway without Redis: sessions in its memory."""
    proc = start_gateway(gateway_config({"chat": [sim.url]}), module_tmp)
    yield proc
    proc.stop()


def _error_code(body: bytes) -> str:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return str(error["code"])


def test_the_cookie_holds_a_random_session_id_not_the_key(gw: Proc) -> None:
    answer = sign_in_answer(gw.url, ADMIN_KEY)
    assert answer.status == 303, answer.text
    cookies = answer.headers.get_all("set-cookie") or []
    assert not any(ADMIN_KEY in c or ADMIN_KEY.split("-")[1] in c for c in cookies), cookies
    session = answer.cookies[SESSION_COOKIE]
    assert SESSION_ID.fullmatch(session), session
    (line,) = [c for c in cookies if c.startswith(SESSION_COOKIE + "=")]
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/dashboard"} <= {a.strip() for a in line.split(";")}
    assert data(gw.url, session).status == 200
    assert sign_in(gw.url, ADMIN_KEY) != session  # every sign-in a session of its own


def test_a_forged_or_signed_out_session_id_opens_nothing(gw: Proc) -> None:
    forged = secrets.token_urlsafe(32)
    for value in (forged, ADMIN_KEY, "x" * 43, "../" * 20, ""):  # the key itself: the old cookie's content
        answer = data(gw.url, value)
        assert answer.status == 403 and _error_code(answer.body) == "dashboard_sign_in", (value, answer.status)
        page = request(gw.url + "/dashboard", cookies={SESSION_COOKIE: value})
        assert 'id="key"' in page.text and 'id="replicas"' not in page.text  # the sign-in form
    session = sign_in(gw.url, ADMIN_KEY)
    assert data(gw.url, session).status == 200
    out = sign_out(gw.url, session)
    assert out.status == 303 and out.cookies[SESSION_COOKIE] == ""
    # A copy of the cookie taken before signing out is refused: the session is gone server-side.
    assert data(gw.url, session).status == 403
    page = request(gw.url + "/dashboard", cookies={SESSION_COOKIE: session})
    assert 'id="key"' in page.text and 'id="replicas"' not in page.text


def test_sign_in_and_sign_out_need_their_csrf_token(gw: Proc) -> None:
    form_page = request(gw.url + "/dashboard")
    token, cookie = csrf_of(form_page), form_page.cookies.get(CSRF_COOKIE)
    # A cross-site form post: the attacker's page cannot read the token (nor send the SameSite cookie).
    attempts = [
        ({"key": ADMIN_KEY}, {}),
        ({"key": ADMIN_KEY}, {CSRF_COOKIE: cookie}),
        ({"key": ADMIN_KEY, "csrf": token or ""}, {}),
        ({"key": ADMIN_KEY, "csrf": secrets.token_urlsafe(32)}, {CSRF_COOKIE: cookie}),
    ]
    for form, cookies in attempts:
        answer = request(gw.url + "/dashboard/login", form=form, cookies=cookies)
        assert answer.status == 403, (form.keys(), cookies.keys(), answer.status)
        assert _error_code(answer.body) == "csrf_token_invalid" and SESSION_COOKIE not in answer.cookies
    session = sign_in(gw.url, ADMIN_KEY)
    for form in ({}, {"csrf": ""}, {"csrf": secrets.token_urlsafe(32)}, {"csrf": token or ""}):
        answer = request(gw.url + "/dashboard/logout", form=form, cookies={SESSION_COOKIE: session})
        assert answer.status == 403 and _error_code(answer.body) == "csrf_token_invalid", (form, answer.status)
        assert data(gw.url, session).status == 200  # a forged sign-out signs nobody out
    assert sign_out(gw.url, session).status == 303
    assert data(gw.url, session).status == 403


def _csp(answer_headers: object) -> dict[str, list[str]]:
    raw = answer_headers.get("content-security-policy", "")  # type: ignore[attr-defined]
    directives = [d.split() for d in raw.split(";") if d.strip()]
    return {d[0]: d[1:] for d in directives}


def test_the_pages_have_no_inline_script_and_load_their_files(gw: Proc) -> None:
    session = sign_in(gw.url, ADMIN_KEY)
    for page in (request(gw.url + "/dashboard"), request(gw.url + "/dashboard", cookies={SESSION_COOKIE: session})):
        assert page.status == 200
        csp = _csp(page.headers)
        script_src = csp.get("script-src", csp.get("default-src"))
        assert script_src is not None and "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src
        assert "'unsafe-inline'" not in csp.get("style-src", csp.get("default-src", []))
        assert csp.get("frame-ancestors") == ["'none'"]
        html = page.text
        # What that policy would block: a script element without src, event-handler or style attributes.
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline script"
        assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=|<style", html, re.I), "inline handlers or styles"
        for path in re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', html):
            served = request(gw.url + path)
            kind = "text/javascript" if path.endswith(".js") else "text/css"
            assert served.status == 200 and served.headers["content-type"].startswith(kind) and served.body, path
    signed_in = request(gw.url + "/dashboard", cookies={SESSION_COOKIE: session}).text
    assert 'src="/dashboard/static/dashboard.js"' in signed_in
    assert request(gw.url + "/dashboard/static/nothing.js").status == 404


def test_a_revoked_key_ends_its_sessions_at_once(gw: Proc) -> None:
    status, raw = http_post(gw.url + "/admin/keys", {"user": "ops", "tier": "free", "scopes": ["admin:read"]})
    assert status == 201, raw
    created = orjson.loads(raw)
    session = sign_in(gw.url, created["key"])
    assert data(gw.url, session).status == 200
    status, raw = http_post(gw.url + f"/admin/keys/{created['id']}/revoke", {})
    assert status == 200, raw
    assert data(gw.url, session).status == 403  # the next poll: no key cache in between


def test_a_session_expires(sim: Proc, module_tmp: Path) -> None:
    proc = start_gateway(gateway_config({"chat": [sim.url]}, dashboard={"session_ttl_s": 1}), module_tmp)
    try:
        answer = sign_in_answer(proc.url, ADMIN_KEY)
        assert answer.status == 303
        (line,) = [c for c in answer.headers.get_all("set-cookie") or [] if c.startswith(SESSION_COOKIE + "=")]
        assert "Max-Age=1;" in line
        session = answer.cookies[SESSION_COOKIE]
        first = data(proc.url, session).status
        # The server refuses it once its time is up, whatever the browser still sends.
        wait_until(lambda: data(proc.url, session).status == 403, timeout=10, what="the session to expire")
        assert first == 200
    finally:
        proc.stop()


def test_a_token_signs_in_for_no_longer_than_it_lives(sim: Proc, module_tmp: Path) -> None:
    from portcullis.identity.jwt import mint

    secret = "dashboard-jwt-secret-0123456789abcdef0123"
    jwt = {"enabled": True, "issuer": "ops", "allowed_scopes": ["admin:read"]}  # tokens may administer here
    cfg = gateway_config({"chat": [sim.url]}, auth={"jwt": jwt})
    proc = start_gateway(cfg, module_tmp, env={"PORTCULLIS_JWT_SECRET": secret})
    try:
        token = mint(
            secret.encode(), sub="dana", tier="free", scopes=["admin:read"], ttl_s=30, issuer="ops", audience=None
        )
        answer = sign_in_answer(proc.url, token)
        assert answer.status == 303, answer.text
        (line,) = [c for c in answer.headers.get_all("set-cookie") or [] if c.startswith(SESSION_COOKIE + "=")]
        max_age = int(re.search(r"Max-Age=(\d+)", line).group(1))  # type: ignore[union-attr]
        assert 0 < max_age <= 30 and token not in line  # the token's own lifetime, and not the token
        assert data(proc.url, answer.cookies[SESSION_COOKIE]).status == 200
    finally:
        proc.stop()


def test_with_redis_a_session_works_across_processes_and_sign_out_ends_it_everywhere(
    sim: Proc, module_tmp: Path, redis_url: str, postgres_url: str
) -> None:
    def config() -> dict[str, object]:
        return gateway_config(
            {"chat": [sim.url]},
            store={"auto_migrate": True, "redis_url": redis_url, "database_url": postgres_url},
        )

    first = start_gateway(config(), module_tmp)
    second = None
    try:
        second = start_gateway(config(), module_tmp)
        session = sign_in(first.url, ADMIN_KEY)
        assert data(second.url, session).status == 200  # signed in on one, known to the other
        assert sign_out(second.url, session).status == 303
        # The cookie replayed after signing out, on either process: the session is gone from Redis.
        assert data(first.url, session).status == 403 and data(second.url, session).status == 403
        # What Redis holds: the id's hash (never the id or the key), with Redis's own expiry; gone at sign-out.
        session = sign_in(second.url, ADMIN_KEY)
        client = redis.Redis.from_url(redis_url)
        name = "portcullis:dashboard:session:" + hashlib.sha256(session.encode()).hexdigest()
        stored = client.get(name)
        assert stored is not None and ADMIN_KEY.encode() not in stored and session.encode() not in stored
        assert 0 < client.pttl(name) <= 8 * 3600 * 1000  # dashboard.session_ttl_s's default
        assert sign_out(first.url, session).status == 303 and client.exists(name) == 0
        client.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()
