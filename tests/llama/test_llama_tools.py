"""Tool round trips against a real llama-server (LLAMA_SERVER_BIN), through the gateway, natively and translated to
chat completions: `openai` responses with a function tool, `anthropic` messages with tool use, an `openai-agents`
turn with a tool; and rerank from a llama-server started with `--reranking`, and infill.

The model is scripted_gguf's: weights set by hand so that it calls get_weather({"city": "Paris"}) until a tool
result is in the conversation, then answers in words. So llama-server's own template rendering, tool-call parsing,
lazy grammar and streaming of tool calls are what these tests exercise, not a simulator's idea of them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agents
import anthropic
import openai
import orjson
import pytest
from events import MESSAGE_EVENT, RESPONSE_EVENT, sse_events
from llama_proc import serve_llama
from procs import ADMIN_KEY, Proc, gateway_config, http_get, http_post, openai_client, start_gateway
from scripted_gguf import ANSWER, TOOL_ARGS, TOOL_NAME, WEATHER_TOOL_SCHEMA, write_scripted_llama

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(not os.environ.get("LLAMA_SERVER_BIN"), reason="LLAMA_SERVER_BIN is not set"),
]
MODES = ["native", "translated"]
ANTHROPIC_HEADERS = {"x-api-key": ADMIN_KEY, "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def scripted(module_tmp: Path) -> Iterator[str]:
    # Byte tokens make its prompts long: a tool definition and a round trip come to ~700 tokens.
    yield from serve_llama(module_tmp, write_scripted_llama, name="scripted", ctx=8192)


@pytest.fixture(scope="module")
def reranker(module_tmp: Path) -> Iterator[str]:
    yield from serve_llama(module_tmp, args=["--reranking"], name="reranker")


@pytest.fixture(scope="module")
def gw(scripted: str, reranker: str, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {
            "native": [scripted],
            "translated": [{"url": scripted, "native": []}],
            "ranker": [reranker],
        },
        cache={"enabled": False},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def _answered_natively(gw: Proc, model: str, path: str) -> bool:
    """The deployment sends `path` as the client spoke it and its llama-server never answered it 404/405 (when it
    does, the gateway sends it translated instead: these tests would pass without testing the native path)."""
    status, body = http_get(gw.url + "/admin/backends")
    assert status == 200
    replica = next(m["replicas"][0] for m in orjson.loads(body)["data"] if m["model"] == model)
    return path in replica["native_apis"] and not replica["lacking_apis"]


@pytest.mark.parametrize("model", MODES)
def test_responses_function_tool_round_trip(gw: Proc, model: str) -> None:
    oai = openai_client(gw)
    tools: list[Any] = [{"type": "function", "name": TOOL_NAME, "parameters": WEATHER_TOOL_SCHEMA, "strict": True}]
    first = oai.responses.create(model=model, input="What is the weather in Paris?", tools=tools)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == TOOL_NAME and orjson.loads(calls[0].arguments) == TOOL_ARGS
    assert first.status == "completed"
    second = oai.responses.create(
        model=model,
        previous_response_id=first.id,
        tools=tools,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 24 C"}],
    )
    assert second.output_text == ANSWER and second.previous_response_id == first.id
    # Streamed: every event valid against the official schema, the arguments in deltas that add up.
    events = sse_events(
        gw.url + "/v1/responses",
        {"model": model, "input": "And in Paris?", "tools": tools, "stream": True},
        {"authorization": f"Bearer {ADMIN_KEY}"},
    )
    for n, (name, data) in enumerate(events):
        RESPONSE_EVENT.validate_python(data)
        assert name == data["type"] and data["sequence_number"] == n
    deltas = [d["delta"] for _, d in events if d["type"] == "response.function_call_arguments.delta"]
    done = next(d for _, d in events if d["type"] == "response.function_call_arguments.done")
    assert deltas and orjson.loads("".join(deltas)) == orjson.loads(done["arguments"]) == TOOL_ARGS
    final = events[-1][1]
    assert final["type"] == "response.completed" and final["response"]["output"][0]["type"] == "function_call"
    assert _answered_natively(gw, model, "/v1/responses") == (model == "native")


@pytest.mark.parametrize("model", MODES)
def test_messages_tool_use_round_trip(gw: Proc, model: str) -> None:
    claude = anthropic.Anthropic(base_url=gw.url, api_key=ADMIN_KEY, max_retries=0)
    tools: list[Any] = [{"name": TOOL_NAME, "description": "The weather", "input_schema": WEATHER_TOOL_SCHEMA}]
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    events = sse_events(
        gw.url + "/v1/messages",
        {"model": model, "max_tokens": 64, "stream": True, "tools": tools, "messages": ask},
        ANTHROPIC_HEADERS,
    )
    for name, data in events:
        MESSAGE_EVENT.validate_python(data)
        assert name == data["type"]
    partial = [d["delta"]["partial_json"] for _, d in events if d.get("delta", {}).get("type") == "input_json_delta"]
    assert partial and orjson.loads("".join(partial)) == TOOL_ARGS
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    with claude.messages.stream(model=model, max_tokens=64, tools=tools, messages=ask) as stream:
        used = stream.get_final_message()
    assert used.stop_reason == "tool_use"
    call = next(block for block in used.content if block.type == "tool_use")
    assert call.name == TOOL_NAME and call.input == TOOL_ARGS
    conversation: list[Any] = [
        *ask,
        {"role": "assistant", "content": [block.model_dump() for block in used.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 24 C"}]},
    ]
    answer = claude.messages.create(model=model, max_tokens=64, tools=tools, messages=conversation)
    assert answer.stop_reason == "end_turn"
    assert [block.type for block in answer.content] == ["text"] and answer.content[0].text == ANSWER  # type: ignore[union-attr]
    assert _answered_natively(gw, model, "/v1/messages") == (model == "native")
    # A stop sequence: llama-server's own answer names it; its chat completion does not say which stop matched, so
    # translated it reads as end_turn.
    stopped = claude.messages.create(
        model=model, max_tokens=64, tools=tools, stop_sequences=["sunny"], messages=conversation
    )
    named = ("stop_sequence", "sunny") if model == "native" else ("end_turn", None)
    assert (stopped.stop_reason, stopped.stop_sequence) == named
    assert stopped.content[0].text == "It is "  # type: ignore[union-attr]


@pytest.mark.parametrize("model", MODES)
def test_openai_agents_sdk_runs_a_turn_with_a_tool(gw: Proc, model: str) -> None:
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    agent = agents.Agent(
        name="forecaster",
        instructions="Use the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=model, openai_client=client),
    )
    agents.set_tracing_disabled(True)
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?"))
    assert seen == [TOOL_ARGS["city"]] and result.final_output == ANSWER
    assert _answered_natively(gw, model, "/v1/responses") == (model == "native")


def test_rerank_from_a_reranking_llama_server(gw: Proc) -> None:
    documents = ["Paris is in France.", "Bananas are yellow.", "The Seine flows through Paris."]
    for path in ("/v1/rerank", "/rerank"):
        status, raw = http_post(
            gw.url + path, {"model": "ranker", "query": "Where is Paris?", "documents": documents, "top_n": 2}
        )
        assert status == 200, raw
        body = orjson.loads(raw)
        results = body["results"]
        assert len(results) == 2 and {r["index"] for r in results} <= {0, 1, 2}
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
        assert body["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("model", MODES)
def test_infill_answers_with_a_fill_in_the_middle_vocabulary(gw: Proc, model: str) -> None:
    status, raw = http_post(
        gw.url + "/infill",
        {"model": model, "input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n", "n_predict": 4},
    )
    assert status == 200, raw
    body = orjson.loads(raw)
    assert isinstance(body["content"], str) and body["model"] == model and body["tokens_predicted"] >= 1
    assert _answered_natively(gw, model, "/infill") == (model == "native")
