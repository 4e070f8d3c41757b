"""The README's first command, and what the gateway writes about each request."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, start_gateway, wait_until


def test_demo_gateway_chats_and_streams(tmp_path: Path) -> None:
    demo = Proc(["serve", "--demo"], ready_path="/readyz", log_dir=tmp_path, name="demo")
    try:
        wait_until(lambda: "Demo API key" in demo.log(), what="banner with the demo key")
        lines = demo.log().splitlines()
        key = lines[lines.index(next(x for x in lines if x.startswith("Demo API key"))) + 1].strip()
        assert key.startswith("pc-")
        with pytest.raises(openai.AuthenticationError):  # the demo is not open: the key is needed
            openai.OpenAI(base_url=demo.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=demo.url + "/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "Hello"}]
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-ratelimit-limit-requests"] == "600"  # the demo key's tier, premium
        stream = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello"}], stream=True, max_tokens=4
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert client.embeddings.create(model="demo-embed", input="x").data[0].embedding
        routed = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert routed.headers["x-portcullis-route"].startswith("model=demo; router=auto")
        with pytest.raises(openai.BadRequestError) as refused:  # moderated: the simulator plays the guard model
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "How to build a bomb?"}])
        assert refused.value.code == "content_policy_violation"
    finally:
        demo.stop()


def test_one_json_log_line_per_request_without_prompts(sim: Proc, tmp_path: Path) -> None:
    gw = start_gateway(gateway_config({"tiny": [sim.url]}), tmp_path, ready_path="/readyz")
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        secret = "my-secret-prompt-text"
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": secret}], extra_headers={"x-request-id": "req-42"}
        )
        answer = raw.parse().choices[0].message.content
        assert raw.headers["x-request-id"] == "req-42"

        def access_lines() -> list[dict]:
            lines = [orjson.loads(x) for x in gw.log().splitlines() if x.startswith("{")]
            return [x for x in lines if x.get("event") == "request"]

        wait_until(lambda: any(x["request_id"] == "req-42" for x in access_lines()), what="access log line")
        line = next(x for x in access_lines() if x["request_id"] == "req-42")
        assert line["status"] == 200 and line["model"] == "tiny" and line["path"] == "/v1/chat/completions"
        assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0
        assert line["duration_ms"] >= line["upstream_ms"] > 0
        log = gw.log()
        assert secret not in log and answer not in log
    finally:
        gw.stop()


def test_metrics_cover_requests_latency_ttft_overhead_and_replicas(gateway: Proc) -> None:
    from procs import http_get

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "m"}], stream=True))
    status, body = http_get(gateway.url + "/metrics")
    text = body.decode()
    assert status == 200
    for name in (
        'portcullis_requests_total{model="tiny",route="/v1/chat/completions",status="200"}',
        'portcullis_request_duration_seconds_bucket{le="0.005",model="tiny",route="/v1/chat/completions"}',
        'portcullis_upstream_duration_seconds_count{model="tiny"}',
        'portcullis_time_to_first_token_seconds_count{model="tiny"}',
        'portcullis_overhead_seconds_count{route="/v1/chat/completions"}',
        'portcullis_replica_in_flight{model="tiny",replica=',
        'portcullis_replica_slots{model="tiny",replica=',
        'portcullis_replica_state{model="tiny",replica=',
    ):
        assert name in text, name
