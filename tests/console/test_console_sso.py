"""The management console in headless Chromium, signed in with single sign-on against a real OpenID provider (the
certified `oidc-provider` package from npm, run with the machine's Node.js: tests/console/oidc): the authorization
code flow with PKCE, the role from a claim. A member lands with their role, creates a key and sees it once, uses it
with the `openai` SDK, revokes it; they cannot see another team's keys, in the page or through its API. An
organisation admin sees their teams' keys and budgets; an admin sees the audit entries of all this, and the
console's usage and spend match GET /admin/usage and the usage table. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from browser import chromium
from procs import (
    ARTIFACTS,
    IN_CI,
    Proc,
    create_key,
    free_port,
    gateway_config,
    http_get,
    http_post,
    openai_client,
    start_gateway,
    wait_until,
)

HERE = Path(__file__).parent
OIDC = HERE / "oidc"
CLIENT_ID, CLIENT_SECRET = "portcullis-console", "console-secret-0123456789abcdef"
ACCOUNTS = {
    login: {
        "email": f"{login}@{domain}",
        "email_verified": login != "ned",
        "portcullis_role": role,
        "portcullis_team": where,
    }
    for login, domain, role, where in (
        ("mia", "acme.example", "member", "acme/search"),
        ("olga", "acme.example", "org_admin", "acme"),
        ("root", "ops.example", "admin", ""),
        ("eve", "acme.example", "superuser", "acme"),  # a role the gateway does not know
        ("ned", "acme.example", "member", "acme/search"),  # an address the provider has not verified
    )
}


@pytest.fixture(scope="module")
def provider_and_gateway(sim: Proc, module_tmp: Path) -> Iterator[tuple[str, Proc]]:
    node = shutil.which("node")
    if node is None or not (OIDC / "node_modules" / "oidc-provider").is_dir():
        message = "Node.js and tests/console/oidc's npm packages are needed (scripts/test installs them: npm ci)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    oidc_port, gw_port = free_port(), free_port()
    issuer, gw_url = f"http://127.0.0.1:{oidc_port}", f"http://127.0.0.1:{gw_port}"
    env = {
        **os.environ,
        "OIDC_CLIENT_ID": CLIENT_ID,
        "OIDC_CLIENT_SECRET": CLIENT_SECRET,
        "OIDC_REDIRECT_URI": gw_url + "/dashboard/sso/callback",
        "OIDC_ACCOUNTS": orjson.dumps(ACCOUNTS).decode(),
    }
    log = open(module_tmp / "oidc-provider.log", "wb")
    provider = subprocess.Popen([node, str(OIDC / "provider.mjs"), str(oidc_port)], env=env, stdout=log, stderr=log)
    try:
        wait_until(
            lambda: http_get(issuer + "/.well-known/openid-configuration")[0] == 200,
            timeout=30,
            what="the OpenID provider",
        )
        sso = {
            "issuer": issuer,
            "client_id": CLIENT_ID,
            "redirect_uri": gw_url + "/dashboard/sso/callback",
            "scopes": ["openid", "email", "portcullis"],
        }
        cfg = gateway_config(
            {"tiny": [{"url": sim.url, "cost": {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}}]},
            dashboard={"sso": sso},
            quota={"usage": {"flush_interval_s": 0.1}},
        )
        gw = start_gateway(
            cfg, module_tmp, ready_path="/readyz", env={"PORTCULLIS_SSO_CLIENT_SECRET": CLIENT_SECRET}, port=gw_port
        )
        yield issuer, gw
        gw.stop()
    finally:
        provider.kill()
        provider.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def world(provider_and_gateway: tuple[str, Proc]) -> dict[str, Any]:
    """Two organisations: acme (teams search and ads, a team budget) and globex (team labs), a key in each."""
    _, gw = provider_and_gateway

    def made(path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, raw = http_post(gw.url + path, body)
        assert status == 201, raw
        return orjson.loads(raw)

    acme = made("/admin/organizations", {"name": "acme", "default_tier": "free", "budget": {"month": 10}})
    search = made("/admin/teams", {"org_id": acme["id"], "name": "search", "budget": {"month": 5}})
    ads = made("/admin/teams", {"org_id": acme["id"], "name": "ads"})
    globex = made("/admin/organizations", {"name": "globex", "default_tier": "free"})
    labs = made("/admin/teams", {"org_id": globex["id"], "name": "labs"})
    keys = {
        "ads": create_key(gw, user="ada", tier="free", team_id=ads["id"]),
        "labs": create_key(gw, user="lin", tier="free", team_id=labs["id"]),
        "search": create_key(gw, user="sam", tier="free", team_id=search["id"]),
    }
    for key in keys.values():  # some usage to report
        openai_client(gw, key["key"]).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    return {"gw": gw, "acme": acme, "search": search, "ads": ads, "labs": labs, "keys": keys}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = chromium()
    yield driver
    driver.quit()


def sign_in(browser: Any, gw: Proc, login: str) -> str:
    """Through the console's sign-in form, the provider's login and consent pages, and back: the role shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20, poll_frequency=0.2)
    browser.get(gw.url + "/dashboard")
    browser.delete_all_cookies()
    browser.get(gw.url + "/dashboard")
    browser.find_element(By.ID, "sso").click()
    wait.until(lambda d: d.find_elements(By.NAME, "login"))  # the provider's own page
    browser.find_element(By.NAME, "login").send_keys(login)
    browser.find_element(By.NAME, "password").send_keys("any")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    consent(browser)
    wait.until(lambda d: d.find_elements(By.ID, "who") and d.find_element(By.ID, "who").text)
    return str(browser.find_element(By.ID, "who").text)


