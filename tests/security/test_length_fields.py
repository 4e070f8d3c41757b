"""Issue 17, point 6: an answer's length cannot be stretched past the gateway's limits with fields the
gateway does not check but the backend obeys.

llama-server reads the length from n_predict, else max_completion_tokens, else max_tokens, ignores a
value of the wrong type (a string: its own default, unlimited), takes n_cmpl for n, and answers each prompt
of a /v1/completions list as a request of its own. The simulator obeys lengths the same way, and echoes the
body it received (`echo_request`), so each test sees what was forwarded. Against a real gateway process:
`sim` (answers of 150..300 tokens unless told fewer) behind `gw` (max_tokens_ceiling 16, max_total_chars
2000, the default max_choices 8), and `slow` (300 ms to first token) behind `gw_slow` (no ceiling,
degradation capping lengths at 3, a 16-token default reservation).
"""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_post, new_key, sim_control, start_gateway, start_sim, wait_until

CEILING = 16
MAX_CHARS = 2000
DEGRADE_CAP = 3
MSG = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "4", "--n-ctx", "4096", "--default-max-tokens", "300", log_dir=module_tmp)
    sim_control(proc, echo_request=True)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config({"tiny": [sim.url]}, validation={"max_tokens_ceiling": CEILING, "max_total_chars": MAX_CHARS})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def slow(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "4", "--ttft-ms", "300", "--default-max-tokens", "300", log_dir=module_tmp)
    sim_control(proc, echo_request=True)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw_slow(slow: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"tiny": [slow.url]},
        quota={"default_max_tokens": 16},
        admission={"degrade": {"ttft_p95_s": 0.2, "window_s": 60, "min_samples": 3, "max_tokens": DEGRADE_CAP}},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def post(gw: Proc, body: dict[str, Any], *, path: str = "/v1/chat/completions", key: str = ADMIN_KEY) -> Any:
    """(status, parsed body, headers)."""
    req = urllib.request.Request(
        gw.url + path,
        data=orjson.dumps(body),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, orjson.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read()), exc.headers


def chat(**extra: Any) -> dict[str, Any]:
    # Not temperature 0: a deterministic request may be answered from the cache, never reaching the sim.
    return {"model": "tiny", "messages": MSG, **extra}


def refused(status: int, body: dict[str, Any], param: str, code: str) -> None:
    # What came back when it was not refused says how far the old build let it go.
    usage = body.get("usage") if isinstance(body, dict) else None
    assert status == 400, f"not refused: {status}, usage {usage}, forwarded {body.get('sim_request', {})}"
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    assert body["error"]["type"] == "invalid_request_error"


def test_n_predict_cannot_pass_the_ceiling(gw: Proc) -> None:
    status, body, _ = post(gw, chat(n_predict=3000))
    refused(status, body, "n_predict", "max_tokens_too_large")
    assert str(CEILING) in body["error"]["message"]


def test_completions_max_completion_tokens_cannot_pass_the_ceiling(gw: Proc) -> None:
    # /v1/completions has no max_completion_tokens in OpenAI's schema; llama-server obeys it there too.
    body = {"model": "tiny", "prompt": "Once upon a time", "max_completion_tokens": 3000}
    status, answer, _ = post(gw, body, path="/v1/completions")
    refused(status, answer, "max_completion_tokens", "max_tokens_too_large")


def test_every_forwarded_length_field_holds_the_checked_value(gw: Proc) -> None:
    status, body, _ = post(gw, chat(max_tokens=8, n_predict=3000))
    assert status == 200, body
    sent = body["sim_request"]
    assert (sent.get("max_tokens"), sent.get("n_predict")) == (8, 8), sent
    assert body["usage"]["completion_tokens"] <= 8


def test_a_request_without_a_length_is_held_to_the_ceiling(gw: Proc) -> None:
    # The backend's own default is no limit (llama-server: n_predict -1): omitting the field was a bypass.
    status, body, _ = post(gw, chat())
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= CEILING, body["usage"]
    assert body["sim_request"].get("max_tokens") == CEILING


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "8"),  # llama-server ignores a string: unlimited
        ("max_tokens", True),
        ("max_tokens", 8.0),
        ("max_completion_tokens", "8"),
        ("n_predict", "3000"),
        ("n_predict", -1),  # llama-server: no limit
        ("n_predict", True),
    ],
)
def test_a_length_that_is_not_a_positive_integer_is_refused(gw: Proc, field: str, value: Any) -> None:
    status, body, _ = post(gw, chat(**{field: value}))
    assert status == 400, f"not refused: {status}, usage {body.get('usage')}, forwarded {body.get('sim_request')}"
    assert body["error"]["param"] == field, body
    assert body["error"]["code"] in ("invalid_type", "invalid_value"), body


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "n", 9),
        ("/v1/chat/completions", "n_cmpl", 50),  # llama-server's n, which wins over n there
        ("/v1/completions", "best_of", 1000),
        ("/v1/completions", "n", "2"),
    ],
)
def test_choices_are_bounded(gw: Proc, path: str, field: str, value: Any) -> None:
    chat_path = path.endswith("chat/completions")
    base = chat(max_tokens=4) if chat_path else {"model": "tiny", "prompt": "x", "max_tokens": 4}
    status, body, _ = post(gw, {**base, field: value}, path=path)
    assert status == 400, f"not refused: {status}, forwarded {body.get('sim_request')}"
    assert body["error"]["param"] == field, body
    assert body["error"]["code"] in ("too_many_choices", "invalid_value", "invalid_type"), body


