"""The dashboard's sign-in over plain HTTP, as a browser does it: load the form (its CSRF token comes in the page
and in a cookie), post it back with the key, keep the session cookie of the answer. Redirects are not followed,
so a test sees each answer's status and cookies."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import Message

SESSION_COOKIE = "portcullis_dashboard"
CSRF_COOKIE = "portcullis_dashboard_csrf"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes
    cookies: dict[str, str] = field(default_factory=dict)  # what the answer's Set-Cookie headers set

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def request(url: str, *, form: dict[str, str] | None = None, cookies: dict[str, str | None] | None = None) -> Answer:
    """GET (no form) or POST a form, with these cookies (None values left out), without following redirects."""
    headers = {}
    jar = "; ".join(f"{k}={v}" for k, v in (cookies or {}).items() if v is not None)
    if jar:
        headers["cookie"] = jar
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["content-type"] = "application/x-www-form-urlencoded"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with _OPENER.open(req, timeout=10) as resp:
            status, head, body = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, head, body = exc.code, exc.headers, exc.read()
    set_cookies = {}
    for line in head.get_all("set-cookie") or []:
        name, _, rest = line.partition("=")
        set_cookies[name.strip()] = rest.split(";", 1)[0]
    return Answer(status, head, body, set_cookies)


def csrf_of(page: Answer) -> str | None:
    """The CSRF token a page's form carries (None when the form has none)."""
    found = re.search(r'name="csrf" value="([^"]*)"', page.text)
    return found.group(1) if found else None


def sign_in_answer(base: str, key: str) -> Answer:
    """The answer to posting the sign-in form with `key`, as a browser that loaded the form first would."""
    form_page = request(base + "/dashboard")
    assert form_page.status == 200, form_page.text
    fields = {"key": key}
    token = csrf_of(form_page)
    if token is not None:
        fields["csrf"] = token
    return request(base + "/dashboard/login", form=fields, cookies={CSRF_COOKIE: form_page.cookies.get(CSRF_COOKIE)})


def sign_in(base: str, key: str) -> str:
    """The session cookie's value after signing in with `key`."""
    answer = sign_in_answer(base, key)
    assert answer.status == 303, (answer.status, answer.text)
    return answer.cookies[SESSION_COOKIE]


def data(base: str, session: str) -> Answer:
    return request(base + "/dashboard/data", cookies={SESSION_COOKIE: session})


def sign_out(base: str, session: str) -> Answer:
    """Sign out from the dashboard's page (its form's CSRF token)."""
    page = request(base + "/dashboard", cookies={SESSION_COOKIE: session})
    fields = {}
    token = csrf_of(page)
    if token is not None:
        fields["csrf"] = token
    return request(base + "/dashboard/logout", form=fields, cookies={SESSION_COOKIE: session})
