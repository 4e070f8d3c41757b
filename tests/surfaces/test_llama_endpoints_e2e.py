"""llama.cpp's own endpoints and rerank through the gateway: /completion and /infill natively (a simulator that
answers them, as llama-server does) and translated to /v1/completions (one that does not), streamed and not, with
their usage charged; /tokenize, /detokenize, /apply-template and GET /props answered for the model named; rerank;
what changes a server refused."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from procs import (
    ADMIN_KEY,
    Proc,
    create_key,
    gateway_config,
    http_get,
    http_post,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)

MODES = ["nat", "tr"]


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[dict[str, Proc]]:
    native = start_sim("--model-alias", "native.gguf", log_dir=module_tmp)
    off = start_sim("--model-alias", "old.gguf", "--no-native", log_dir=module_tmp)
    mail = start_sim("--model-alias", "mail.gguf", "--reply", "write to bob@example.com today", log_dir=module_tmp)
    yield {"native": native, "off": off, "mail": mail}
    for proc in (native, off, mail):
        proc.stop()


@pytest.fixture(scope="module")
def gw(sims: dict[str, Proc], module_tmp: Path) -> Iterator[Proc]:
    price = {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}
    cfg = gateway_config(
        {
            "nat": [{"url": sims["native"].url, "cost": price}],
            "tr": [{"url": sims["off"].url, "cost": price}],
            "remote": [{"url": sims["native"].url, "kind": "openai"}],
            "guarded": [sims["mail"].url],
        },
        cache={"enabled": False},
        quota={"usage": {"flush_interval_s": 0.1}},
        moderation={"moderators": {"pii": {"kind": "rules", "pii": {"email": "redact"}}}},
    )
    cfg["models"]["guarded"]["moderation"] = {"input": [], "output": ["pii"]}
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def _post(gw: Proc, path: str, body: dict[str, Any], key: str = ADMIN_KEY) -> tuple[int, Any]:
    status, raw = http_post(gw.url + path, body, headers={"authorization": f"Bearer {key}"})
    return status, orjson.loads(raw)


def _stream(gw: Proc, path: str, body: dict[str, Any]) -> list[bytes]:
    request = urllib.request.Request(
        gw.url + path,
        data=orjson.dumps({**body, "stream": True}),
        headers={"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[6:].strip() for line in r if line.startswith(b"data: ")]


@pytest.mark.parametrize("model", MODES)
def test_completion_and_infill(gw: Proc, sims: dict[str, Proc], model: str) -> None:
    before = sim_stats(sims["native"])["native"]
    status, answer = _post(gw, "/completion", {"model": model, "prompt": "Once upon a time", "n_predict": 4})
    assert status == 200, answer
    assert answer["content"] and answer["stop"] is True and answer["model"] == model
    assert answer["tokens_predicted"] == 4 and answer["stop_type"] == "limit"
    events = [orjson.loads(e) for e in _stream(gw, "/completion", {"model": model, "prompt": "Once", "n_predict": 3})]
    assert [e["stop"] for e in events] == [False, False, False, True]  # llama.cpp's stream: no [DONE]
    assert "".join(e["content"] for e in events) and events[-1]["tokens_predicted"] == 3
    status, filled = _post(
        gw, "/infill", {"model": model, "input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "n_predict": 5}
    )
    assert status == 200, filled
    assert filled["content"] and filled["tokens_predicted"] == 5
    assert sim_stats(sims["native"])["native"] - before == (3 if model == "nat" else 0)


def test_completion_usage_is_charged_as_reported(gw: Proc) -> None:
    key = create_key(gw)
    status, answer = _post(gw, "/completion", {"model": "nat", "prompt": "Count the sheep", "n_predict": 6}, key["key"])
    assert status == 200

    def row() -> dict[str, Any] | None:
        code, body = http_get(gw.url + f"/admin/usage?group_by=key&key_id={key['id']}")
        rows = orjson.loads(body)["data"] if code == 200 else []
        return rows[0] if rows else None

    wait_until(lambda: row() is not None, what="the usage record")
    recorded = row()
    assert recorded is not None
    assert (recorded["prompt_tokens"], recorded["completion_tokens"]) == (
        answer["tokens_evaluated"],
        answer["tokens_predicted"],
    )


def test_tokenizer_template_and_props(gw: Proc) -> None:
    status, tokens = _post(gw, "/tokenize", {"model": "nat", "content": "hello world"})
    assert status == 200 and len(tokens["tokens"]) == 2
    status, text = _post(gw, "/detokenize", {"model": "nat", "tokens": tokens["tokens"]})
    assert status == 200 and text["content"] == "hello world"
    status, templated = _post(gw, "/apply-template", {"model": "nat", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and "hi" in templated["prompt"]
    status, props = http_get(gw.url + "/props?model=nat", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200
    shown = orjson.loads(props)
    assert shown["total_slots"] == 4 and shown["model_alias"] == "nat" and "model_path" not in shown
    # A model on a backend that is not a llama-server has no tokenizer endpoint here: a clear 404.
    status, missing = _post(gw, "/tokenize", {"model": "remote", "content": "x"})
    assert status == 404 and missing["error"]["code"] == "endpoint_not_available"


def test_rerank(gw: Proc) -> None:
    body = {"model": "nat", "query": "quick fox", "documents": ["a lazy dog", "the quick brown fox", "hills"]}
    for path in ("/v1/rerank", "/rerank"):
        status, ranked = _post(gw, path, {**body, "top_n": 2})
        assert status == 200, ranked
        assert [r["index"] for r in ranked["results"]] == [1, 0] and ranked["model"] == "nat"
        assert ranked["usage"]["prompt_tokens"] > 0
    status, bad = _post(gw, "/v1/rerank", {"model": "nat", "query": "x", "documents": []})
    assert status == 400 and bad["error"]["param"] == "documents"


def test_what_changes_a_server_is_refused(gw: Proc) -> None:
    for method, path in (("POST", "/props"), ("GET", "/slots"), ("POST", "/slots/0"), ("POST", "/lora-adapters")):
        request = urllib.request.Request(
            gw.url + path, data=b"{}" if method == "POST" else None, method=method,
            headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403 and orjson.loads(refused.value.read())["error"]["code"] == "endpoint_blocked"
    # A key without tokens:read may not tokenize.
    plain = create_key(gw, scopes=["chat:write"])
    status, refused = _post(gw, "/tokenize", {"model": "nat", "content": "x"}, plain["key"])
    assert status == 403


def test_native_streams_are_not_held_against_the_replica(gw: Proc) -> None:
    """A native stream ends with its API's own last event, not [DONE]: that is a whole answer, never a failure for
    the replica's breaker (it opened after five native Messages streams once)."""
    for _ in range(3):
        _stream(gw, "/completion", {"model": "nat", "prompt": "x", "n_predict": 2})
        _stream(gw, "/v1/messages", {"model": "nat", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
        _stream(gw, "/v1/responses", {"model": "nat", "input": "x", "max_output_tokens": 2})
    status, raw = http_get(gw.url + "/admin/backends", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200
    nat = next(m for m in orjson.loads(raw)["data"] if m["model"] == "nat")
    breaker = nat["replicas"][0]["breaker"]
    assert breaker["state"] == "closed" and breaker["failures_in_window"] == 0, breaker


def test_one_prompt_and_one_completion_per_request(gw: Proc) -> None:
    """llama-server answers several prompts (or n > 1) with an array that nothing here could meter or moderate:
    refused, with the endpoint that takes several named."""
    status, refused = _post(gw, "/completion", {"model": "nat", "prompt": ["a", "b"], "n_predict": 4})
    assert status == 400 and refused["error"]["param"] == "prompt" and "/v1/completions" in refused["error"]["message"]
    status, refused = _post(gw, "/completion", {"model": "nat", "prompt": "a", "n": 2})
    assert status == 400 and refused["error"]["param"] == "n"
    status, ids = _post(gw, "/completion", {"model": "nat", "prompt": [1, 2, 3], "n_predict": 2})
    assert status == 200 and ids["tokens_predicted"] == 2  # token ids are one prompt


def test_redacted_text_takes_its_token_details_along(gw: Proc) -> None:
    """What the guard changed is not told by the token probabilities llama-server sends beside it."""
    status, answer = _post(gw, "/completion", {"model": "guarded", "prompt": "mail?", "n_predict": 20, "n_probs": 2})
    assert status == 200
    assert "bob@example.com" not in orjson.dumps(answer).decode()
    assert "completion_probabilities" not in answer
    status, plain = _post(gw, "/completion", {"model": "nat", "prompt": "hi", "n_predict": 3, "n_probs": 2})
    assert status == 200 and len(plain["completion_probabilities"]) == 3  # unchanged text keeps them


def test_what_reaches_the_tokenizer_is_held_to_the_request_limits(gw: Proc) -> None:
    internal = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}
    status, refused = _post(
        gw, "/apply-template", {"model": "nat", "messages": [{"role": "user", "content": [internal]}]}
    )
    assert status == 400 and refused["error"]["code"] == "url_not_allowed", refused
    status, refused = _post(gw, "/detokenize", {"model": "nat", "tokens": [1, 70000]})
    assert status == 400 and refused["error"]["param"] == "tokens"  # past the model's vocabulary (n_vocab)
    status, refused = _post(gw, "/tokenize", {"model": "nat", "content": 5})
    assert status == 400 and refused["error"]["param"] == "content"
