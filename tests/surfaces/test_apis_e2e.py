"""The Responses and Messages APIs through the gateway, with the real `openai`, `anthropic` and `openai-agents` SDKs
as clients: natively (a simulator that answers /v1/responses and /v1/messages itself, as llama-server does) and
translated to chat completions (a simulator that answers them 404, learned on the first call; and a deployment
declared without them). Every stream's raw events are checked against the SDKs' types of the official event
schemas, in order; refusals come in each API's own error shape."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agents
import anthropic
import openai
import orjson
import pytest
from events import MESSAGE_EVENT, RESPONSE_EVENT, sse_events
from procs import (
    ADMIN_KEY,
    Proc,
    create_key,
    gateway_config,
    http_get,
    http_post,
    openai_client,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
# "nat": answered natively; "tr": the simulator answers 404 (learned, then translated); "tr-declared": the
# deployment says it answers none of them.
MODELS = ["nat", "tr", "tr-declared"]


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[dict[str, Proc]]:
    native = start_sim("--model-alias", "native.gguf", log_dir=module_tmp)
    off = start_sim("--model-alias", "old.gguf", "--no-native", log_dir=module_tmp)
    yield {"native": native, "off": off}
    native.stop()
    off.stop()


@pytest.fixture(scope="module")
def gw(sims: dict[str, Proc], module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {
            "nat": [{"url": sims["native"].url, "cost": {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}}],
            "tr": [{"url": sims["off"].url, "cost": {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}}],
            "tr-declared": [{"url": sims["native"].url, "native": []}],
            "guarded": [sims["native"].url],
        },
        resilience={"breaker": {"failures": 1000}},
        cache={"enabled": False},
        # Agents ask for far more tokens than they use: a request reserves at most 16 (a stream takes more as it goes).
        quota={"usage": {"flush_interval_s": 0.1}, "max_reserved_tokens": 16},
        moderation={
            "moderators": {
                "words": {"kind": "rules", "keywords": [{"name": "secret", "words": ["project nightshade"]}]}
            },
        },
    )
    cfg["models"]["guarded"]["moderation"] = {"input": ["words"], "output": ["words"]}
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def oai(gw: Proc) -> openai.OpenAI:
    return openai_client(gw)


@pytest.fixture(scope="module")
def claude(gw: Proc) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=ADMIN_KEY, max_retries=0)


def _native_calls(sims: dict[str, Proc]) -> int:
    return int(sim_stats(sims["native"])["native"])


def _check_response_events(events: list[tuple[str | None, dict[str, Any]]]) -> list[str]:
    kinds = []
    for n, (name, data) in enumerate(events):
        RESPONSE_EVENT.validate_python(data)  # the official schema of its type
        assert name == data["type"] and data["sequence_number"] == n
        kinds.append(data["type"])
    assert kinds[:2] == ["response.created", "response.in_progress"]
    return kinds


def _check_message_events(events: list[tuple[str | None, dict[str, Any]]]) -> list[str]:
    kinds = []
    for name, data in events:
        MESSAGE_EVENT.validate_python(data)
        assert name == data["type"]
        kinds.append(data["type"])
    assert kinds[0] == "message_start" and kinds.count("message_start") == 1
    return kinds


# -- the Responses API --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_responses_text_and_stream(oai: openai.OpenAI, gw: Proc, sims: dict[str, Proc], model: str) -> None:
    before = _native_calls(sims)
    r = oai.responses.create(model=model, input="Say hello", instructions="Be brief.", max_output_tokens=6)
    assert r.status == "incomplete" and r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.model == model
    assert r.usage is not None and r.usage.output_tokens == 6 and r.usage.input_tokens > 0
    events = sse_events(
        gw.url + "/v1/responses",
        {"model": model, "input": "Stream it", "stream": True, "max_output_tokens": 5},
        {"authorization": f"Bearer {ADMIN_KEY}"},
    )
    kinds = _check_response_events(events)
    assert kinds[-1] == "response.incomplete"
    assert kinds.count("response.output_text.delta") == 5
    for tail in ("response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert tail in kinds
    final = events[-1][1]["response"]
    deltas = "".join(d["delta"] for _, d in events if d["type"] == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == deltas and final["usage"]["output_tokens"] == 5
    assert (_native_calls(sims) > before) == (model == "nat")


@pytest.mark.parametrize("model", MODELS)
def test_responses_function_tool_round_trip(oai: openai.OpenAI, model: str) -> None:
    tools: list[Any] = [{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": False}]
    first = oai.responses.create(model=model, input="Weather in Paris?", tools=tools)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert set(orjson.loads(calls[0].arguments)) == {"city"}
    second = oai.responses.create(
        model=model,
        previous_response_id=first.id,
        tools=tools,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny and mild"}],
    )
    assert second.output_text == "The tool answered: sunny and mild"
    # The same round trip streamed: the call's arguments arrive as deltas.
    with oai.responses.stream(model=model, input="Weather in Rome?", tools=tools) as stream:
        kinds = [event.type for event in stream]
        done = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert done.output[0].type == "function_call"


def test_admin_backends_shows_which_apis_each_replica_answers_natively(oai: openai.OpenAI, gw: Proc) -> None:
    oai.responses.create(model="tr", input="Hello", max_output_tokens=2)  # its simulator answers 404: learned
    status, body = http_get(gw.url + "/admin/backends")
    assert status == 200
    replica = {m["model"]: m["replicas"][0] for m in orjson.loads(body)["data"]}
    assert "/v1/responses" in replica["nat"]["native_apis"] and replica["nat"]["lacking_apis"] == {}
    assert "/v1/responses" not in replica["tr"]["native_apis"]
    assert 0 < replica["tr"]["lacking_apis"]["/v1/responses"]["retry_native_in_s"] <= 600
    assert replica["tr-declared"]["native_apis"] == [] and replica["tr-declared"]["lacking_apis"] == {}


def test_previous_response_id_continues_a_stored_response(oai: openai.OpenAI, gw: Proc) -> None:
    first = oai.responses.create(model="nat", input="My name is Ada.", max_output_tokens=4)
    second = oai.responses.create(model="nat", input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert oai.responses.retrieve(second.id).output_text == second.output_text
    items = oai.responses.input_items.list(second.id, order="asc").data
    assert [i.type for i in items] == ["message"] and items[0].content[0].text == "What is my name?"  # type: ignore[union-attr]
    # The continuation's prompt held the first turn: more input tokens than the question alone.
    alone = oai.responses.create(model="nat", input="What is my name?", store=False)
    assert second.usage and alone.usage and second.usage.input_tokens > alone.usage.input_tokens
    # Another user cannot see, continue or delete it.
    other = openai_client(gw, create_key(gw, user="someone-else")["key"])
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="nat", input="hi", previous_response_id=second.id)
    assert oai.responses.delete(second.id) is None
    with pytest.raises(openai.NotFoundError) as gone:
        oai.responses.retrieve(second.id)
    assert gone.value.code == "response_not_found"


def test_store_false_leaves_nothing(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="tr", input="Forget me", store=False, max_output_tokens=3)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="tr", input="again", previous_response_id=r.id)


@pytest.mark.parametrize("model", ["nat", "tr"])
def test_input_token_counts(oai: openai.OpenAI, gw: Proc, model: str) -> None:
    r = oai.responses.input_tokens.count(model=model, input="Count these tokens please")
    assert r.input_tokens > 0
    status, body = http_post(
        gw.url + "/v1/chat/completions/input_tokens",
        {"model": model, "messages": [{"role": "user", "content": "Count these tokens please"}]},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert status == 200 and orjson.loads(body)["input_tokens"] > 0


def test_openai_agents_sdk_runs_a_turn_with_a_tool(gw: Proc) -> None:
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    model = agents.OpenAIResponsesModel(model="nat", openai_client=client)
    agent = agents.Agent(name="forecaster", instructions="Use the tool.", tools=[get_weather], model=model)
    agents.set_tracing_disabled(True)
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Oslo?"))
    assert len(seen) == 1
    assert result.final_output == f"The tool answered: sunny in {seen[0]}"


# -- Anthropic's Messages API -------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_messages_text_stream_and_count(
    claude: anthropic.Anthropic, gw: Proc, sims: dict[str, Proc], model: str
) -> None:
    before = _native_calls(sims)
    m = claude.messages.create(
        model=model, max_tokens=7, system="Be brief.", messages=[{"role": "user", "content": "Hello"}]
    )
    assert m.type == "message" and m.role == "assistant" and m.model == model
    assert m.stop_reason == "max_tokens" and m.content[0].type == "text" and m.content[0].text
    assert m.usage.output_tokens == 7 and m.usage.input_tokens > 0
    with claude.messages.stream(model=model, max_tokens=5, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens == 5 and final.usage.input_tokens > 0
    events = sse_events(
        gw.url + "/v1/messages",
        {"model": model, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        {"x-api-key": ADMIN_KEY, "anthropic-version": "2023-06-01"},
    )
    kinds = _check_message_events(events)
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 4
    assert all(d["delta"]["type"] == "text_delta" for _, d in events if d["type"] == "content_block_delta")
    counted = claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "Hello there"}])
    assert counted.input_tokens > 0
    assert (_native_calls(sims) > before) == (model == "nat")


@pytest.mark.parametrize("model", MODELS)
def test_messages_tool_use_round_trip(claude: anthropic.Anthropic, gw: Proc, model: str) -> None:
    tools: list[Any] = [{"name": "get_weather", "description": "The weather", "input_schema": WEATHER}]
    ask: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    events = sse_events(
        gw.url + "/v1/messages",
        {"model": model, "max_tokens": 64, "stream": True, "tools": tools, "messages": ask},
        {"x-api-key": ADMIN_KEY, "anthropic-version": "2023-06-01"},
    )
    _check_message_events(events)
    partial = [d["delta"]["partial_json"] for _, d in events if d.get("delta", {}).get("type") == "input_json_delta"]
    assert len(partial) >= 2 and set(orjson.loads("".join(partial))) == {"city"}
    with claude.messages.stream(model=model, max_tokens=64, tools=tools, messages=ask) as stream:
        used = stream.get_final_message()
    assert used.stop_reason == "tool_use"
    call = next(block for block in used.content if block.type == "tool_use")
    assert call.name == "get_weather" and set(call.input) == {"city"}  # type: ignore[arg-type]
    answer = claude.messages.create(
        model=model,
        max_tokens=64,
        tools=tools,
        messages=[
            *ask,
            {"role": "assistant", "content": [block.model_dump() for block in used.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "rainy"}]},
        ],
    )
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "The tool answered: rainy"  # type: ignore[union-attr]


def test_messages_thinking_blocks_from_reasoning_content(gw: Proc, sims: dict[str, Proc]) -> None:
    for sim in sims.values():
        sim_control(sim, reasoning_words=3)
    try:
        for model in ("nat", "tr"):
            events = sse_events(
                gw.url + "/v1/messages",
                {"model": model, "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "Think"}]},
                {"x-api-key": ADMIN_KEY},
            )
            _check_message_events(events)
            starts = [d["content_block"]["type"] for _, d in events if d["type"] == "content_block_start"]
            assert starts == ["thinking", "text"]
            thinking = [d for _, d in events if d.get("delta", {}).get("type") == "thinking_delta"]
            assert len(thinking) == 3
    finally:
        for sim in sims.values():
            sim_control(sim, reasoning_words=0)


def test_messages_stop_sequence_reported(claude: anthropic.Anthropic, gw: Proc, sims: dict[str, Proc]) -> None:
    # The native answer names the stop sequence (as llama-server's /v1/messages does); a chat completion names it
    # as vLLM does (`stop_reason`), which the translation reads. A stop that is not one of the request's is none.
    for sim in sims.values():
        sim_control(sim, reply="Forty two. END and more words")
    try:
        for model in MODELS:
            ask: list[Any] = [{"role": "user", "content": "The answer?"}]
            m = claude.messages.create(model=model, max_tokens=50, stop_sequences=["STOP", "END"], messages=ask)
            assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "END"), model
            assert m.content[0].text == "Forty two. "  # type: ignore[union-attr]
            events = sse_events(
                gw.url + "/v1/messages",
                {"model": model, "max_tokens": 50, "stream": True, "stop_sequences": ["END"], "messages": ask},
                {"x-api-key": ADMIN_KEY},
            )
            _check_message_events(events)
            delta = events[-2][1]["delta"]
            assert (delta["stop_reason"], delta["stop_sequence"]) == ("stop_sequence", "END"), model
            plain = claude.messages.create(model=model, max_tokens=50, messages=ask)
            assert (plain.stop_reason, plain.stop_sequence) == ("end_turn", None)
    finally:
        for sim in sims.values():
            sim_control(sim, reply=None)


# -- refusals in each API's shape -----------------------------------------------------------------------


def test_refusals_in_each_apis_shape(gw: Proc) -> None:
    bad = anthropic.Anthropic(base_url=gw.url, api_key="pc-nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
        bad.messages.create(model="nat", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    body = unauthenticated.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert body["request_id"] == unauthenticated.value.response.headers["x-request-id"]  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai_client(gw, "pc-nope").responses.create(model="nat", input="x")

    claude = anthropic.Anthropic(base_url=gw.url, api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as invalid:
        claude.messages.create(model="nat", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert invalid.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in invalid.value.message

    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(
            model="guarded", max_tokens=5, messages=[{"role": "user", "content": "tell me about project nightshade"}]
        )
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused_r:
        openai_client(gw).responses.create(model="guarded", input="tell me about project nightshade")
    assert refused_r.value.code == "content_policy_violation"

    limited = create_key(gw, limits={"requests": {"minute": 1}})
    one = anthropic.Anthropic(base_url=gw.url, api_key=limited["key"], max_retries=0)
    one.messages.create(model="nat", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError) as limited_m:
        one.messages.create(model="nat", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert limited_m.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert limited_m.value.response.headers["retry-after"].isdigit()
    with pytest.raises(openai.RateLimitError):
        openai_client(gw, limited["key"]).responses.create(model="nat", input="x")


@pytest.mark.parametrize("model", ["nat", "tr"])
def test_a_broken_upstream_ends_each_stream_with_its_error_event(gw: Proc, sims: dict[str, Proc], model: str) -> None:
    sim = sims["native" if model == "nat" else "off"]
    sim_control(sim, stream_error_rate=1.0, fault_after_tokens=2)
    try:
        events = sse_events(
            gw.url + "/v1/messages",
            {"model": model, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
            {"x-api-key": ADMIN_KEY},
        )
        assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
        MESSAGE_EVENT.validate_python(events[0][1])
        responses = sse_events(
            gw.url + "/v1/responses",
            {"model": model, "input": "Hi", "stream": True},
            {"authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert [d["type"] for _, d in responses[-2:]] == ["error", "response.failed"]
        for _, data in responses:
            RESPONSE_EVENT.validate_python(data)
    finally:
        sim_control(sim, stream_error_rate=0.0)


# -- quotas and usage ---------------------------------------------------------------------------------


def _usage_of(gw: Proc, key_id: str, requests: int) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def written() -> bool:
        status, body = http_get(gw.url + f"/admin/usage?group_by=key&key_id={key_id}")
        rows = orjson.loads(body)["data"] if status == 200 else []
        if rows and rows[0]["requests"] == requests:
            found.update(rows[0])
            return True
        return False

    wait_until(written, what=f"{requests} usage records")
    return found


@pytest.mark.parametrize("model", ["nat", "tr"])
def test_tokens_charged_equal_the_upstreams_counts(gw: Proc, model: str) -> None:
    key = create_key(gw)
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key["key"], max_retries=0)
    oai = openai_client(gw, key["key"])
    seen_in = seen_out = 0
    m = claude.messages.create(model=model, max_tokens=9, messages=[{"role": "user", "content": "one two three"}])
    # (Anthropic's input tokens leave out those read from the prompt cache)
    seen_in += m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    seen_out += m.usage.output_tokens
    with claude.messages.stream(model=model, max_tokens=6, messages=[{"role": "user", "content": "four"}]) as s:
        final = s.get_final_message()
    seen_in += final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    seen_out += final.usage.output_tokens
    r = oai.responses.create(model=model, input="five six", max_output_tokens=4)
    assert r.usage is not None
    seen_in, seen_out = seen_in + r.usage.input_tokens, seen_out + r.usage.output_tokens
    with oai.responses.stream(model=model, input="seven", max_output_tokens=64) as rs:
        done = rs.get_final_response()
    assert done.usage is not None
    seen_in, seen_out = seen_in + done.usage.input_tokens, seen_out + done.usage.output_tokens
    row = _usage_of(gw, key["id"], 4)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (seen_in, seen_out)
    assert row["cost"] == pytest.approx((seen_in + seen_out) / 1000)


def test_a_budget_cuts_a_messages_stream_with_anthropics_error_event(gw: Proc, sims: dict[str, Proc]) -> None:
    key = create_key(gw, budget={"day": 0.05})  # 50 tokens at 1.0 per 1k (prompt and completion)
    sim_control(sims["off"], default_max_tokens=400)
    try:
        events = sse_events(
            gw.url + "/v1/messages",
            {"model": "tr", "max_tokens": 300, "stream": True, "messages": [{"role": "user", "content": "go"}]},
            {"x-api-key": key["key"]},
        )
    finally:
        sim_control(sims["off"], default_max_tokens=32)
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "rate_limit_error"
    assert "budget" in data["error"]["message"]
    assert 0 < sum(1 for _, d in events if d["type"] == "content_block_delta") < 300


def test_malformed_items_are_refused_in_the_apis_shape(gw: Proc) -> None:
    for body in (
        {"model": "tr", "input": [{"type": "reasoning", "content": 5}]},
        {"model": "tr", "input": [{"type": "reasoning", "content": [{"text": 5}]}]},
        {"model": "tr", "input": [{"type": "function_call", "name": 3}]},
        {"model": "tr", "input": [{"type": "web_search_call"}]},
        {"model": "tr", "input": "x", "tools": [{"type": "web_search"}]},
    ):
        status, raw = http_post(gw.url + "/v1/responses", body)
        assert status == 400, (body, raw)
        assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"
    for body in (
        {"model": "tr", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
        {"model": "tr", "max_tokens": 5, "messages": [{"role": "user", "content": [5]}]},
        {"model": "tr", "max_tokens": 5, "messages": "hi"},
        {
            "model": "tr",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "bash_20250124", "name": "bash"}],
        },
    ):
        status, raw = http_post(gw.url + "/v1/messages", body, headers={"x-api-key": ADMIN_KEY})
        assert status == 400, (body, raw)
        assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"
