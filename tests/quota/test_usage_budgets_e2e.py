"""Usage records and budgets end to end, on the in-process and the Redis backend: exact token counts
for streamed and plain responses, a budget crossed mid-stream, alerts once per threshold to a webhook."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml
from procs import (
    Proc,
    create_key,
    gateway_config,
    http_get,
    openai_client,
    sim_control,
    start_gateway,
    wait_until,
)

PROMPT = [{"role": "user", "content": "count the sheep in the field"}]


class Webhook:
    """A real HTTP endpoint that records what the gateway posts to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(request: pytest.FixtureRequest, sim: Proc, webhook: Webhook, module_tmp: Path) -> Iterator[Proc]:
    store: dict[str, Any] = {"database_url": f"sqlite+aiosqlite:///{module_tmp}/usage-{request.param}.db"}
    if request.param == "redis":
        store["redis_url"] = request.getfixturevalue("redis_url")
    cfg = gateway_config(
        {"tiny": [{"url": sim.url, "name": "sim-a", "cost": {"prompt_per_1k": 0.0, "completion_per_1k": 1.0}}]},
        store=store,
        quota={
            "backend": request.param,
            "default_max_tokens": 8,
            "alert_webhook_url": webhook.url,
            "usage": {"flush_interval_s": 0.1},
        },
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    proc.config = cfg  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def recorded(gw: Proc, key_id: str, requests: int) -> dict[str, Any]:
    """The usage report for one key, once its records have been written."""
    found: dict[str, Any] = {}

    def written() -> bool:
        status, body = http_get(gw.url + f"/admin/usage?group_by=key&key_id={key_id}")
        assert status == 200, body
        rows = orjson.loads(body)["data"]
        if rows and rows[0]["requests"] == requests:
            found.update(rows[0])
            return True
        return False

    wait_until(written, what=f"{requests} usage records for {key_id}")
    return found


def test_recorded_tokens_equal_the_upstreams_counts(gw: Proc) -> None:
    plain, streamed, silent = (create_key(gw) for _ in range(3))
    answer = openai_client(gw, plain["key"]).chat.completions.create(model="tiny", messages=PROMPT, max_tokens=12)
    assert answer.usage is not None

    chunks = list(
        openai_client(gw, streamed["key"]).chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_chunk = chunks[-1].usage
    assert usage_chunk is not None and chunks[-1].choices == []

    # Without include_usage the client sees no usage chunk, but the gateway asked for it all the same.
    quiet = list(
        openai_client(gw, silent["key"]).chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=12, stream=True
        )
    )
    assert all(c.usage is None for c in quiet) and all(c.choices for c in quiet)

    for key, usage in ((plain, answer.usage), (streamed, usage_chunk), (silent, answer.usage)):
        row = recorded(gw, key["id"], 1)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
        assert row["cost"] == pytest.approx(usage.completion_tokens / 1000)


def test_budget_crossed_mid_stream_ends_it_and_alerts_fire_once(gw: Proc, sim: Proc, webhook: Webhook) -> None:
    key = create_key(gw, budget={"day": 0.05})  # 50 completion tokens at 1.0 per 1k
    c = openai_client(gw, key["key"])
    sim_control(sim, default_max_tokens=400)  # left alone, the model would write 200-400 tokens
    try:
        first = c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=30, stream=True)
        assert sum(1 for ch in first if ch.choices and ch.choices[0].delta.content) == 30  # 0.03 spent
        delivered = 0
        with pytest.raises(openai.APIError) as ended:
            for chunk in c.chat.completions.create(model="tiny", messages=PROMPT, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    delivered += 1
        assert ended.value.code == "budget_exceeded"
        assert delivered == 20  # exactly what the remaining 0.02 pays for
    finally:
        sim_control(sim, default_max_tokens=32)
    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=1)
    assert refused.value.code == "budget_exceeded"
    assert "daily budget of this key (0.05 USD)" in refused.value.message
    assert refused.value.response.headers["retry-after"].isdigit()

    def mine() -> list[dict[str, Any]]:
        return [a for a in webhook.received if a.get("key_id") == key["id"]]

    wait_until(lambda: len(mine()) >= 3, what="three budget alerts")
    with pytest.raises(openai.RateLimitError):  # refused again: no spend, no new alert
        c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=1)
    row = recorded(gw, key["id"], 4)
    assert row["completion_tokens"] == 50 and row["cost"] == pytest.approx(0.05)
    alerts = mine()
    assert sorted(a["threshold"] for a in alerts) == [0.5, 0.8, 1.0]
    assert all(a["subject"] == "key" and a["period"] == "day" and a["currency"] == "USD" for a in alerts)


