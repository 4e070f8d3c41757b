"""Routing seen from a client: a cost-aware router, aliases, the client's constraints, context fit with
the upstream's /tokenize, spilling to a fallback on overload and on failure, low-priority requests, and
the operator's views (/admin/models, /admin/route). Real gateway and simulator processes; which upstream
served what is counted at the simulators.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from load import call, chat_body, post_chat
from procs import (
    ADMIN_KEY,
    Proc,
    gateway_config,
    http_get,
    http_post,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
)

SMALL_COST = {"prompt_per_1k": 0.01, "completion_per_1k": 0.02}
LARGE_COST = {"prompt_per_1k": 0.1, "completion_per_1k": 0.2}
SIMPLE = "Hi! What's the capital of France?"
HARD = (
    "Prove step by step that the derivative of x^3 is 3x^2, then design and explain why this code is slow:\n"
    "```python\ndef f(xs):\n    return [x for x in xs]\n```"
)


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[dict[str, Proc]]:
    procs = {
        "small": start_sim("--slots", "2", "--n-ctx", "512", "--tokens-per-s", "400", log_dir=module_tmp),
        "large": start_sim("--slots", "4", "--n-ctx", "8192", "--tokens-per-s", "400", log_dir=module_tmp),
        "primary": start_sim("--slots", "1", "--tokens-per-s", "20", log_dir=module_tmp),
    }
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def gw(sims: dict[str, Proc], module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {
            "small": [
                {"url": sims["small"].url, "name": "s", "cost": {"prompt_per_1k": 0.01, "completion_per_1k": 0.02}}
            ],
            "large": [
                {"url": sims["large"].url, "name": "l", "cost": {"prompt_per_1k": 0.1, "completion_per_1k": 0.2}}
            ],
            # One model on both: a replica with a 512-token context and one with 8192.
            "mixed": [{"url": sims["small"].url, "name": "s"}, {"url": sims["large"].url, "name": "l"}],
            "primary": [{"url": sims["primary"].url, "name": "p"}],
            "single": [{"url": sims["primary"].url, "name": "p"}],
        },
        routers={"auto": {"candidates": ["small", "large"], "aliases": ["smart"]}},
        resilience={"retries": 2, "backoff": {"base_s": 0.01, "max_s": 0.1}, "breaker": {"failures": 1000}},
        admission={"max_wait_s": 5},
    )
    cfg["models"]["small"]["quality"] = 0.3
    cfg["models"]["small"]["aliases"] = ["tiny"]
    cfg["models"]["small"]["fallbacks"] = ["large"]
    cfg["models"]["large"]["quality"] = 0.9
    cfg["models"]["primary"]["fallbacks"] = ["large"]
    cfg["models"]["primary"]["spill_to_fallbacks"] = True
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def _requests(sim: Proc) -> int:
    return sim_stats(sim)["requests"]


def test_the_router_sends_simple_requests_to_the_cheap_model_and_hard_ones_to_the_capable(
    client: openai.OpenAI, sims: dict[str, Proc]
) -> None:
    before = {name: _requests(s) for name, s in sims.items()}
    easy = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": SIMPLE}], max_tokens=8
    )
    route = easy.headers["x-portcullis-route"]
    assert route.startswith("model=small; router=auto; complexity=") and "reason=cheapest covering" in route
    assert easy.parse().model == "small"
    hard = client.chat.completions.with_raw_response.create(
        model="smart",
        messages=[{"role": "user", "content": HARD}],
        max_tokens=8,  # (the router's alias)
    )
    assert hard.headers["x-portcullis-route"].startswith("model=large; router=auto")
    assert hard.parse().model == "large"
    assert _requests(sims["small"]) == before["small"] + 1
    assert _requests(sims["large"]) == before["large"] + 1


def test_the_clients_cost_cap_and_latency_budget(gw: Proc, sims: dict[str, Proc]) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": HARD}], "max_tokens": 100}
    # Large would cost ~0.02 here; a cap of 0.005 leaves small, which is below the request's complexity.
    status, headers, answer = post_chat(gw.url, body, **{"x-portcullis-max-cost": "0.005"})
    assert status == 200 and answer["model"] == "small"
    assert "no candidate covers complexity" in headers["x-portcullis-route"]
    # The same as a body field, which never reaches the upstream.
    sim_control(sims["small"], echo_request=True)
    try:
        status, headers, answer = post_chat(gw.url, {**body, "portcullis": {"max_cost": 0.005}})
        assert status == 200 and answer["model"] == "small"
        assert "portcullis" not in answer["sim_request"]
    finally:
        sim_control(sims["small"], echo_request=False)
    status, _, answer = post_chat(gw.url, body, **{"x-portcullis-max-cost": "0.0000001"})
    assert status == 400 and answer["error"]["code"] == "max_cost_exceeded"
    status, _, answer = post_chat(gw.url, body, **{"x-portcullis-latency-budget-ms": "soon"})
    assert status == 400 and answer["error"]["param"] == "x-portcullis-latency-budget-ms"


def test_models_lists_models_routers_and_aliases(client: openai.OpenAI, gw: Proc) -> None:
    listed = {m.id: m.model_extra.get("portcullis") for m in client.models.list()}
    assert listed["auto"] == {"kind": "router", "candidates": ["small", "large"]}
    assert listed["smart"] == {"kind": "alias", "of": "auto"}
    assert listed["tiny"] == {"kind": "alias", "of": "small"}
    assert listed["small"] == {"kind": "model"}
    assert client.models.retrieve("tiny").model_extra["portcullis"]["of"] == "small"
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.model == "small"


def test_a_request_goes_only_to_a_replica_whose_context_holds_it(gw: Proc, sims: dict[str, Proc]) -> None:
    """`mixed` has a 512-token and an 8192-token replica. A prompt of 300 one-letter words estimates at
    ~160 tokens from its characters but is ~311 by the model's tokenizer: with max_tokens 300 it does not
    fit 512. The gateway asks /tokenize, and sends it (every time) to the large replica only."""
    before = {name: _requests(s) for name, s in sims.items()}
    body = {"model": "mixed", "messages": [{"role": "user", "content": "a " * 300}], "max_tokens": 300}
    for _ in range(6):
        status, _, answer = post_chat(gw.url, body)
        assert status == 200, answer
    assert _requests(sims["small"]) == before["small"]
    assert _requests(sims["large"]) == before["large"] + 6
    # A short request may go to either replica (both hold it).
    for _ in range(8):
        assert post_chat(gw.url, {**body, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})[0] == 200
    assert _requests(sims["small"]) > before["small"]


def test_a_request_no_replica_can_hold_is_refused_before_any_upstream_call(gw: Proc, sims: dict[str, Proc]) -> None:
    before = {name: _requests(s) for name, s in sims.items()}
    body = {"model": "mixed", "messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 10}
    status, _, answer = post_chat(gw.url, body)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert "8192" in answer["error"]["message"]
    routed = {**body, "model": "auto"}
    status, _, answer = post_chat(gw.url, routed)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert {name: _requests(s) for name, s in sims.items()} == before


def test_a_router_skips_a_candidate_whose_context_is_too_small(gw: Proc) -> None:
    # ~1,100 tokens: more than small's 512, so even a simple request goes to large.
    status, headers, answer = post_chat(
        gw.url, {"model": "auto", "messages": [{"role": "user", "content": "hello there " * 370}], "max_tokens": 4}
    )
    assert status == 200 and answer["model"] == "large"
    assert headers["x-portcullis-route"].startswith("model=large")


def test_a_full_model_spills_to_its_fallback_instead_of_queueing(gw: Proc, sims: dict[str, Proc]) -> None:
    """`primary` has one slot (and answers slowly); with spill_to_fallbacks, requests that would queue go
    to `large` at once, and say so."""
    before = _requests(sims["primary"])

    async def run() -> list[Any]:
        async with aiohttp.ClientSession() as s:
            return list(
                await asyncio.gather(*(call(s, gw.url, chat_body(model="primary", max_tokens=20)) for _ in range(4)))
            )

    results = asyncio.run(run())
    assert all(r.status == 200 for r in results)
    served = sorted(r.body["model"] for r in results)
    assert served.count("primary") >= 1 and served.count("large") >= 2
    spilled = [r for r in results if r.body["model"] == "large"]
    assert all(r.headers["x-portcullis-route"].startswith("model=large; reason=primary full") for r in spilled)
    assert all(int(r.headers.get("x-portcullis-queue-wait-ms", "0")) == 0 for r in spilled)
    assert _requests(sims["primary"]) - before == served.count("primary")


def test_a_routed_request_fails_over_to_the_chosen_models_fallback(gw: Proc, sims: dict[str, Proc]) -> None:
    sim_control(sims["small"], fail_next=5, fail_status=503)
    try:
        status, headers, answer = post_chat(gw.url, chat_body(model="auto", text=SIMPLE))
        assert status == 200 and answer["model"] == "large"  # small was chosen; its replica failed
        assert headers["x-portcullis-route"].startswith("model=small")
        assert int(headers["x-portcullis-attempts"]) >= 2
    finally:
        sim_control(sims["small"], fail_next=0)


def test_low_priority_requests_queue_behind_every_tier(gw: Proc, sims: dict[str, Proc]) -> None:
    """`single`'s one slot is taken; a low-priority request arrives first, a normal one after: the normal
    one is served first."""

    async def run() -> dict[str, float]:
        done: dict[str, float] = {}
        async with aiohttp.ClientSession() as s:

            async def send(name: str, delay: float, headers: dict[str, str], tokens: int) -> None:
                await asyncio.sleep(delay)
                async with s.post(
                    gw.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body(model="single", max_tokens=tokens)),
                    headers={"authorization": f"Bearer {ADMIN_KEY}", **headers},
                ) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                    done[name] = time.monotonic()

            await asyncio.gather(
                send("holder", 0.0, {}, 10),
                send("low", 0.1, {"x-portcullis-priority": "low"}, 2),
                send("normal", 0.2, {}, 2),
            )
        return done

    done = asyncio.run(run())
    assert done["holder"] < done["normal"] < done["low"]


@pytest.fixture(scope="module")
def solo_gw(sims: dict[str, Proc], module_tmp: Path) -> Iterator[Proc]:
    """A gateway whose only off-peak window starts two hours from now, refusing low priority in peak."""
    now = time.gmtime()
    start = (now.tm_hour + 2) % 24
    window = {"days": "daily", "from": f"{start:02d}:00", "to": f"{(start + 1) % 24:02d}:00", "tz": "UTC"}
    cfg = gateway_config(
        {"solo": [sims["primary"].url]},
        scheduling={"off_peak": [window], "low_priority": {"in_peak": "refuse"}},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def test_low_priority_in_peak_is_told_when_off_peak_starts(solo_gw: Proc) -> None:
    body = chat_body(model="solo")
    status, headers, answer = post_chat(solo_gw.url, body, **{"x-portcullis-priority": "low"})
    assert status == 503 and answer["error"]["code"] == "off_peak_only"
    now = time.gmtime()
    until = ((now.tm_hour + 2) % 24 - now.tm_hour) % 24 * 3600 - now.tm_min * 60 - now.tm_sec
    assert abs(int(headers["retry-after"]) - until) <= 5
    assert post_chat(solo_gw.url, body)[0] == 200  # normal priority is served


def test_admin_models_and_route_explain(gw: Proc) -> None:
    status, raw = http_get(gw.url + "/admin/models")
    assert status == 200
    models = {m["model"]: m for m in orjson.loads(raw)["data"]}
    assert models["auto"]["kind"] == "router" and models["auto"]["candidates"] == ["small", "large"]
    mixed = models["mixed"]["deployments"]
    assert sorted(d["n_ctx"] for d in mixed) == [512, 8192] and all(d["n_ctx_source"] == "upstream" for d in mixed)
    small = models["small"]
    assert small["aliases"] == ["tiny"] and small["deployments"][0]["cost"]["basis"] == "configured"
    assert small["deployments"][0]["observed"]["stream_tokens_per_s"] > 0  # it has answered by now
    status, raw = http_post(gw.url + "/admin/route", {"model": "auto", "messages": [{"role": "user", "content": HARD}]})
    assert status == 200
    explained = orjson.loads(raw)
    assert explained["model"] == "large" and explained["replica"] == "l" and explained["router"] == "auto"
    assert [c["model"] for c in explained["candidates"]] == ["small", "large"]
    assert explained["header"].startswith("model=large; router=auto")
    # Needs admin:read.
    status, raw = http_post(gw.url + "/admin/keys", {"user": "dev", "tier": "free", "scopes": ["chat:write"]})
    key = orjson.loads(raw)["key"]
    status, _ = http_get(gw.url + "/admin/models", headers={"authorization": f"Bearer {key}"})
    assert status == 403


def test_route_decisions_are_counted(gw: Proc) -> None:
    _, raw = http_get(gw.url + "/metrics")
    text = raw.decode()
    assert 'portcullis_route_decisions_total{model="small",router="auto"}' in text
    assert 'portcullis_route_decisions_total{model="large",router="auto"}' in text
