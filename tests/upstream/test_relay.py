"""The per-event translation of the SSE relay (the streaming itself is tested end to end)."""

from __future__ import annotations

import orjson

from portcullis.exchange import Exchange
from portcullis.upstream.relay import _sse, _translate


def _ex() -> Exchange:
    return Exchange(route="/v1/chat/completions", task=None, started_at=0.0)


def _chunk(**fields: object) -> bytes:
    return orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "alias.gguf", **fields})


def test_model_name_is_the_clients_and_unknown_fields_survive() -> None:
    ex = _ex()
    chunk, _, done = _translate(
        _chunk(choices=[{"index": 0, "delta": {"content": "hi"}}], timings={"predicted_n": 1}),
        ex,
        model="mine",
        client_wants_usage=False,
    )
    assert chunk is not None
    out = _sse(chunk)
    sent = orjson.loads(out[len(b"data: ") :])
    assert sent["model"] == "mine" and sent["timings"] == {"predicted_n": 1} and not done
    assert out.endswith(b"\n\n")


def test_usage_chunk_is_counted_and_dropped_unless_asked_for() -> None:
    ex = _ex()
    usage = _chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 5})
    chunk, out, done = _translate(usage, ex, model="m", client_wants_usage=False)
    assert chunk is None and out == b"" and not done and (ex.prompt_tokens, ex.completion_tokens) == (3, 5)
    chunk, _, _ = _translate(usage, _ex(), model="m", client_wants_usage=True)
    assert chunk is not None and chunk["usage"]["completion_tokens"] == 5


def test_llama_server_error_event_is_normalised_and_ends_the_stream() -> None:
    ex = _ex()
    raw = orjson.dumps({"error": {"code": 500, "message": "boom", "type": "server_error"}})
    _, out, done = _translate(raw, ex, model="m", client_wants_usage=False)
    err = orjson.loads(out[6:])["error"]
    assert done and err["message"] == "boom" and set(err) == {"message", "type", "param", "code"}


def test_done_and_garbage() -> None:
    assert _translate(b"[DONE]", _ex(), model="m", client_wants_usage=False) == (None, b"data: [DONE]\n\n", True)
    _, out, done = _translate(b"{not json", _ex(), model="m", client_wants_usage=False)
    assert done and b"bad_upstream_answer" in out
