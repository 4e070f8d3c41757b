"""The operator dashboard in a real browser (Debian's Chromium, headless, driven by Selenium): sign in with an
admin key, see the live replica, kill it and watch the page show it down with its breaker open; the screenshot
is kept in test-artifacts/dashboard.png. Also: the cookie (a session id, not the key) is HttpOnly, Secure and
SameSite=Strict, the page runs under its Content-Security-Policy without a refusal, a key without admin:read cannot
sign in, the data endpoint needs the cookie, signing out works. (tests/security/test_dashboard_session.py attacks
the sessions.)"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from browser import chromium as _browser
from dashboard_http import data as dashboard_data
from dashboard_http import sign_in as http_sign_in
from procs import (
    ADMIN_KEY,
    ARTIFACTS,
    Proc,
    gateway_config,
    http_get,
    http_post,
    start_gateway,
    start_sim,
    wait_until,
)


@pytest.fixture(scope="module")
def setup(module_tmp: Path) -> Iterator[tuple[Proc, Proc]]:
    sim = start_sim("--slots", "4", "--tokens-per-s", "500", log_dir=module_tmp)
    cost = {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}
    cfg = gateway_config(
        {"chat": [{"url": sim.url, "name": "gpu-1", "cost": cost}]},
        resilience={"retries": 0, "breaker": {"failures": 1, "open_s": 600}},
        quota={"usage": {"flush_interval_s": 0.1}},
    )
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield gw, sim
    gw.stop()
    sim.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = _browser()
    yield driver
    driver.quit()


def _sign_in(browser: Any, gw: Proc, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(gw.url + "/dashboard")
    browser.delete_all_cookies()  # signed out, whatever an earlier test left
    browser.get(gw.url + "/dashboard")
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "sign-in").click()
    # The answer has loaded: the dashboard, or the form again with its error.
    WebDriverWait(browser, 10).until(
        lambda d: d.find_elements(By.ID, "replicas") or d.find_elements(By.CLASS_NAME, "error")
    )


def test_a_key_without_admin_read_cannot_sign_in(setup: tuple[Proc, Proc], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    gw, _ = setup
    status, raw = http_post(
        gw.url + "/admin/keys", {"user": "app", "tier": "free"}, headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert status == 201
    _sign_in(browser, gw, orjson.loads(raw)["key"])
    assert "cannot open the dashboard" in browser.find_element(By.CLASS_NAME, "error").text
    _sign_in(browser, gw, "pc-0123456789abcdef-not-a-real-key-at-all-0000000000")
    assert "cannot open the dashboard" in browser.find_element(By.CLASS_NAME, "error").text
    assert browser.get_cookie("portcullis_dashboard") is None
    assert http_get(gw.url + "/dashboard/data")[0] == 403  # no cookie, no data


def test_sign_in_see_a_replica_go_down_and_its_breaker_open(setup: tuple[Proc, Proc], browser: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    gw, sim = setup
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    for _ in range(3):  # some traffic for the charts and the top keys
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    # A key past half its daily budget, and a batch job.
    status, raw = http_post(
        gw.url + "/admin/keys",
        {"user": "thrifty", "tier": "free", "budget": {"day": 0.05}},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert status == 201, raw
    thrifty = openai.OpenAI(base_url=gw.url + "/v1", api_key=orjson.loads(raw)["key"], max_retries=0)
    for _ in range(50):  # until the budget refuses (the dashboard lists it from the usage records)
        try:
            thrifty.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
        except openai.RateLimitError:
            break
    wait_until(lambda: bool(_dashboard_data(gw)["budgets"]), what="the budget past half on the dashboard")
    batch = _submit_batch(gw)
    _sign_in(browser, gw, ADMIN_KEY)
    cookie = browser.get_cookie("portcullis_dashboard")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert ADMIN_KEY not in cookie["value"]  # a session id, not the key
    assert ADMIN_KEY not in browser.execute_script("return document.cookie")  # the page's script cannot read it
    wait = WebDriverWait(browser, 20, poll_frequency=0.2)

    def text(selector: str) -> str:
        # Read in one script call: the page re-renders its tables every second, so an element found by one
        # WebDriver call may be gone by the next.
        return browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : '';", selector
        )

    def cell(name: str) -> str:
        return text(f'#replicas tr[data-replica="gpu-1"] td.{name}')

    wait.until(lambda _: cell("health") == "ready" and cell("breaker") == "closed")
    wait.until(lambda _: "admin" in text("#keys"))  # today's top key
    wait.until(lambda _: "key " in text("#budgets"))  # thrifty's key, over half
    wait.until(lambda _: batch in text("#batches"))
    sim.signal(signal.SIGKILL)
    sim.wait(10)
    with pytest.raises(openai.APIStatusError):  # the refused connection takes the replica out, the breaker opens
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    wait.until(lambda _: cell("health") == "down" and cell("breaker") == "open")
    # The charts have drawn their lines (a series needs two samples, two seconds apart).
    wait_until(lambda: browser.execute_script("return document.querySelectorAll('#rps path').length") == 2)
    # The page ran under its Content-Security-Policy (script and styles from files): the browser refused nothing.
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refused, refused
    widths = browser.execute_script("return [...document.querySelectorAll('.bar > div')].map(e => e.style.width)")
    assert widths and all(w.endswith("%") for w in widths)  # the bars' widths, set by the script
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
    data = _dashboard_data(gw)
    (model,) = data["models"]
    assert model["replicas"][0]["state"] == "down" and model["replicas"][0]["breaker"] == "open"
    assert data["top_keys"][0]["requests"] >= 3 and len(data["series"]["t"]) >= 1
    (budget,) = data["budgets"]
    assert (
        budget["subject"] == "key" and budget["period"] == "day" and 0.5 <= budget["share"] and budget["limit"] == 0.05
    )
    assert [b["id"] for b in data["batches"]] == [batch] and data["batches"][0]["total"] == 2


_SESSIONS: dict[str, str] = {}


def _dashboard_data(gw: Proc) -> dict[str, Any]:
    session = _SESSIONS.get(gw.url) or _SESSIONS.setdefault(gw.url, http_sign_in(gw.url, ADMIN_KEY))
    answer = dashboard_data(gw.url, session)
    assert answer.status == 200, answer.text
    return orjson.loads(answer.body)


def _submit_batch(gw: Proc) -> str:
    import urllib.request
    import uuid

    lines = b"\n".join(
        orjson.dumps(
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
            }
        )
        for i in range(2)
    )
    boundary = uuid.uuid4().hex
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'
        ).encode()
        + lines
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        gw.url + "/v1/files",
        data=form,
        headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request) as resp:
        file_id = orjson.loads(resp.read())["id"]
    status, raw = http_post(
        gw.url + "/v1/batches",
        {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert status == 200, raw
    return orjson.loads(raw)["id"]


def test_signing_out_returns_to_the_form(setup: tuple[Proc, Proc], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw, _ = setup
    _sign_in(browser, gw, ADMIN_KEY)
    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "key"))  # the sign-in form again
    assert browser.get_cookie("portcullis_dashboard") is None