def consent(browser: Any, done: str | None = None) -> None:
    """The provider's consent page, the first time an account signs in to this client: continue. (Waits for it, or
    for the console's page, or for `done` in the page.)"""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    asked = "input[name=prompt][value=consent]"

    def next_page(d: Any) -> bool:
        return bool(d.find_elements(By.CSS_SELECTOR, asked) or d.find_elements(By.ID, "who")) or (
            done is not None and done in d.page_source
        )

    WebDriverWait(browser, 20, poll_frequency=0.2).until(next_page)
    if browser.find_elements(By.CSS_SELECTOR, asked):
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def fetch(browser: Any, path: str) -> tuple[int, Any]:
    """The console's own API, from the signed-in page (its cookie)."""
    found = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'}).then(async r => done([r.status, await r.text()]));",
        path,
    )
    return found[0], orjson.loads(found[1]) if found[1] else None


def rows(browser: Any, table: str) -> list[str]:
    return list(
        browser.execute_script(f"return [...document.querySelectorAll('#{table} tbody tr')].map(r => r.innerText)")
    )


def test_a_member_signs_in_makes_a_key_sees_it_once_uses_it_and_revokes_it(world: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    gw, keys = world["gw"], world["keys"]
    assert sign_in(browser, gw, "mia") == "mia@acme.example · member"
    wait = WebDriverWait(browser, 20, poll_frequency=0.2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#new-key-team option"))
    assert not browser.find_element(By.CSS_SELECTOR, "button[data-tab=audit]").is_displayed()  # not for a member
    Select(browser.find_element(By.ID, "new-key-team")).select_by_visible_text("acme / search")
    browser.find_element(By.ID, "new-key-label").send_keys("laptop")
    browser.find_element(By.ID, "new-key-models").send_keys("tiny")
    browser.find_element(By.ID, "new-key-rpm").send_keys("5")
    browser.find_element(By.ID, "create-key").click()
    wait.until(lambda d: d.find_element(By.ID, "new-key-value").text)
    key = browser.find_element(By.ID, "new-key-value").text
    assert key.startswith("pc-")
    wait.until(lambda d: any("laptop" in r for r in rows(d, "key-list")))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "console-member-new-key.png"))
    # It works with the openai SDK, in the member's team (the organisation's tier).
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # Shown once: the page does not have it again.
    browser.refresh()
    wait.until(lambda d: rows(d, "key-list") and "laptop" in " ".join(rows(d, "key-list")))
    assert key not in browser.page_source
    # Only the member's own keys: nobody else's in the team, nothing of another team or organisation.
    listed = " ".join(rows(browser, "key-list"))
    for other in ("search", "ads", "labs"):
        assert keys[other]["id"] not in listed
    for other in ("ads", "labs"):
        status, refused = fetch(browser, f"/dashboard/api/keys/{keys[other]['id']}")
        assert status == 404 and refused["error"]["code"] == "key_not_found"
    status, api_list = fetch(browser, "/dashboard/api/keys")
    assert status == 200 and {k["user"] for k in api_list["data"]} == {"mia@acme.example"}
    made = next(k for k in api_list["data"] if k["label"] == "laptop")
    assert made["models"] == ["tiny"] and made["limits"] == {"requests": {"minute": 5}}
    # Revoked from the page: the SDK is refused at once.
    row = browser.find_element(By.CSS_SELECTOR, "#key-list tbody tr")
    row.find_element(By.CLASS_NAME, "revoke").click()
    wait.until(lambda d: "revoked" in " ".join(rows(d, "key-list")))
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    browser.save_screenshot(str(ARTIFACTS / "console-member-revoked.png"))
    # A change without the page's CSRF token is refused.
    status, _ = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/dashboard/api/keys', {method: 'POST', credentials: 'same-origin', headers: {'content-type': "
        "'application/json'}, body: JSON.stringify({user: 'mia@acme.example', team_id: arguments[0]})})"
        ".then(async r => done([r.status, await r.text()]));",
        world["search"]["id"],
    )
    assert status == 403 and orjson.loads(_)["error"]["code"] == "csrf_token_invalid"


