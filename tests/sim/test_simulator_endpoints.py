"""The simulator's llama-server surface, in process (it is the upstream of every other test)."""

from __future__ import annotations

from typing import Any

import orjson

from portcullis.sim.simulator import SimSettings, Simulator, tokenize


async def _call(app: Simulator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []
    payload = orjson.dumps(body) if body is not None else b""
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        return sent[0]["status"], orjson.loads(raw)
    except orjson.JSONDecodeError:
        return sent[0]["status"], raw.decode()


async def test_props_slots_metrics_tokenize() -> None:
    sim = Simulator(SimSettings(slots=3, n_ctx=256))
    status, props = await _call(sim, "GET", "/props")
    assert status == 200 and props["total_slots"] == 3 and props["default_generation_settings"]["n_ctx"] == 256
    _, slots = await _call(sim, "GET", "/slots")
    assert [s["id"] for s in slots] == [0, 1, 2] and not any(s["is_processing"] for s in slots)
    _, metrics = await _call(sim, "GET", "/metrics")
    assert "llamacpp:prompt_tokens_total" in metrics and "llamacpp:requests_deferred" in metrics
    _, tokens = await _call(sim, "POST", "/tokenize", {"content": "Hello, world"})
    assert tokens["tokens"] == tokenize("Hello, world") and len(tokens["tokens"]) == 3


async def test_loading_phase_answers_like_llama_server() -> None:
    sim = Simulator(SimSettings(loading_s=60))
    status, body = await _call(sim, "GET", "/health")
    assert status == 503 and body["error"]["message"] == "Loading model"


async def test_context_overflow_error_matches_llama_server() -> None:
    sim = Simulator(SimSettings(n_ctx=16))
    status, body = await _call(
        sim, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 20}]}
    )
    assert status == 400
    assert body["error"]["type"] == "exceed_context_size_error" and body["error"]["n_ctx"] == 16