def test_usage_report_json_table_and_cli(gw: Proc, module_tmp: Path) -> None:
    key = create_key(gw, user="reporter")
    for _ in range(3):
        openai_client(gw, key["key"]).chat.completions.create(model="tiny", messages=PROMPT, max_tokens=2)
    recorded(gw, key["id"], 3)
    status, body = http_get(gw.url + "/admin/usage?group_by=user,model&user=reporter")
    report = orjson.loads(body)
    assert status == 200 and report["group_by"] == ["user", "model"]
    assert [(r["user"], r["model"], r["requests"]) for r in report["data"]] == [("reporter", "tiny", 3)]
    status, table = http_get(gw.url + "/admin/usage?group_by=day,user&user=reporter&format=table")
    assert status == 200 and b"reporter" in table and b"total" in table
    assert http_get(gw.url + "/admin/usage?group_by=colour")[0] == 400
    # A key without usage:read is refused.
    plain = create_key(gw)
    assert http_get(gw.url + "/admin/usage", headers={"authorization": f"Bearer {plain['key']}"})[0] == 403

    cfg_path = module_tmp / f"cli-{key['id']}.yaml"
    cfg_path.write_text(yaml.safe_dump(gw.config))  # type: ignore[attr-defined]
    cli = [sys.executable, "-m", "portcullis", "usage", "--config", str(cfg_path), "--user", "reporter"]
    out = subprocess.run([*cli, "--by", "user", "--json"], capture_output=True, text=True, check=True).stdout
    assert orjson.loads(out)["data"][0]["requests"] == 3
    out = subprocess.run([*cli, "--by", "key,model"], capture_output=True, text=True, check=True).stdout
    assert key["id"] in out and "tiny" in out and "total" in out


def test_key_limits_and_budget_are_validated_by_the_api_and_the_cli(gw: Proc, module_tmp: Path) -> None:
    from procs import KEY_SECRET, http_post

    status, body = http_post(
        gw.url + "/admin/keys", {"user": "v", "tier": "free", "limits": {"requests": {"minit": 5}}}
    )
    error = orjson.loads(body)["error"]
    assert status == 400 and error["param"] == "limits.requests.minit"
    status, body = http_post(gw.url + "/admin/keys", {"user": "v", "tier": "free", "budget": {"day": -1}})
    assert status == 400 and orjson.loads(body)["error"]["param"] == "budget.day"

    cfg_path = module_tmp / "cli-keys.yaml"
    cfg_path.write_text(yaml.safe_dump(gw.config))  # type: ignore[attr-defined]
    env = {"PORTCULLIS_KEY_SECRET": KEY_SECRET, "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "portcullis", "keys", "create", "--config", str(cfg_path), "--user", "cli", "--json"]
    bad = subprocess.run(
        [*cli, "--tier", "free", "--limits", '{"tokens": {"minute": 0}}'], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1 and "--limits: tokens.minute" in bad.stderr
    good = subprocess.run(
        [*cli, "--tier", "enterprise", "--limits", '{"requests": {"minute": 2}}', "--budget", '{"month": 3}'],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    made = orjson.loads(good.stdout)
    assert made["limits"] == {"requests": {"minute": 2}} and made["budget"] == {"month": 3.0}
    c = openai_client(gw, made["key"])
    c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=1)
    c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=1)
