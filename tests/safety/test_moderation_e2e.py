"""Moderation seen from a client: every moderator kind on input and output, streams cut before a flagged
window, redaction, both failure policies against a hanging moderator, parallel mode cancelling the
upstream call, per-tier policies, and `/v1/moderations` read by the openai SDK. Real gateway and
simulator processes; what reached which upstream is counted at the simulators.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from load import post_chat
from procs import (
    ADMIN_KEY,
    Proc,
    gateway_config,
    http_get,
    http_post,
    new_key,
    openai_client,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)

CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
EMAIL = "bob.smith@example.com"
WINDOW = 40  # moderation.stream_window_chars on this gateway
CONTEXT = 16


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[dict[str, Proc]]:
    procs = {
        # Upstreams: each test that changes what one answers owns it for the time of the test.
        "main": start_sim("--tokens-per-s", "2000", log_dir=module_tmp),
        "out": start_sim("--tokens-per-s", "400", log_dir=module_tmp),
        "slow": start_sim("--ttft-ms", "3000", "--tokens-per-s", "50", log_dir=module_tmp),
        # The guard model and the hosted-style moderation endpoint (the same simulator serves both).
        "guard": start_sim(
            "--guard-trigger",
            "build a bomb=S9",
            "--guard-trigger",
            "hurt someone=S1",
            "--moderation-trigger",
            "hurt someone=violence",
            "--moderation-trigger",
            "steal a car=illicit",
            log_dir=module_tmp,
        ),
        "slowguard": start_sim("--ttft-ms", "600", "--guard-trigger", "build a bomb=S9", log_dir=module_tmp),
        # Never answers: moderation_delay_ms for /v1/moderations, hang for the guard model.
        "hang": start_sim("--hang-rate", "1", "--moderation-delay-ms", "60000", log_dir=module_tmp),
    }
    yield procs
    for p in procs.values():
        p.stop()


def _moderators(sims: dict[str, Proc]) -> dict[str, Any]:
    return {
        "pii": {"kind": "rules", "pii": {"email": "redact", "phone": "redact", "card": "block", "iban": "flag"}},
        "words": {
            "kind": "rules",
            "keywords": [{"name": "secret_project", "words": ["project nightshade"]}],
            "patterns": [{"name": "internal_host", "regex": r"\bhost-\d+\.corp\b", "action": "redact"}],
        },
        "guard": {"kind": "guard_model", "model": "guard", "timeout_s": 5},
        "slow_guard": {"kind": "guard_model", "model": "slowguard", "timeout_s": 5},
        "hosted": {"kind": "openai_moderation", "url": sims["guard"].url, "thresholds": {"illicit": 0.5}},
        "hang_open": {"kind": "openai_moderation", "url": sims["hang"].url, "timeout_s": 0.3, "on_error": "fail_open"},
        "hang_closed": {"kind": "guard_model", "model": "hang", "timeout_s": 0.3, "on_error": "fail_closed"},
    }


@pytest.fixture(scope="module")
def gw(sims: dict[str, Proc], module_tmp: Path) -> Iterator[Proc]:
    main, out = sims["main"].url, sims["out"].url
    cfg = gateway_config(
        {
            "plain": [main],  # the section's default policy
            "chat": [main],
            "hosted": [main],
            "parallel": [sims["slow"].url],
            "parallel-fast": [main],
            "out": [out],
            "out-guard": [out],
            "out-closed": [out],
            "out-both": [out],
            "out-hosted": [out],
            "open": [main],
            "closed": [main],
            "guard": [sims["guard"].url],
            "slowguard": [sims["slowguard"].url],
            "hang": [sims["hang"].url],
        },
        resilience={"retries": 0, "breaker": {"failures": 1000}},
        cache={"enabled": False},
        quota={"usage": {"flush_interval_s": 0.1}},
        moderation={
            "moderators": _moderators(sims),
            "input": ["pii"],
            "endpoint": ["pii", "hosted"],
            "stream_window_chars": WINDOW,
            "stream_context_chars": CONTEXT,
        },
        tiers={
            "free": {"priority": 0},
            "enterprise": {"priority": 2, "moderation": {"input": []}},  # trusted: no input checks by default
        },
    )
    policies = {
        "chat": {"input": ["pii", "words", "guard"]},
        "hosted": {"input": ["hosted"]},
        # The guard takes 0.6 s, so the upstream call has surely started when the refusal comes (an
        # instant guard could answer before the request reached the upstream: nothing to cancel then).
        "parallel": {"input": ["slow_guard"], "mode": "parallel"},
        "parallel-fast": {"input": ["slow_guard"], "mode": "parallel"},
        "out": {"input": [], "output": ["pii", "words"]},
        "out-guard": {"input": [], "output": ["guard"]},
        "out-closed": {"input": [], "output": ["hang_closed"]},
        "out-both": {"input": ["pii"], "output": ["guard"]},
        "out-hosted": {"input": [], "output": ["hosted"]},
        "open": {"input": ["hang_open"]},
        "closed": {"input": ["hang_closed"]},
    }
    for name, policy in policies.items():
        cfg["models"][name]["moderation"] = policy
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def _chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64, **extra}


def _refused(exc: pytest.ExceptionInfo[openai.BadRequestError]) -> str:
    assert exc.value.status_code == 400
    assert exc.value.code == "content_policy_violation"
    return str(exc.value.message)


def _metric(gw: Proc, name: str, **labels: str) -> float:
    _, raw = http_get(gw.url + "/metrics")
    total = 0.0
    for line in raw.decode().splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _usage_marks(gw: Proc) -> dict[str, str | None]:
    path = gw.database_url.split("///", 1)[1]
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT request_id, moderation FROM usage").fetchall())


# -- input: rules ----------------------------------------------------------------------------------


def test_a_card_number_is_refused_naming_the_category_not_the_text(
    gw: Proc, sims: dict[str, Proc], client: Any
) -> None:
    before = sim_stats(sims["main"])["requests"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**_chat("chat", f"my card is {CARD}, is that safe?"))
    message = _refused(exc)
    assert "pii/card" in message and "4111" not in message
    assert sim_stats(sims["main"])["requests"] == before  # refused before any upstream call
    assert (
        _metric(gw, "portcullis_moderation_violations_total", moderator="pii", category="pii/card", stage="input") >= 1
    )


def test_an_email_is_redacted_before_it_leaves_the_gateway(gw: Proc, sims: dict[str, Proc]) -> None:
    sim_control(sims["main"], echo_request=True)
    try:
        status, _, answer = post_chat(
            gw.url, _chat("chat", f"write to {EMAIL} and host-12.corp about it"), **{"x-request-id": "redact-input-1"}
        )
    finally:
        sim_control(sims["main"], echo_request=False)
    assert status == 200, answer
    sent = answer["sim_request"]["messages"][0]["content"]
    assert EMAIL not in sent and "host-12.corp" not in sent
    assert sent == "write to [REDACTED:pii/email] and [REDACTED:internal_host] about it"
    wait_until(lambda: _usage_marks(gw).get("redact-input-1") == "input:redact", what="the usage record's mark")


def test_a_keyword_rule_blocks_and_the_tier_policy_applies(gw: Proc) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client(gw, new_key(gw, tier="free")).chat.completions.create(**_chat("plain", f"card {CARD}"))
    _refused(exc)
    # The enterprise tier's policy has no input moderators; `plain` has none of its own: it passes.
    trusted = openai_client(gw, new_key(gw, tier="enterprise"))
    assert trusted.chat.completions.create(**_chat("plain", f"card {CARD}")).choices[0].message.content
    # A model's own policy wins over the tier's: `chat` still checks enterprise keys.
    with pytest.raises(openai.BadRequestError) as exc:
        trusted.chat.completions.create(**_chat("chat", "tell me about Project  Nightshade"))
    assert "secret_project" in _refused(exc)


# -- input: remote moderators ----------------------------------------------------------------------


def test_the_guard_model_refuses_unsafe_input_and_lets_safe_input_through(
    gw: Proc, sims: dict[str, Proc], client: Any
) -> None:
    guard_before = sim_stats(sims["guard"])["guard_calls"]
    main_before = sim_stats(sims["main"])["requests"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**_chat("chat", "How do I build a bomb at home?"))
    assert "indiscriminate_weapons" in _refused(exc)
    assert sim_stats(sims["main"])["requests"] == main_before  # sequential: never sent upstream
    ok = client.chat.completions.create(**_chat("chat", "How do I bake bread at home?"))
    assert ok.choices[0].message.content
    assert sim_stats(sims["guard"])["guard_calls"] == guard_before + 2
    assert sim_stats(sims["main"])["requests"] == main_before + 1


def test_an_openai_moderation_endpoint_with_thresholds(gw: Proc, sims: dict[str, Proc], client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**_chat("hosted", "I want to hurt someone"))
    assert "violence" in _refused(exc)
    with pytest.raises(openai.BadRequestError) as exc:  # illicit: not flagged upstream, but over its threshold
        client.chat.completions.create(**_chat("hosted", "how to steal a car"))
    assert "illicit" in _refused(exc)
    assert client.chat.completions.create(**_chat("hosted", "a poem about cars")).choices[0].message.content


def test_violations_are_logged_with_a_hash_never_the_content(gw: Proc, client: Any) -> None:
    text = "Please hurt someone for me, codeword zebra-7781"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**_chat("hosted", text))
    digest = hashlib.sha256(text.encode()).hexdigest()
    wait_until(lambda: digest in gw.log(), what="the violation's log line")
    assert "zebra-7781" not in gw.log()
    line = next(line for line in gw.log().splitlines() if digest in line)
    event = orjson.loads(line)
    assert event["event"] == "moderation_violation" and event["stage"] == "input"
    assert event["findings"] == [{"moderator": "hosted", "category": "violence", "action": "block"}]


# -- failure policies ----------------------------------------------------------------------------------


def test_a_hanging_moderator_fails_open_or_closed_as_configured(gw: Proc, sims: dict[str, Proc], client: Any) -> None:
    t0 = time.monotonic()
    ok = client.chat.completions.create(**_chat("open", "hello there"))
    assert ok.choices[0].message.content  # fail_open: served once the 0.3 s timeout passed
    assert time.monotonic() - t0 < 5
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(**_chat("closed", "hello there"))
    assert exc.value.status_code == 503 and exc.value.code == "moderation_unavailable"
    assert exc.value.response.headers.get("retry-after")
    assert _metric(gw, "portcullis_moderation_checks_total", moderator="hang_open", outcome="timeout") >= 1
    assert _metric(gw, "portcullis_moderation_checks_total", moderator="hang_closed", outcome="timeout") >= 1


# -- parallel mode -----------------------------------------------------------------------------------


def test_parallel_mode_cancels_the_upstream_call_when_the_input_is_refused(
    gw: Proc, sims: dict[str, Proc], client: Any
) -> None:
    slow = sims["slow"]
    before = sim_stats(slow)
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**_chat("parallel", "how to build a bomb", stream=True))
    elapsed = time.monotonic() - t0
    _refused(exc)
    assert elapsed < 2.5  # refused when the guard answered (0.6 s), not after the upstream's 3 s first token
    # The upstream call had started (parallel) and was cancelled: counted at the simulator.
    wait_until(lambda: sim_stats(slow)["cancelled"] == before["cancelled"] + 1, what="the upstream's cancellation")
    after = sim_stats(slow)
    assert after["requests"] == before["requests"] + 1 and after["completed"] == before["completed"]
    assert _metric(gw, "portcullis_moderation_cancelled_upstream_total") >= 1
    # Safe input in parallel mode is served whole.
    ok = client.chat.completions.create(**_chat("parallel", "how to bake bread", max_tokens=4))
    assert ok.choices[0].message.content


def test_parallel_mode_holds_an_answer_that_came_first_until_the_verdict(
    gw: Proc, sims: dict[str, Proc], client: Any
) -> None:
    # The upstream answers at once; the guard takes 0.6 s. The refusal must still win: nothing was sent.
    for stream in (False, True):
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(**_chat("parallel-fast", "how to build a bomb", stream=stream))
        _refused(exc)
        assert time.monotonic() - t0 >= 0.55
    ok = client.chat.completions.create(**_chat("parallel-fast", "how to bake bread", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in ok if c.choices)


# -- output ------------------------------------------------------------------------------------------


def _reply(sim: Proc, text: str) -> None:
    sim_control(sim, reply=text)


def _stream(client: Any, model: str, **extra: Any) -> tuple[str, list[Any], BaseException | None]:
    """The text a client received, the chunks, and the error that ended the stream (if any)."""
    chunks: list[Any] = []
    error = None
    try:
        for chunk in client.chat.completions.create(**_chat(model, "go on", stream=True, max_tokens=400, **extra)):
            chunks.append(chunk)
    except openai.APIError as exc:
        error = exc
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks, error


def test_a_stream_is_cut_before_the_flagged_window_reaches_the_client(sims: dict[str, Proc], client: Any) -> None:
    before = "It was a calm evening and the team talked about many ordinary things. " * 3
    after = " And then everyone went home and slept well."
    _reply(sims["out"], before + "Then someone mentioned project nightshade by name." + after)
    text, chunks, error = _stream(client, "out")
    assert error is not None and "secret_project" in str(error)
    assert len(text) >= WINDOW  # mid-way: earlier windows were delivered
    assert "nightshade" not in text.lower() and "project" not in text.lower()
    assert (before + "Then someone mentioned").startswith(text)  # a clean prefix of the answer, nothing else
    assert chunks[-1].choices[0].finish_reason == "content_filter"


# The first window ends right after "hurt": only the context sent with the next window shows the phrase whole.
SPLIT = "Gardening" + "-" * (WINDOW - len("Gardening hurt")) + " hurt"


@pytest.mark.parametrize("before", [SPLIT, "Here is a long and friendly answer about gardening and tomatoes. " * 4])
def test_a_guard_model_on_output_cuts_the_stream_and_cancels_the_upstream(
    sims: dict[str, Proc], client: Any, before: str
) -> None:
    out = sims["out"]
    reply = before + (" someone" if before is SPLIT else "Now go and hurt someone") + " badly."
    _reply(out, reply + " More words follow here." * 30)
    started = sim_stats(out)
    text, chunks, error = _stream(client, "out-guard")
    assert error is not None and "violent_crimes" in str(error)
    assert "someone" not in text and before.startswith(text)
    assert len(text) >= (len(SPLIT) if before is SPLIT else WINDOW)  # cut mid-way, not before the first window
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    wait_until(lambda: sim_stats(out)["cancelled"] == started["cancelled"] + 1, what="the generation's cancellation")


def test_the_guard_judges_an_answer_beside_the_redacted_prompt(sims: dict[str, Proc], client: Any) -> None:
    _reply(sims["out"], "Sure, I will write to them.")
    answer = client.chat.completions.create(**_chat("out-both", f"Please write to {EMAIL} for me", max_tokens=50))
    assert answer.choices[0].message.content == "Sure, I will write to them."
    _, raw = http_get(sims["guard"].url + "/sim/last-guard-prompt")
    shown = orjson.loads(raw)["prompt"]
    assert "User: Please write to [REDACTED:pii/email] for me" in shown and EMAIL not in shown
    assert "Agent: Sure, I will write to them." in shown


def test_a_clean_stream_passes_whole_with_the_upstream_chunks(sims: dict[str, Proc], client: Any) -> None:
    reply = "A short and entirely harmless answer about the weather today, which is sunny and warm."
    _reply(sims["out"], reply)
    text, chunks, error = _stream(client, "out")
    assert error is None and text == reply
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == len(reply.split())


@pytest.mark.parametrize("pad", [0, 5, 11, 17, 23, 29, 35])
def test_output_pii_is_redacted_wherever_the_window_edges_fall(sims: dict[str, Proc], client: Any, pad: int) -> None:
    # The e-mail straddles a window edge for some of the paddings: it must be redacted whole all the same.
    reply = "x" * pad + f" contact {EMAIL} or call +1 (555) 123-4567 on host-7.corp today, thanks a lot."
    expected = (
        "x" * pad
        + " contact [REDACTED:pii/email] or call [REDACTED:pii/phone] on [REDACTED:internal_host] today, thanks a lot."
    )
    _reply(sims["out"], reply)
    text, _, error = _stream(client, "out")
    assert error is None and text == expected
    whole = client.chat.completions.create(**_chat("out", "go on", max_tokens=400))
    assert whole.choices[0].message.content == expected


def test_a_non_streamed_answer_is_filtered(sims: dict[str, Proc], client: Any) -> None:
    _reply(sims["out"], "The plan is called Project Nightshade and it starts tomorrow.")
    answer = client.chat.completions.create(**_chat("out", "tell me", max_tokens=400))
    assert answer.choices[0].finish_reason == "content_filter"
    assert answer.choices[0].message.content is None


def test_an_openai_moderation_endpoint_on_output(sims: dict[str, Proc], client: Any) -> None:
    _reply(sims["out"], "Step one: find a quiet street. Step two: steal a car without being seen. Step three: drive.")
    text, chunks, error = _stream(client, "out-hosted")
    assert error is not None and "illicit" in str(error) and "steal" not in text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    whole = client.chat.completions.create(**_chat("out-hosted", "go on", max_tokens=400))
    assert whole.choices[0].finish_reason == "content_filter" and whole.choices[0].message.content is None
    _reply(sims["out"], "Step one: find a quiet street. Step two: park the car. Step three: walk home.")
    assert client.chat.completions.create(**_chat("out-hosted", "go on", max_tokens=400)).choices[0].message.content


def test_output_moderation_fails_closed_inside_a_stream(sims: dict[str, Proc], client: Any) -> None:
    _reply(sims["out"], "Some perfectly fine words that nobody can judge right now, sadly enough.")
    text, _, error = _stream(client, "out-closed")
    assert text == "" and isinstance(error, openai.APIError) and error.code == "moderation_unavailable"
    assert "hang_closed" in str(error)
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(**_chat("out-closed", "tell me", max_tokens=400))
    assert exc.value.code == "moderation_unavailable"


# -- POST /v1/moderations ------------------------------------------------------------------------


def test_the_moderations_endpoint_in_openai_shape(gw: Proc, client: Any) -> None:
    result = client.moderations.create(
        input=["What a lovely day", "I will hurt someone", f"mail me at {EMAIL}"], model="omni-moderation-latest"
    )
    assert result.model == "omni-moderation-latest" and result.id.startswith("modr-")
    clean, violent, pii = result.results
    assert not clean.flagged and not clean.categories.violence and clean.category_scores.violence == 0
    assert violent.flagged and violent.categories.violence and violent.category_scores.violence >= 0.5
    assert not violent.categories.hate
    # Our own categories sit beside OpenAI's (the SDK keeps them as extra fields).
    assert pii.flagged and pii.categories.model_extra["pii/email"] is True
    assert not any(v for k, v in pii.categories.model_dump().items() if k != "pii/email")
    # A moderator named as the model answers alone: the guard maps its codes to OpenAI's categories too.
    guarded = client.moderations.create(input="how to build a bomb", model="guard").results[0]
    assert guarded.flagged and guarded.categories.illicit_violent


def test_the_moderations_endpoint_needs_its_scope(gw: Proc) -> None:
    chat_only = openai_client(gw, new_key(gw, tier="free", scopes=["chat:write"]))
    with pytest.raises(openai.PermissionDeniedError):
        chat_only.moderations.create(input="hello")
    status, raw = http_post(gw.url + "/v1/moderations", {"input": []}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "input"


def test_the_usage_record_marks_output_moderation(gw: Proc, sims: dict[str, Proc]) -> None:
    _reply(sims["out"], "Project Nightshade again, sorry.")
    status, _, answer = post_chat(gw.url, _chat("out", "x", max_tokens=100), **{"x-request-id": "filtered-output-1"})
    assert status == 200 and answer["choices"][0]["finish_reason"] == "content_filter"
    wait_until(lambda: _usage_marks(gw).get("filtered-output-1") == "output:block", what="the usage record's mark")
    assert re.search(r'"moderation":\s*"output:block"', gw.log())
