"""The compatibility tests against a real llama-server (set LLAMA_SERVER_BIN; see README, Development).

The model is the tiny random-weight GGUF from tiny_gguf.py: its text is noise, so these tests check the
wire (shapes, streaming, usage, model names, errors), not the words. `ignore_eos` (a llama-server field
the gateway forwards untouched) makes lengths exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from llama_proc import serve_llama
from procs import ADMIN_KEY, Proc, gateway_config, http_get, start_gateway

LLAMA_BIN = os.environ.get("LLAMA_SERVER_BIN")
pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(not LLAMA_BIN, reason="LLAMA_SERVER_BIN is not set (a real llama-server is optional)"),
]
SLOTS = 2  # as llama_proc.serve_llama starts it


@pytest.fixture(scope="module")
def llama(module_tmp: Path) -> Iterator[str]:
    yield from serve_llama(module_tmp)


@pytest.fixture(scope="module")
def gw(llama: str, module_tmp: Path) -> Iterator[Proc]:
    gw = start_gateway(gateway_config({"tiny": [llama]}), module_tmp, ready_path="/readyz")
    yield gw
    gw.stop()


def test_slots_learned_from_props(gw: Proc) -> None:
    _, text = http_get(gw.url + "/metrics")
    line = next(x for x in text.decode().splitlines() if x.startswith('portcullis_replica_slots{model="tiny"'))
    assert float(line.split()[-1]) == SLOTS


def test_chat_non_stream(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.model == "tiny" and r.object == "chat.completion"
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.model_extra.get("timings")  # llama-server's timings pass through


def test_chat_stream_with_and_without_usage(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "stream": True,
        "extra_body": {"ignore_eos": True},
    }
    plain = list(client.chat.completions.create(**kwargs))
    assert plain and all(c.choices for c in plain) and all(c.model == "tiny" for c in plain)
    with_usage = list(client.chat.completions.create(**kwargs, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 4


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.model == "tiny" and r.usage.completion_tokens == 3
    chunks = list(
        client.completions.create(
            model="tiny", prompt="abc", max_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert chunks and all(c.model == "tiny" for c in chunks)


def test_context_overflow_is_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 2000}])
    assert info.value.code == "context_length_exceeded"


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_the_gateway_queues_what_llama_server_would_queue_silently(llama: str, gw: Proc) -> None:
    """More concurrent requests than slots: llama-server never defers one (its silent queue stays
    empty, per its own /metrics); the surplus waits in the gateway's queue and every stream completes."""
    import asyncio
    import threading

    import aiohttp
    from load import call

    deferred: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            _, text = http_get(llama + "/metrics", timeout=2)
            for line in text.decode().splitlines():
                if line.startswith("llamacpp:requests_deferred"):
                    deferred.append(float(line.split()[-1]))
            done.wait(0.01)

    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 48,
        "stream": True,
        "ignore_eos": True,
    }

    async def run() -> list:
        async with aiohttp.ClientSession() as s:
            return list(await asyncio.gather(*(call(s, gw.url, body, limit_s=60) for _ in range(4 * SLOTS))))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = asyncio.run(run())
    finally:
        done.set()
        sampler.join()
    assert all(r.status == 200 and r.stream_complete and r.stream_error is None for r in results)
    assert sum("x-portcullis-queue-wait-ms" in r.headers for r in results) >= 2 * SLOTS
    assert deferred and max(deferred) == 0


def test_context_fit_learns_the_tokenizer_and_asks_tokenize_near_the_limit(gw: Proc) -> None:
    """512 tokens per slot; the tiny model's vocabulary is bytes, so 300 characters are ~300 tokens, not
    the ~75 a 4-characters-per-token estimate says. Once the model has answered one long enough prompt, the
    gateway estimates with its real tokens per byte, sees 300 + max_tokens 300 is close to 512, counts with
    llama-server's /tokenize, and refuses before any upstream call (no attempt was made)."""
    import aiohttp
    import orjson

    async def ask(content: str, max_tokens: int) -> tuple[int, dict[str, str], dict]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        async with aiohttp.ClientSession() as s:
            async with s.post(
                gw.url + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            ) as r:
                return r.status, dict(r.headers), await r.json()

    import asyncio

    status, _, _ = asyncio.run(ask("z" * 300, 4))  # teaches the gateway this model's tokens per byte
    assert status == 200
    status, headers, answer = asyncio.run(ask("y" * 300, 300))
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert answer["error"]["message"].startswith("This model's maximum context length is 512 tokens")
    assert "x-portcullis-attempts" not in {k.lower() for k in headers}
