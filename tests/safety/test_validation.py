from __future__ import annotations

import orjson
import pytest

from portcullis.config import ValidationLimits
from portcullis.errors import InvalidRequest
from portcullis.safety.validation import parse_json_object, validate_chat, validate_completion, validate_embedding

LIMITS = ValidationLimits(
    max_messages=3, max_message_chars=10, max_total_chars=15, max_tokens_ceiling=100, max_json_depth=8
)


def _chat(**extra: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_limits_name_the_field() -> None:
    cases = [
        (_chat(messages=[{"role": "user", "content": "x"}] * 4), "messages", "too_many_messages"),
        (_chat(messages=[{"role": "user", "content": "x" * 11}]), "messages[0].content", "message_too_long"),
        (
            _chat(messages=[{"role": "user", "content": "x" * 8}, {"role": "user", "content": "y" * 8}]),
            "messages",
            "messages_too_long",
        ),
        (_chat(max_tokens=101), "max_tokens", "max_tokens_too_large"),
        (_chat(max_completion_tokens=101), "max_completion_tokens", "max_tokens_too_large"),
    ]
    for body, param, code in cases:
        with pytest.raises(InvalidRequest) as info:
            validate_chat(body, LIMITS)
        assert (info.value.param, info.value.code) == (param, code)


def test_text_parts_count_toward_the_limits() -> None:
    body = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 11}]}])
    with pytest.raises(InvalidRequest) as info:
        validate_chat(body, LIMITS)
    assert info.value.param == "messages[0].content"


def test_all_roles_tool_calls_and_options_validate() -> None:
    body = _chat(
        messages=[
            {"role": "system", "content": "s"},
            {"role": "developer", "content": "d"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
        ],
        stop=["\n"],
        seed=7,
        n=2,
        temperature=0,
        top_p=1,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        stream=True,
        stream_options={"include_usage": True},
    )
    chat = validate_chat(body, LIMITS)
    assert [m.role for m in chat.messages] == ["system", "developer", "assistant"]


def test_assistant_needs_content_or_tool_calls() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_chat(_chat(messages=[{"role": "assistant"}]), LIMITS)
    assert info.value.param == "messages[0]"


def test_nul_bytes_stripped_everywhere_and_depth_capped() -> None:
    raw = orjson.dumps({"model": "m\u0000", "messages": [{"role": "user", "content": "a\u0000b"}], "x": ["\u0000"]})
    obj = parse_json_object(raw, LIMITS)
    assert obj["model"] == "m" and obj["messages"][0]["content"] == "ab" and obj["x"] == [""]
    deep: object = 1
    for _ in range(8):
        deep = [deep]
    with pytest.raises(InvalidRequest) as info:
        parse_json_object(orjson.dumps({"d": deep}), LIMITS)
    assert info.value.code == "json_too_deep"


@pytest.mark.parametrize("raw", [b"", b"[1, 2]", b"{", b"nope"])
def test_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_json_object(raw, LIMITS)
    assert info.value.code == "invalid_json"


def test_completion_and_embedding_requests() -> None:
    assert validate_completion({"model": "m", "prompt": [1, 2, 3]}, LIMITS).prompt == [1, 2, 3]
    with pytest.raises(InvalidRequest) as info:
        validate_completion({"model": "m"}, LIMITS)
    assert info.value.param == "prompt"
    assert validate_embedding({"model": "m", "input": ["a", "b"]}, LIMITS).input == ["a", "b"]
    with pytest.raises(InvalidRequest) as info:
        validate_embedding({"model": "m", "input": []}, LIMITS)
    assert info.value.param == "input"


def test_lengths_become_one_value_in_every_field_given() -> None:
    body = _chat(max_tokens=50, n_predict=3000)
    assert validate_chat(body, LIMITS).max_tokens == 50
    assert (body["max_tokens"], body["n_predict"]) == (50, 50)
    native_only = _chat(n_predict=7)
    assert validate_chat(native_only, LIMITS).max_tokens == 7 and native_only["max_tokens"] == 7
    newer_only = _chat(max_completion_tokens=9)
    validate_chat(newer_only, LIMITS)
    assert "max_tokens" not in newer_only  # never both OpenAI fields where the client sent one
    unasked = _chat()
    assert validate_chat(unasked, LIMITS).max_tokens == 100 and unasked["max_tokens"] == 100  # the ceiling
    both = _chat(n=3, n_cmpl=2)
    assert validate_chat(both, LIMITS).n == 2 and (both["n"], both["n_cmpl"]) == (2, 2)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"n_predict": 8.0}, "n_predict"),
        ({"n_predict": -1}, "n_predict"),
        ({"n_predict": 101}, "n_predict"),
        ({"n": 9}, "n"),
        ({"best_of": 1000}, "best_of"),
    ],
)
def test_lengths_and_counts_are_strict(extra: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_chat(_chat(**extra), LIMITS)
    assert info.value.param == param


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1", "2130706433", "0x7f.1", "017700000001", "::1", "::ffff:10.0.0.1", "2002:a9fe:a9fe::",
     "169.254.169.254", "100.64.0.1", "fd00::1", "fe80::1", "0", "localhost", "a.localhost", "metadata.internal"],
)  # fmt: skip
def test_internal_hosts_in_every_spelling(host: str) -> None:
    from portcullis.safety.validation import internal_host

    assert internal_host(host), host


def test_public_hosts_are_not_internal() -> None:
    from portcullis.safety.validation import internal_host

    for host in ("images.example.com", "8.8.8.8", "2606:4700::1111", "cafe.bad"):
        assert internal_host(host) is None, host
