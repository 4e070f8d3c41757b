"""The Responses and Messages APIs and the token counts against a real llama-server (LLAMA_SERVER_BIN), through
the gateway: natively (the default for a llama_cpp deployment) and translated to chat completions (a deployment
declared without them), with the `openai` and `anthropic` SDKs; every stream's events checked against the SDKs'
types of the official schemas, the tokens charged against what llama-server reported.

The model is tiny_gguf's random one: its words are noise, so these check the wire. `ignore_eos` (llama-server's
own field, passed on in both modes) makes lengths exact. llama-server's own Responses stream leaves out
`sequence_number` and `output_index`; what the gateway sends has them (it re-encodes every event).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from events import MESSAGE_EVENT, RESPONSE_EVENT, sse_events
from llama_proc import serve_llama
from procs import (
    ADMIN_KEY,
    Proc,
    create_key,
    gateway_config,
    http_get,
    http_post,
    openai_client,
    start_gateway,
    wait_until,
)

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(not os.environ.get("LLAMA_SERVER_BIN"), reason="LLAMA_SERVER_BIN is not set"),
]
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def llama(module_tmp: Path) -> Iterator[str]:
    yield from serve_llama(module_tmp)


@pytest.fixture(scope="module")
def gw(llama: str, module_tmp: Path) -> Iterator[Proc]:
    price = {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}
    cfg = gateway_config(
        {
            "native": [{"url": llama, "cost": price}],
            "translated": [{"url": llama, "native": [], "cost": price}],
        },
        cache={"enabled": False},
        quota={"usage": {"flush_interval_s": 0.1}},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


MODES = ["native", "translated"]


@pytest.mark.parametrize("model", MODES)
def test_responses(gw: Proc, model: str) -> None:
    oai = openai_client(gw)
    r = oai.responses.create(model=model, input="Hello", max_output_tokens=4, extra_body=EXACT)
    assert r.model == model and r.status == "incomplete" and r.usage and r.usage.output_tokens == 4
    assert r.output[0].type == "message"
    events = sse_events(
        gw.url + "/v1/responses",
        {"model": model, "input": "Hi", "stream": True, "max_output_tokens": 3, **EXACT},
        {"authorization": f"Bearer {ADMIN_KEY}"},
    )
    for n, (name, data) in enumerate(events):
        RESPONSE_EVENT.validate_python(data)
        assert name == data["type"] and data["sequence_number"] == n
    assert events[-1][1]["type"] == "response.incomplete"
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 3
    counted = oai.responses.input_tokens.count(model=model, input="Hello there")
    assert counted.input_tokens > 0


@pytest.mark.parametrize("model", MODES)
def test_messages(gw: Proc, model: str) -> None:
    claude = anthropic.Anthropic(base_url=gw.url, api_key=ADMIN_KEY, max_retries=0)
    m = claude.messages.create(
        model=model, max_tokens=5, messages=[{"role": "user", "content": "Hello"}], extra_body=EXACT
    )
    assert m.model == model and m.stop_reason == "max_tokens" and m.usage.output_tokens == 5
    events = sse_events(
        gw.url + "/v1/messages",
        {"model": model, "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "Hi"}], **EXACT},
        {"x-api-key": ADMIN_KEY, "anthropic-version": "2023-06-01"},
    )
    kinds = []
    for name, data in events:
        MESSAGE_EVENT.validate_python(data)
        assert name == data["type"]
        kinds.append(data["type"])
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[-2][1]["usage"]["output_tokens"] == 3
    assert claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "Hi"}]).input_tokens > 0


@pytest.mark.parametrize("model", MODES)
def test_tokens_charged_are_llama_servers_counts(gw: Proc, model: str) -> None:
    key = create_key(gw)
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key["key"], max_retries=0)
    with claude.messages.stream(
        model=model, max_tokens=4, messages=[{"role": "user", "content": "Count"}], extra_body=EXACT
    ) as s:
        final = s.get_final_message()
    with openai_client(gw, key["key"]).responses.stream(
        model=model, input="Count", max_output_tokens=3, extra_body=EXACT
    ) as rs:
        kinds = [e.type for e in rs]
    done: Any = None
    assert kinds[-1] == "response.incomplete"
    seen_in = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    seen_out = final.usage.output_tokens

    def written() -> bool:
        nonlocal done
        status, body = http_get(gw.url + f"/admin/usage?group_by=key&key_id={key['id']}")
        rows = orjson.loads(body)["data"] if status == 200 else []
        done = rows[0] if rows and rows[0]["requests"] == 2 else None
        return done is not None

    wait_until(written, what="two usage records")
    assert done["completion_tokens"] == seen_out + 3
    assert done["prompt_tokens"] > seen_in  # and the Responses request's prompt


@pytest.mark.parametrize("model", MODES)
def test_llama_cpps_own_endpoints(gw: Proc, model: str) -> None:
    def post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        status, raw = http_post(gw.url + path, {"model": model, **body})
        return status, orjson.loads(raw)

    status, answer = post("/completion", {"prompt": "Hello", "n_predict": 3, **EXACT})
    assert status == 200 and answer["tokens_predicted"] == 3 and answer["model"] == model
    status, tokens = post("/tokenize", {"content": "hello world"})
    assert status == 200 and tokens["tokens"]
    status, text = post("/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and isinstance(text["content"], str)
    status, templated = post("/apply-template", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and "hi" in templated["prompt"]
    status, props = http_get(gw.url + f"/props?model={model}")
    assert status == 200 and orjson.loads(props)["total_slots"] == 2
    # The tiny model has no fill-in-the-middle tokens: llama-server's 501 reaches the client, in OpenAI's shape.
    status, refused = post("/infill", {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 2})
    if model == "native":
        assert status == 501 and "infill" in refused["error"]["message"].lower()


@pytest.mark.parametrize("model", MODES)
def test_stored_responses_continue_and_store_false_leaves_nothing(gw: Proc, model: str) -> None:
    oai = openai_client(gw)
    first = oai.responses.create(model=model, input="Hello", max_output_tokens=3, extra_body=EXACT)
    second = oai.responses.create(
        model=model, input="Again", previous_response_id=first.id, max_output_tokens=3, extra_body=EXACT
    )
    alone = oai.responses.create(model=model, input="Again", max_output_tokens=3, store=False, extra_body=EXACT)
    # llama-server counted the first turn in the continuation's prompt: it was sent the whole conversation.
    assert second.usage and alone.usage and second.usage.input_tokens > alone.usage.input_tokens
    assert oai.responses.retrieve(second.id).id == second.id
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(alone.id)
