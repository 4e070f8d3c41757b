"""Issue 17, point 3: `POST /v1/moderations` is metered and bounded, attacked against a real gateway.

- a request of 500 inputs is refused before any moderator runs (it was 500 moderator calls);
- the caller's request and token limits apply (the endpoint had no quota at all);
- one request's guard-model calls never exceed the guard model's slots (they all went out at once,
  and the simulator queued the rest silently);
- four 1 MB inputs under the PII rules leave /healthz answering (the rules ran on the event loop: a text
  dense with addresses was quadratic, one such megabyte held the loop for minutes).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_post, new_key, sim_stats, start_gateway, start_sim

GUARD_SLOTS = 2
REQUESTS_PER_MINUTE = 3
TOKENS_PER_MINUTE = 2_000  # quota.chars_per_token is 4: 8,000 characters


@pytest.fixture(scope="module")
def guard(module_tmp: Path) -> Iterator[Proc]:
    # Every guard call holds one of its two slots for 100 ms: calls beyond them wait in the simulator's
    # silent queue, where `max_waiting` counts them.
    proc = start_sim(
        "--slots",
        str(GUARD_SLOTS),
        "--n-ctx",
        "32768",  # room for the long chat message below
        "--ttft-ms",
        "100",
        "--guard-trigger",
        "build a bomb=S9",
        log_dir=module_tmp,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(guard: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"guard": [guard.url]},
        server={"max_body_bytes": 8 << 20},  # four 1 MB inputs fit in one request
        resilience={"retries": 0, "breaker": {"failures": 1000}},
        moderation={
            "moderators": {
                "pii": {
                    "kind": "rules",
                    "pii": {"email": "redact", "phone": "redact", "card": "block", "iban": "redact"},
                    "keywords": [{"name": "secret_project", "words": ["project nightshade"]}],
                },
                "guard": {"kind": "guard_model", "model": "guard", "timeout_s": 10},
            },
            "input": ["pii"],
            "endpoint": ["pii"],
        },
        tiers={
            "enterprise": {"priority": 2},  # the bootstrap admin key's: no limits
            "metered": {
                "priority": 0,
                "limits": {"requests": {"minute": REQUESTS_PER_MINUTE}, "tokens": {"minute": TOKENS_PER_MINUTE}},
            },
        },
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def _moderate(gw: Proc, body: dict[str, Any], key: str = ADMIN_KEY, timeout: float = 30) -> tuple[int, Any, Any]:
    req = urllib.request.Request(
        gw.url + "/v1/moderations",
        data=orjson.dumps(body),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, orjson.loads(exc.read())


def test_a_request_of_too_many_inputs_is_refused_before_any_moderator_runs(gw: Proc) -> None:
    status, _, body = _moderate(gw, {"input": [f"text {i}" for i in range(500)]})
    assert status == 400, body
    assert body["error"]["code"] == "too_many_inputs" and body["error"]["param"] == "input"
    assert "at most 32" in body["error"]["message"]
    status, _, body = _moderate(gw, {"input": [f"text {i}" for i in range(32)]})
    assert status == 200 and len(body["results"]) == 32


def test_moderations_take_the_callers_request_and_token_limits(gw: Proc) -> None:
    key = new_key(gw, tier="metered")
    for _ in range(REQUESTS_PER_MINUTE):
        status, headers, body = _moderate(gw, {"input": "hello"}, key)
        assert status == 200, body
        assert headers["x-ratelimit-limit-requests"] == str(REQUESTS_PER_MINUTE)
    status, headers, body = _moderate(gw, {"input": "hello"}, key)
    assert status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded" and headers["retry-after"]

    # Tokens: estimated from the inputs (4 characters a token) and charged when the request is over.
    key = new_key(gw, tier="metered")
    status, _, body = _moderate(gw, {"input": ["x" * 9_000]}, key)  # 2,250 tokens: more than a whole minute
    assert status == 400 and body["error"]["code"] == "tokens_exceed_limit", body
    status, headers, body = _moderate(gw, {"input": ["x" * 3_000, "y" * 3_000]}, key)  # 1,500 tokens
    assert status == 200, body
    assert int(headers["x-ratelimit-remaining-tokens"]) <= TOKENS_PER_MINUTE - 1_500
    status, _, body = _moderate(gw, {"input": ["z" * 3_000]}, key)  # 750 more: past the minute's 2,000
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
    assert "tokens" in body["error"]["message"]


def test_a_request_of_many_inputs_sends_the_guard_no_more_calls_than_its_slots(gw: Proc, guard: Proc) -> None:
    before = sim_stats(guard)
    texts = [f"how do I build a bomb, variant {i}" if i % 4 == 0 else f"how do I bake bread, {i}" for i in range(24)]
    t0 = time.monotonic()
    status, _, body = _moderate(gw, {"input": texts, "model": "guard"})
    elapsed = time.monotonic() - t0
    assert status == 200, body
    assert [r["flagged"] for r in body["results"]] == [i % 4 == 0 for i in range(24)]
    assert body["results"][0]["categories"]["illicit/violent"] is True
    after = sim_stats(guard)
    assert after["guard_calls"] - before["guard_calls"] == 24
    # Two slots, each call 100 ms: never more than two at the guard, nothing in its silent queue.
    assert after["max_waiting"] == 0, after
    assert after["max_active"] <= GUARD_SLOTS
    assert elapsed >= 24 / GUARD_SLOTS * 0.1 * 0.9  # (it did wait for them: the bound is not by luck)


def _megabyte(i: int) -> str:
    if i == 3:  # an address every 7 characters: the dense input that made the rules quadratic
        return ("a@b.co " * 150_000)[:1_000_000]
    filler = "the quick brown fox jumps over the lazy dog and then some more prose follows here. " * 60
    block = filler + f" mail user{i}@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111. "
    return (block * (1_000_000 // len(block) + 1))[:1_000_000]


def test_four_megabyte_inputs_leave_the_event_loop_answering(gw: Proc) -> None:
    texts = [_megabyte(i) for i in range(4)]
    outcome: dict[str, Any] = {}

    def moderate() -> None:
        try:
            outcome["answer"] = _moderate(gw, {"input": texts}, timeout=120)
        except Exception as exc:  # the gateway killed at the test's end, on the build before
            outcome["error"] = exc

    worker = threading.Thread(target=moderate, daemon=True)
    worker.start()
    latencies: list[float] = []
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(gw.url + "/healthz", timeout=2) as resp:
                assert resp.status == 200
        except TimeoutError:
            pass  # (counted below as the 2 s it waited)
        latencies.append(time.perf_counter() - t0)
        if latencies[-1] >= 0.5:
            break  # already failed; do not wait for a stalled gateway
        time.sleep(0.02)
    worst = max(latencies)
    print(f"healthz: {len(latencies)} probes, worst {worst * 1000:.0f} ms")  # (the numbers the issue records)
    assert worst < 0.5, f"/healthz took {worst:.2f} s while the inputs were checked"
    worker.join(60)
    assert "answer" in outcome, outcome
    status, _, body = outcome["answer"]
    assert status == 200, body
    assert len(latencies) >= 5  # the probes ran while the inputs were being checked
    results = body["results"]
    assert all(r["flagged"] and r["categories"]["pii/email"] for r in results)
    assert all(r["categories"]["pii/card"] for r in results[:3])


def test_a_long_chat_message_is_still_checked_by_the_rules(gw: Proc) -> None:
    # (Not an attack: the input screen of chat requests takes the same worker-thread path for long texts.)
    padding = "plain words for padding. " * 500  # 2 x 12.5 KB: over the loop's share, checked on the worker
    chat = {"model": "guard", "max_tokens": 4, "messages": [{"role": "user", "content": ""}]}
    chat["messages"][0]["content"] = padding + "my card is 4111 1111 1111 1111" + padding
    status, raw = http_post(gw.url + "/v1/chat/completions", chat)
    assert status == 400 and orjson.loads(raw)["error"]["code"] == "content_policy_violation", raw
    chat["messages"][0]["content"] = padding + "write to bob@example.com" + padding
    status, raw = http_post(gw.url + "/v1/chat/completions", chat)
    assert status == 200, raw