def test_n_and_n_cmpl_are_forwarded_as_one_count(gw: Proc) -> None:
    status, body, _ = post(gw, chat(max_tokens=4, n=1, n_cmpl=8))
    assert status == 200, body
    assert (body["sim_request"].get("n"), body["sim_request"].get("n_cmpl")) == (1, 1), body["sim_request"]


def over_limit(status: int, body: dict[str, Any], completion: int) -> None:
    assert status == 400, f"admitted: {status}, usage {body.get('usage')}"
    assert body["error"]["code"] == "tokens_exceed_limit", body
    assert f"{completion} for the completion" in body["error"]["message"], body


def test_n_cmpl_alone_is_reserved_like_n(gw: Proc) -> None:
    # 8 choices of 16 tokens: 128 completion tokens against a key allowed 100 a minute. llama-server obeys
    # n_cmpl as n, so given alone it must be reserved as 8 answers, not as the one a request without n gets.
    key = new_key(gw, limits={"tokens": {"minute": 100}})
    for field in ("n", "n_cmpl"):
        status, body, _ = post(gw, chat(max_tokens=CEILING, **{field: 8}), key=key)
        over_limit(status, body, 8 * CEILING)
    # The control: one answer fits.
    status, body, _ = post(gw, chat(max_tokens=CEILING, n_cmpl=1), key=key)
    assert status == 200, body


def _completion(prompt: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 4, **extra}


@pytest.mark.parametrize(
    "body",
    [
        _completion(["x"] * 9),  # nine prompts, one answer each
        _completion([[1, 2, 3]] * 9),  # the same as lists of token ids
        _completion(["x"] * 3, n=3),
        _completion(["x"] * 3, n_cmpl=3),
        _completion(["x"] * 2, best_of=5),
        _completion(["x"] * 1000),
    ],
)
def test_every_prompt_of_a_completion_counts_toward_max_choices(gw: Proc, body: dict[str, Any]) -> None:
    # llama-server answers each prompt of a list as a request of its own, with its own n choices.
    status, answer, _ = post(gw, body, path="/v1/completions")
    refused(status, answer, "prompt", "too_many_choices")


def test_prompts_within_max_choices_pass(gw: Proc) -> None:
    for body in (_completion(["x"] * 4, n=2), _completion([[1, 2], [3, 4]] * 4), _completion([1, 2, 3], n=8)):
        status, answer, _ = post(gw, body, path="/v1/completions")
        assert status == 200, (body, answer)


def test_the_reservation_counts_every_prompt(gw: Proc) -> None:
    # Eight prompts of up to 16 tokens each: 128 completion tokens against a key allowed 100 a minute.
    key = new_key(gw, limits={"tokens": {"minute": 100}})
    for prompt in (["once upon a time"] * 8, [[1, 2, 3]] * 8):
        status, body, _ = post(gw, _completion(prompt, max_tokens=CEILING), key=key, path="/v1/completions")
        over_limit(status, body, 8 * CEILING)
    status, body, _ = post(gw, _completion(["once upon a time"], max_tokens=CEILING), key=key, path="/v1/completions")
    assert status == 200, body


@pytest.mark.parametrize(
    "prompt",
    [
        [7] * (MAX_CHARS + 1),  # one prompt of token ids
        [[7] * (MAX_CHARS // 2 + 1)] * 2,  # two of them, together past the bound
        ["x" * (MAX_CHARS // 2 + 1)] * 2,  # strings, for comparison (refused before too)
    ],
)
def test_token_id_prompts_count_toward_the_input_bound(gw: Proc, prompt: Any) -> None:
    status, answer, _ = post(gw, _completion(prompt), path="/v1/completions")
    refused(status, answer, "prompt", "prompt_too_long")


def test_the_reservation_counts_the_native_length(gw_slow: Proc) -> None:
    # A key allowed 500 tokens a minute: n_predict 3000 must be reserved as 3000, not as the 16-token
    # default that a request without max_tokens gets.
    status, raw = http_post(
        gw_slow.url + "/admin/keys",
        {"user": f"u-{secrets.token_hex(4)}", "tier": "enterprise", "limits": {"tokens": {"minute": 500}}},
    )
    assert status == 201, raw
    key = orjson.loads(raw)["key"]
    status, body, _ = post(gw_slow, chat(n_predict=3000), key=key)
    usage = body.get("usage")
    assert status == 400, f"admitted: {status}, usage {usage}"
    assert body["error"]["code"] == "tokens_exceed_limit", body
    assert "3000 for the completion" in body["error"]["message"], body


def test_degradation_caps_the_native_length_too(gw_slow: Proc) -> None:
    # Three streamed samples of a ~300 ms first token make the model slow (threshold 0.2 s); the p95 is
    # re-evaluated once a second, so poll until a request comes back degraded.
    for _ in range(3):
        status, _raw = http_post(gw_slow.url + "/v1/chat/completions", chat(max_tokens=2, stream=True))
        assert status == 200
    seen: dict[str, Any] = {}

    def degraded() -> bool:
        status, body, headers = post(gw_slow, chat(n_predict=50))
        assert status == 200, body
        seen.update(body=body, header=headers.get("x-portcullis-degraded"))
        return seen["header"] is not None

    wait_until(degraded, timeout=15, interval=0.1, what="a degraded answer")
    assert seen["header"] == f"max_tokens={DEGRADE_CAP}"
    sent = seen["body"]["sim_request"]
    assert sent.get("n_predict") == DEGRADE_CAP, f"forwarded {sent}, usage {seen['body']['usage']}"
    assert seen["body"]["usage"]["completion_tokens"] <= DEGRADE_CAP
