"""The official `openai` SDK against the gateway, with the simulator upstream: the happy paths."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import orjson
import pytest
from procs import ADMIN_KEY, Proc, http_get, http_post, sim_control, sim_stats, wait_until


@pytest.fixture
def echo(sim: Proc) -> Iterator[None]:
    sim_control(sim, echo_request=True)
    yield
    sim_control(sim, echo_request=False)


def test_chat_non_stream(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=5
    )
    assert r.object == "chat.completion"
    assert r.model == "tiny"  # the name the client asked for, not llama-server's alias
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage is not None and r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0


def test_chat_deterministic_at_temperature_zero(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        msgs = [{"role": "user", "content": "Same question"}]
        return client.chat.completions.create(model="tiny", messages=msgs, temperature=0).choices[0].message.content

    assert ask() == ask()


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Stream please"}], max_tokens=6, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.model == "tiny" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    # The client did not ask for usage: the gateway asked upstream for it anyway, and dropped the chunk.
    assert all(c.choices for c in chunks)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Stream with usage"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 4
    assert last.model == "tiny"


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3)
    assert r.model == "tiny" and r.choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="tiny-embed", input=["first text", "second text"])
    assert r.model == "tiny-embed"
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 64 and r.data[0].embedding != r.data[1].embedding
    assert r.usage.prompt_tokens > 0


def test_models(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["tiny", "tiny-embed"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_unknown_fields_are_forwarded_untouched(client: openai.OpenAI, echo: None) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        extra_body={"n_probs": 3, "cache_prompt": True, "grammar": 'root ::= "a"', "mirostat": {"tau": 5}},
    )
    seen = r.model_extra["sim_request"]
    assert seen["n_probs"] == 3 and seen["cache_prompt"] is True
    assert seen["grammar"] == 'root ::= "a"' and seen["mirostat"] == {"tau": 5}
    assert seen["model"] == "tiny"  # no upstream_model configured: the name goes through as is


def test_modern_roles_and_content_parts(client: openai.OpenAI, echo: None) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=tools)
    assert r.model_extra["sim_request"]["messages"] == messages


def test_nul_bytes_are_stripped(gateway: Proc, sim: Proc, echo: None) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a\u0000b"}]}
    status, raw = http_post(gateway.url + "/v1/chat/completions", body)
    assert status == 200
    assert orjson.loads(raw)["sim_request"]["messages"][0]["content"] == "ab"


def test_stream_counts_usage_even_when_client_did_not_ask(gateway: Proc, client: openai.OpenAI) -> None:
    from procs import http_get

    def completion_tokens() -> float:
        _, text = http_get(gateway.url + "/metrics")
        for line in text.decode().splitlines():
            if line.startswith('portcullis_tokens_total{kind="completion",model="tiny"}'):
                return float(line.split()[-1])
        return 0.0

    before = completion_tokens()
    list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "u"}], max_tokens=7, stream=True
        )
    )
    assert completion_tokens() - before == 7


def test_request_id_is_echoed_or_generated(gateway: Proc) -> None:
    import urllib.request

    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    req = urllib.request.Request(gateway.url + "/v1/models", headers={"x-request-id": "abc-123", **auth})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["x-request-id"] == "abc-123"
    with urllib.request.urlopen(urllib.request.Request(gateway.url + "/v1/models", headers=auth)) as resp:
        assert len(resp.headers["x-request-id"]) >= 16


def test_slots_are_released(sim: Proc) -> None:
    assert sim_stats(sim)["active"] == 0


def test_the_openai_routes_answer_without_v1(gateway: Proc) -> None:
    # A client configured with the bare base URL (as llama-server and other gateways accept) calls
    # /chat/completions, /models, ...: the same routes, so the same record and metrics as under /v1.
    bare = openai.OpenAI(base_url=gateway.url, api_key=ADMIN_KEY, max_retries=0)
    hi = [{"role": "user", "content": "hi"}]
    tagged = {"x-request-id": "bare-1"}
    answer = bare.chat.completions.create(model="tiny", messages=hi, max_tokens=4, extra_headers=tagged)
    assert answer.model == "tiny" and answer.choices[0].message.content
    chunks = list(bare.chat.completions.create(model="tiny", messages=hi, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason is not None
    assert "tiny" in {m.id for m in bare.models.list()}
    assert bare.models.retrieve("tiny").id == "tiny"
    wait_until(lambda: '"request_id":"bare-1"' in gateway.log().replace(" ", ""), what="the access line")
    line = next(orjson.loads(x) for x in gateway.log().splitlines() if '"bare-1"' in x and "duration_ms" in x)
    assert line["path"] == "/v1/chat/completions" and line["status"] == 200
    # Only the OpenAI routes' own first segments are prefixed, as sent: an encoded one is no route, and the
    # gateway's own paths keep theirs.
    status, raw = http_post(gateway.url + "/%63hat/completions", {"model": "tiny", "messages": []})
    assert status == 404 and orjson.loads(raw)["error"]["code"] == "unknown_url"
    status, raw = http_post(gateway.url + "/v1/v1/chat/completions", {"model": "tiny", "messages": []})
    assert status == 404
    assert http_get(gateway.url + "/healthz")[0] == 200


def test_the_overhead_header_leaves_the_upstream_out(gateway: Proc, sim: Proc) -> None:
    # The simulator waits 300 ms before it answers: x-portcullis-overhead-ms is the gateway's own time only, so it
    # is at least those 300 ms below what the client waited. Streamed, it is told before the first event.
    import time
    import urllib.error
    import urllib.request

    sim_control(sim, ttft_ms=300)
    try:
        for stream in (False, True):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
            req = urllib.request.Request(
                gateway.url + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
            )
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
                waited_ms = (time.perf_counter() - t0) * 1000
                overhead = float(resp.headers["x-portcullis-overhead-ms"])
            assert waited_ms >= 300
            assert 0 <= overhead <= waited_ms - 300, (stream, overhead, waited_ms)
    finally:
        sim_control(sim, ttft_ms=0)
    # Every answer has it, an error too (the whole of its time is the gateway's).
    req = urllib.request.Request(gateway.url + "/v1/models")
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as refused:
        assert refused.code == 401
        assert float(refused.headers["x-portcullis-overhead-ms"]) >= 0