def test_an_organisation_admin_sees_its_teams_keys_and_budgets(world: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw, keys = world["gw"], world["keys"]
    assert sign_in(browser, gw, "olga") == "olga@acme.example · org_admin"
    wait = WebDriverWait(browser, 20, poll_frequency=0.2)
    wait.until(lambda d: rows(d, "key-list") and keys["ads"]["id"] in " ".join(rows(d, "key-list")))
    listed = " ".join(rows(browser, "key-list"))
    assert keys["search"]["id"] in listed and keys["labs"]["id"] not in listed
    browser.find_element(By.CSS_SELECTOR, "button[data-tab=budgets]").click()
    wait.until(lambda d: any("search" in r for r in rows(d, "budget-list")))
    browser.save_screenshot(str(ARTIFACTS / "console-org-admin-budgets.png"))
    status, budgets = fetch(browser, "/dashboard/api/budgets")
    assert status == 200
    team = next(b for b in budgets["data"] if b["level"] == "team" and b["id"] == world["search"]["id"])
    # Each level's spend is the usage table's, over the level's keys this month (GET /admin/usage, as the operator).
    _, raw = http_get(gw.url + "/admin/usage?group_by=key&since=" + time.strftime("%Y-%m-01", time.gmtime()))
    cost = {r["key"]: r["cost"] for r in orjson.loads(raw)["data"]}
    everyone = orjson.loads(http_get(gw.url + "/admin/keys")[1])["data"]
    in_team = sum(cost.get(k["id"], 0.0) for k in everyone if k["team_id"] == world["search"]["id"])
    in_org = sum(cost.get(k["id"], 0.0) for k in everyone if k["org_id"] == world["acme"]["id"])
    assert team["spent"] == pytest.approx(in_team) and team["spent"] > 0 and team["limit"] == 5
    org = next(b for b in budgets["data"] if b["level"] == "organization")
    assert org["id"] == world["acme"]["id"] and org["spent"] == pytest.approx(in_org) and org["spent"] > team["spent"]


def test_an_admin_sees_the_audit_and_the_usage_the_api_reports(world: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw = world["gw"]
    assert sign_in(browser, gw, "root") == "root@ops.example · admin"
    wait = WebDriverWait(browser, 20, poll_frequency=0.2)
    wait.until(lambda d: d.find_element(By.ID, "replicas").is_displayed())  # the live view, for an admin
    browser.find_element(By.CSS_SELECTOR, "button[data-tab=audit]").click()
    wait.until(lambda d: any("key.revoke" in r for r in rows(d, "audit-list")))
    audit = rows(browser, "audit-list")
    assert any("key.revoke" in r and "mia@acme.example (sso)" in r for r in audit)
    assert any("key.create" in r and "mia@acme.example (sso)" in r for r in audit)
    assert any("member.set" in r and "olga@acme.example (sso)" in r for r in audit)  # the role from the claim
    browser.save_screenshot(str(ARTIFACTS / "console-audit.png"))
    browser.find_element(By.CSS_SELECTOR, "button[data-tab=usage]").click()
    wait.until(lambda d: rows(d, "usage-list") and "no usage" not in rows(d, "usage-list")[0])
    browser.save_screenshot(str(ARTIFACTS / "console-usage.png"))
    # Per team too: each team's spend is its keys' (the usage table reads a record's team through its key).
    _, by_team = fetch(browser, "/dashboard/api/usage?group_by=team")
    _, by_key = fetch(browser, "/dashboard/api/usage?group_by=key")
    everyone = orjson.loads(http_get(gw.url + "/admin/keys")[1])["data"]
    team_of = {k["id"]: k["team_id"] for k in everyone}
    for row in by_team["data"]:
        keys_cost = sum(r["cost"] for r in by_key["data"] if team_of.get(r["key"]) == row["team"])
        assert row["cost"] == pytest.approx(keys_cost), row
    assert {row["team"] for row in by_team["data"]} >= {world["search"]["id"], world["ads"]["id"]}
    # What the console shows is what the API reports.
    _, console_usage = fetch(browser, "/dashboard/api/usage?group_by=day,key")
    assert console_usage["data"] == orjson.loads(http_get(gw.url + "/admin/usage?group_by=day,key")[1])["data"]
    status, csv = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/dashboard/api/usage?group_by=day,key&format=csv', {credentials: 'same-origin'})"
        ".then(async r => done([r.status, await r.text()]));"
    )
    assert (
        status == 200
        and csv.splitlines()[0] == "day,key,requests,errors,prompt_tokens,completion_tokens,total_tokens,cost"
    )
    assert len(csv.splitlines()) == len(console_usage["data"]) + 1


def refused_sign_in(browser: Any, gw: Proc, login: str) -> str:
    """Through the provider's pages as `login`, to the gateway's refusal: its code."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(gw.url + "/dashboard")
    browser.delete_all_cookies()
    browser.get(gw.url + "/dashboard")
    browser.find_element(By.ID, "sso").click()
    wait = WebDriverWait(browser, 20, poll_frequency=0.2)
    wait.until(lambda d: d.find_elements(By.NAME, "login"))
    browser.find_element(By.NAME, "login").send_keys(login)
    browser.find_element(By.NAME, "password").send_keys("any")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    consent(browser, done='"code"')
    wait.until(lambda d: '"code"' in d.page_source)
    assert browser.get_cookie("portcullis_dashboard") is None  # no session
    return str(orjson.loads(browser.find_element(By.TAG_NAME, "body").text)["error"]["code"])


def test_an_unknown_role_an_unverified_address_and_a_forged_answer_are_refused(
    provider_and_gateway: tuple[str, Proc], browser: Any
) -> None:
    _, gw = provider_and_gateway
    assert refused_sign_in(browser, gw, "eve") == "sso_no_role"
    assert refused_sign_in(browser, gw, "ned") == "sso_no_user"
    status, body = http_get(gw.url + "/dashboard/sso/callback?code=x&state=forged")
    assert status == 403 and orjson.loads(body)["error"]["code"] == "sso_state_invalid"


def test_a_callback_from_another_browser_is_refused(provider_and_gateway: tuple[str, Proc]) -> None:
    """Login CSRF: an attacker's own sign-in answer, sent to a victim's browser, must not sign the victim in. The
    sign-in is tied to the browser that started it (a cookie it alone holds)."""
    import urllib.parse
    import urllib.request

    _, gw = provider_and_gateway

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(gw.url + "/dashboard/sso", timeout=10)
        raise AssertionError("expected a redirect")
    except urllib.error.HTTPError as started:
        assert started.code == 303
        assert "portcullis_sso=" in started.headers["set-cookie"] and "SameSite=Lax" in started.headers["set-cookie"]
        state = urllib.parse.parse_qs(urllib.parse.urlparse(started.headers["location"]).query)["state"][0]
    # The same state, from a browser without that cookie (the victim's): refused before any code is exchanged.
    status, body = http_get(gw.url + f"/dashboard/sso/callback?code=attackers-code&state={state}")
    assert status == 403 and orjson.loads(body)["error"]["code"] == "sso_state_invalid"
