"""Every error path reaches the `openai` SDK in the OpenAI shape and raises its matching exception."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest
from procs import (
    ADMIN_KEY,
    Proc,
    bind_loopback,
    gateway_config,
    http_get,
    http_post,
    sim_control,
    start_gateway,
    wait_until,
)


@pytest.fixture
def faults(sim: Proc, gateway: Proc) -> Iterator[None]:
    yield
    sim_control(sim, error_rate=0, unavailable_rate=0, drop_rate=0, stream_error_rate=0, loading=False)
    # The prober may have seen the replica warming: wait until the gateway sees it ready again.
    wait_until(lambda: http_get(gateway.url + "/readyz")[0] == 200, what="gateway ready again")


def _shape(raw: bytes) -> dict:
    body = orjson.loads(raw)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"


def test_context_overflow_is_400_context_length_exceeded(client: openai.OpenAI) -> None:
    long_prompt = "word " * 600  # the test simulator has 512 tokens per slot
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_prompt}])
    assert info.value.code == "context_length_exceeded"
    assert "512" in info.value.message


def test_loading_upstream_is_503(client: openai.OpenAI, sim: Proc, faults: None) -> None:
    sim_control(sim, loading=True)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503
    assert info.value.code == "model_loading"
    assert info.value.response.headers.get("retry-after")


def test_upstream_500_is_relayed_in_openai_shape(client: openai.OpenAI, sim: Proc, faults: None) -> None:
    sim_control(sim, error_rate=1.0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 500
    assert _shape(info.value.response.content)["type"] == "server_error"


def test_mid_stream_error_event_raises_in_the_sdk(client: openai.OpenAI, sim: Proc, faults: None) -> None:
    sim_control(sim, stream_error_rate=1.0, fault_after_tokens=2)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=8, stream=True
    )
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk)
    assert "simulated decode failure" in info.value.message
    assert len(got) >= 2  # what came before the error was relayed


def test_dropped_upstream_stream_ends_with_an_error_event(gateway: Proc, sim: Proc, faults: None) -> None:
    sim_control(sim, drop_rate=1.0, fault_after_tokens=2)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "stream": True}
    status, raw = http_post(gateway.url + "/v1/chat/completions", body)
    assert status == 200
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[-1].startswith("data: ")
    last = orjson.loads(events[-1][len("data: ") :])
    assert last["error"]["code"] == "upstream_stream_truncated"
    assert "data: [DONE]" not in events


def test_unreachable_upstream_names_no_address(tmp_path: Path) -> None:
    dead = bind_loopback()  # a port nobody listens on once closed
    url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    gw = start_gateway(gateway_config({"m": [url]}), tmp_path)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code in (502, 503)
        assert "127.0.0.1" not in info.value.message and str(url) not in info.value.response.text
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
            "response_format.type",
        ),
    ],
)
def test_invalid_requests_name_the_field(client: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body=body, cast_to=object)
    assert info.value.body["param"] == param, info.value.body
    assert info.value.body["type"] == "invalid_request_error"


def test_malformed_json_is_400(gateway: Proc) -> None:
    status, raw = http_post(gateway.url + "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400
    assert _shape(raw)["code"] == "invalid_json"


def test_deep_nesting_is_400(gateway: Proc) -> None:
    deep: object = "x"
    for _ in range(40):
        deep = {"a": deep}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "extra": deep}
    status, raw = http_post(gateway.url + "/v1/chat/completions", body)
    assert status == 400
    assert _shape(raw)["code"] == "json_too_deep"


def test_body_over_the_cap_is_413_before_it_is_read(gateway: Proc) -> None:
    """A 100 MB body is refused on its declared length, and a chunked one as soon as it passes the cap."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("content-type", "application/json")
    conn.putheader("authorization", f"Bearer {ADMIN_KEY}")
    conn.putheader("content-length", str(100 * 1024 * 1024))
    conn.endheaders()
    conn.send(b"{" + b" " * 65536)  # far less than declared: the answer must not wait for the rest
    resp = conn.getresponse()
    assert resp.status == 413
    assert _shape(resp.read())["code"] == "request_too_large"
    conn.close()

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(64):  # 4 MiB in all, past the 1 MiB default cap
            yield b"a" * 65536

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=chunks(),
            encode_chunked=True,
            headers={"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"},
        )
        resp = conn.getresponse()
        assert resp.status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed while we were still sending: also a refusal
    conn.close()


def test_wrong_method_and_unknown_path(gateway: Proc) -> None:
    status, raw = http_get(gateway.url + "/v1/chat/completions")
    assert status == 405 and _shape(raw)["code"] == "method_not_allowed"
    status, raw = http_get(gateway.url + "/v1/nothing-here")
    assert status == 404 and _shape(raw)["code"] == "unknown_url"
