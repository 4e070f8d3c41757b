"""Every line logged on a request's path carries the request's id, key id and model (bound once per request,
obs/logging.py); a line logged outside any request carries none of them. A real gateway and simulator on
loopback ports, with warnings provoked deterministically: a flagged keyword, a moderator that cannot be
reached (fail_open), a budget crossed, an upstream 502 that opens the breaker. The three requests share one
keep-alive connection, so a field left over from the previous request would show.
"""

from __future__ import annotations

import asyncio
import contextvars
import http.client
from pathlib import Path
from typing import Any

import orjson
import structlog
from procs import free_port, gateway_config, http_post, sim_control, start_gateway, start_sim, wait_until

from portcullis.obs import logging as obs_logging

FIELDS = ("request_id", "key_id", "model")
# Lines the request path logs in this test, and which request logs which.
WATCHED = {"moderation_violation", "moderator_failed", "budget_alert", "breaker"}
EXPECTED = {
    "logctx-flagged": {"moderation_violation", "moderator_failed"},
    "logctx-budget": {"moderator_failed", "budget_alert"},
    "logctx-breaker": {"moderator_failed", "breaker"},
}


def _lines(log: str) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in log.splitlines() if x.startswith("{")]


def _key(gw_url: str, **spec: Any) -> dict[str, Any]:
    status, raw = http_post(gw_url + "/admin/keys", {"user": "logctx", "tier": "t", **spec})
    assert status == 201, raw
    return orjson.loads(raw)


def test_request_path_lines_carry_request_key_and_model(tmp_path: Path) -> None:
    sim = start_sim(log_dir=tmp_path)
    cfg = gateway_config(
        {"m": [{"url": sim.url, "name": "a", "cost": {"prompt_per_1k": 0.0, "completion_per_1k": 1.0}}]},
        resilience={"retries": 0, "breaker": {"failures": 1, "window_s": 60, "open_s": 60}},
        cache={"enabled": False},
        tiers={"t": {"priority": 0}},
        moderation={
            "moderators": {
                "words": {
                    "kind": "rules",
                    "keywords": [{"name": "codename", "words": ["project nightshade"], "action": "flag"}],
                },
                # Nothing listens there: refused at once, and fail_open lets the request go on.
                "down": {
                    "kind": "openai_moderation",
                    "url": f"http://127.0.0.1:{free_port()}",
                    "timeout_s": 2,
                    "on_error": "fail_open",
                },
            },
            "input": ["words", "down"],
        },
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        keys = {rid: _key(gw.url) for rid in EXPECTED}
        keys["logctx-budget"] = _key(gw.url, budget={"day": 0.01})  # 8 completion tokens at 1.0 per 1k: 80 %
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)  # one keep-alive connection for all

        def chat(rid: str, text: str) -> int:
            body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
            headers = {"authorization": f"Bearer {keys[rid]['key']}", "x-request-id": rid}
            conn.request("POST", "/v1/chat/completions", orjson.dumps(body), headers)
            response = conn.getresponse()
            response.read()
            assert response.getheader("connection") != "close"
            return response.status

        try:
            assert chat("logctx-flagged", "Tell me about project nightshade") == 200
            assert chat("logctx-budget", "Count the sheep in the field") == 200
            sim_control(sim, fail_next=1, fail_status=502)
            assert chat("logctx-breaker", "Count the cows") == 502
        finally:
            conn.close()

        def seen() -> set[tuple[str, str]]:
            return {(x.get("request_id"), x["event"]) for x in _lines(gw.log()) if x.get("event") in WATCHED}

        def all_logged() -> bool:
            access = {x["request_id"] for x in _lines(gw.log()) if x.get("event") == "request"}
            # Waits for the lines by event name, so that before the change (no request_id on them) it fails below.
            events = {event for _, event in seen()}
            return access >= set(EXPECTED) and events >= WATCHED

        wait_until(all_logged, timeout=10, what="the requests' access lines and warnings")
        lines = _lines(gw.log())
        for rid, key in keys.items():
            access = next(x for x in lines if x.get("event") == "request" and x["request_id"] == rid)
            assert (access["key_id"], access["model"]) == (key["id"], "m")
        # (A breaker's later transitions are the prober's or another request's: only its opening is this one's.)
        watched = [x for x in lines if x.get("event") in WATCHED and x.get("new", "open") == "open"]
        for line in watched:
            rid = line.get("request_id")
            assert rid in keys, f"a request-path line without its request's id: {line}"
            assert (line.get("key_id"), line.get("model")) == (keys[rid]["id"], "m"), line
        for rid, events in EXPECTED.items():
            assert events <= {x["event"] for x in watched if x["request_id"] == rid}, (rid, watched)

        started = next(x for x in lines if x.get("event") == "started")
        assert not set(FIELDS) & started.keys(), started
    finally:
        gw.stop()
        sim.stop()


# -- the helpers, in one process ------------------------------------------------------------------------


def _fields() -> dict[str, Any]:
    ctx = structlog.contextvars.get_contextvars()
    return {k: ctx[k] for k in FIELDS if k in ctx}


class _Principal:
    key_id = "k1"


def test_bind_request_resets_what_an_inherited_context_held() -> None:
    def run() -> dict[str, Any]:
        obs_logging.bind_request("r1")
        obs_logging.bind_principal(_Principal())
        obs_logging.bind_model("m")
        assert _fields() == {"request_id": "r1", "key_id": "k1", "model": "m"}
        obs_logging.bind_request("r2")  # a pipelined request's task starts in a copy of r1's context
        return _fields()

    assert contextvars.Context().run(run) == {"request_id": "r2", "key_id": None, "model": None}
    assert _fields() == {}


def test_an_internal_request_leaves_its_callers_context_as_it_was() -> None:
    async def handle() -> str:
        obs_logging.bind_request("internal-1")
        obs_logging.bind_model("m")
        return "done"

    async def batch_line() -> tuple[dict[str, Any], dict[str, Any]]:
        structlog.contextvars.bind_contextvars(model="outer")
        assert await obs_logging.isolated(handle()) == "done"
        after = _fields()
        detached: dict[str, Any] = {}
        obs_logging.bind_request("r3")
        await asyncio.get_running_loop().create_task(_record(detached), context=obs_logging.detached())
        return after, detached

    after, detached = asyncio.run(batch_line())
    assert after == {"model": "outer"}  # the caller's own binding is back, the request's are gone
    assert detached == {}  # a long-lived task a request starts does not carry the request's fields


async def _record(into: dict[str, Any]) -> None:
    into.update(_fields())
