"""Issue 17 point 4: a cached or coalesced answer never skips the output moderation of whoever receives it.

The attack: one user holds two keys on two tiers. The free tier's output policy redacts e-mail addresses,
the enterprise tier has none. The simulator's answer carries an address. The enterprise key fills the
cache (or is still being answered when the free key asks the same thing); the free key must get the
redacted answer all the same: from the exact cache, from a streamed replay, from the semantic cache,
with `cache.scope: global` for another user, and when the two requests would be coalesced; and a gateway
whose moderation reads answers differently (how much text a remote moderator is shown, the windows a stream
is judged in) never serves the entries another's settings passed. Real gateway and simulator processes;
what reached the upstream is counted at the simulator.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from load import post_chat
from procs import Proc, gateway_config, new_key, sim_control, sim_stats, start_gateway, start_sim

EMAIL = "alice.jones@example.com"
REPLY = f"Write to {EMAIL} for the details of the plan."
REDACTED = "Write to [REDACTED:pii/email] for the details of the plan."


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    # One simulator answers the chat model (a fixed reply) and embeds conversations for the semantic cache
    # ("words": texts sharing most words are close).
    proc = start_sim("--slots", "8", "--embedding-mode", "words", "--embedding-dim", "256", log_dir=module_tmp)
    sim_control(proc, reply=REPLY)
    yield proc
    proc.stop()


def _config(sim: Proc, moderation: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    return gateway_config(
        {"m": [sim.url], "emb": [sim.url]},
        moderation={"moderators": {"pii": {"kind": "rules", "pii": {"email": "redact"}}}, **(moderation or {})},
        tiers={
            "free": {"priority": 0, "moderation": {"output": ["pii"]}},
            "enterprise": {"priority": 2},  # trusted: no output moderation
        },
        **sections,
    )


@pytest.fixture(scope="module")
def tenant_gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = _config(sim, cache={"semantic": {"enabled": True, "model": "emb", "threshold": 0.9}})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def global_gw(sim: Proc, module_tmp: Path, redis_url: str) -> Iterator[Proc]:
    # The shared store too: the entries outlive a gateway process, so the policy must be in the key itself.
    cfg = _config(sim, cache={"scope": "global", "backend": "redis"}, store={"redis_url": redis_url})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def _ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 64, "temperature": 0, **extra}


def _text(answer: Any) -> str:
    return answer["choices"][0]["message"]["content"]


def _streamed_text(raw: bytes) -> str:
    chunks = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def _upstream(sim: Proc) -> int:
    return sim_stats(sim)["requests"]


def test_a_free_key_never_gets_the_answer_its_users_enterprise_key_cached(tenant_gw: Proc, sim: Proc) -> None:
    user = f"u-{secrets.token_hex(4)}"
    enterprise, free = new_key(tenant_gw, user=user, tier="enterprise"), new_key(tenant_gw, user=user, tier="free")
    payload = _ask(f"who do I write to about plan {secrets.token_hex(4)}")
    before = _upstream(sim)

    status, headers, answer = post_chat(tenant_gw.url, payload, enterprise)
    assert (status, headers["x-portcullis-cache"], _text(answer)) == (200, "miss", REPLY)

    status, headers, answer = post_chat(tenant_gw.url, payload, free)
    assert status == 200 and EMAIL not in _text(answer), f"the free key got {headers['x-portcullis-cache']}"
    assert _text(answer) == REDACTED and headers["x-portcullis-cache"] == "miss"
    # A streamed replay to the free key is the free tier's own entry, redacted.
    status, headers, raw = post_chat(tenant_gw.url, {**payload, "stream": True}, free)
    assert status == 200 and EMAIL.encode() not in raw and _streamed_text(raw) == REDACTED
    assert headers["x-portcullis-cache"] == "hit"
    # The enterprise key still hits its own (unredacted) entry: the cache keeps working within a policy.
    status, headers, answer = post_chat(tenant_gw.url, payload, enterprise)
    assert (status, headers["x-portcullis-cache"], _text(answer)) == (200, "hit", REPLY)
    assert _upstream(sim) == before + 2  # one upstream answer per output policy


def test_the_semantic_cache_keeps_output_policies_apart(tenant_gw: Proc, sim: Proc) -> None:
    user = f"u-{secrets.token_hex(4)}"
    enterprise, free = new_key(tenant_gw, user=user, tier="enterprise"), new_key(tenant_gw, user=user, tier="free")
    topic = secrets.token_hex(3)
    assert (
        post_chat(tenant_gw.url, _ask(f"who is the contact person for {topic} today"), enterprise)[1][
            "x-portcullis-cache"
        ]
        == "miss"
    )
    near = _ask(f"Who is the contact person for {topic} today please")
    status, headers, answer = post_chat(tenant_gw.url, near, free)
    assert status == 200 and EMAIL not in _text(answer), f"the free key got {headers['x-portcullis-cache']}"
    assert _text(answer) == REDACTED
    # The same near-duplicate from the enterprise key is still a semantic hit (its own policy's family).
    assert post_chat(tenant_gw.url, near, enterprise)[1]["x-portcullis-cache"] == "semantic-hit"


def test_with_a_global_scope_another_users_free_key_gets_it_redacted(global_gw: Proc, sim: Proc) -> None:
    tag = secrets.token_hex(4)
    alice = new_key(global_gw, user=f"alice-{tag}", tier="enterprise")
    bob_free, carol = (
        new_key(global_gw, user=f"bob-{tag}", tier="free"),
        new_key(global_gw, user=f"carol-{tag}", tier="enterprise"),
    )
    payload = _ask(f"who do I write to about plan {tag}")
    before = _upstream(sim)
    assert _text(post_chat(global_gw.url, payload, alice)[2]) == REPLY

    status, headers, answer = post_chat(global_gw.url, payload, bob_free)
    assert status == 200 and EMAIL not in _text(answer), f"another user's free key got {headers['x-portcullis-cache']}"
    assert _text(answer) == REDACTED
    status, _, raw = post_chat(global_gw.url, {**payload, "stream": True}, bob_free)
    assert status == 200 and EMAIL.encode() not in raw and _streamed_text(raw) == REDACTED
    # A global scope still shares within a policy: another enterprise user gets Alice's entry.
    status, headers, answer = post_chat(global_gw.url, payload, carol)
    assert (status, headers["x-portcullis-cache"], _text(answer)) == (200, "hit", REPLY)
    assert _upstream(sim) == before + 2


@pytest.mark.parametrize(
    ("setting", "value"),
    [("max_chars", 1000), ("stream_window_chars", 400), ("stream_context_chars", 10)],
)
def test_moderation_settings_are_part_of_the_output_policy(
    global_gw: Proc, sim: Proc, module_tmp: Path, redis_url: str, setting: str, value: int
) -> None:
    # Two gateways sharing one Redis cache with the same moderators, differing in one setting that changes
    # what text the moderators judge: the second must not serve what the first's settings let through.
    cfg = _config(sim, {setting: value}, cache={"scope": "global", "backend": "redis"}, store={"redis_url": redis_url})
    other = start_gateway(cfg, module_tmp, ready_path="/readyz")
    try:
        tag = secrets.token_hex(4)
        payload = _ask(f"who do I write to about plan {tag}")
        before = _upstream(sim)
        status, headers, answer = post_chat(global_gw.url, payload, new_key(global_gw, user=f"a-{tag}", tier="free"))
        assert (status, headers["x-portcullis-cache"], _text(answer)) == (200, "miss", REDACTED)
        key = new_key(other, user=f"b-{tag}", tier="free")
        status, headers, answer = post_chat(other.url, payload, key)
        assert status == 200 and headers["x-portcullis-cache"] == "miss", (
            f"{setting}={value} was served the entry judged under the default: {headers['x-portcullis-cache']}"
        )
        # Within its own settings the cache still shares.
        assert post_chat(other.url, payload, key)[1]["x-portcullis-cache"] == "hit"
        assert _upstream(sim) == before + 2
    finally:
        other.stop()


def test_a_free_request_is_never_coalesced_onto_an_enterprise_answer(tenant_gw: Proc, sim: Proc) -> None:
    user = f"u-{secrets.token_hex(4)}"
    enterprise, free = new_key(tenant_gw, user=user, tier="enterprise"), new_key(tenant_gw, user=user, tier="free")
    payload = _ask(f"who do I write to about plan {secrets.token_hex(4)}")

    async def run() -> tuple[bytes, tuple[int, str, Any]]:
        async with aiohttp.ClientSession() as s:
            # The enterprise request leads: its stream (not moderated) shows it is under way upstream, and
            # the rest of its answer takes about a second more, so the free request arrives while it is.
            async with s.post(
                tenant_gw.url + "/v1/chat/completions",
                data=orjson.dumps({**payload, "stream": True}),
                headers={"authorization": f"Bearer {enterprise}"},
            ) as lead:
                assert lead.status == 200 and lead.headers["x-portcullis-cache"] == "miss"
                first = await lead.content.readuntil(b"\n\n")
                assert first.startswith(b"data: {")
                async with s.post(
                    tenant_gw.url + "/v1/chat/completions",
                    data=orjson.dumps(payload),
                    headers={"authorization": f"Bearer {free}"},
                ) as follower:
                    got = (follower.status, follower.headers["x-portcullis-cache"], orjson.loads(await follower.read()))
                rest = await lead.read()
                assert rest.endswith(b"data: [DONE]\n\n")
                return first + rest, got

    sim_control(sim, tokens_per_s=10)  # the 10-word reply takes about a second
    try:
        before = _upstream(sim)
        lead_raw, (status, how, answer) = asyncio.run(run())
    finally:
        sim_control(sim, tokens_per_s=0)
    assert _streamed_text(lead_raw) == REPLY
    assert status == 200 and EMAIL not in _text(answer), f"the free request was served as {how}"
    assert _text(answer) == REDACTED and how == "miss"
    assert _upstream(sim) == before + 2


def test_an_answer_a_moderator_let_through_unjudged_is_never_cached(sim: Proc, module_tmp: Path) -> None:
    """A fail_open output moderator that cannot answer lets the answer out unjudged; cached, that answer would
    be handed to everyone under the policy for the cache's TTL without a verdict. It is not stored."""
    judge = start_sim("--moderation-delay-ms", "3000", log_dir=module_tmp)  # never answers within timeout_s
    cfg = gateway_config(
        {"m": [sim.url]},
        moderation={
            "moderators": {
                "slow": {"kind": "openai_moderation", "url": judge.url, "timeout_s": 0.2, "on_error": "fail_open"}
            }
        },
        tiers={"free": {"priority": 0, "moderation": {"output": ["slow"]}}},
    )
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    try:
        key = new_key(gw, tier="free")
        payload = _ask(f"an unjudged answer {secrets.token_hex(4)}")
        before = _upstream(sim)
        for _ in range(2):
            status, headers, answer = post_chat(gw.url, payload, key)
            assert (status, headers["x-portcullis-cache"], _text(answer)) == (200, "miss", REPLY)
        assert _upstream(sim) == before + 2  # the second went upstream (and was judged again) too
    finally:
        gw.stop()
        judge.stop()
