"""Traces: the request's span and one per stage, checked with an in-memory exporter on a gateway served by
uvicorn in this process; and the real OTLP export of a gateway process, received by a collector stand-in."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from procs import ADMIN_KEY, KEY_SECRET, Proc, bind_loopback, gateway_config, start_gateway, wait_until

from portcullis.app import Gateway
from portcullis.config import build_config
from portcullis.obs.tracing import Tracing

STAGES = ["authenticate", "validate", "route", "quota", "moderation", "cache", "queue", "upstream"]


class InProcessGateway:
    """A Gateway served by uvicorn on a loopback port in a thread of this process (so its spans are visible)."""

    def __init__(self, config: dict[str, Any], exporter: InMemorySpanExporter) -> None:
        self.gateway = Gateway(build_config(config, source="(test)", environ={}))
        self.gateway.tracing = Tracing(self.gateway.config.tracing, exporter=exporter)
        sock = bind_loopback()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.gateway, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)

    def __enter__(self) -> InProcessGateway:
        self.thread.start()
        wait_until(lambda: self.server.started, what="the in-process gateway")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def traced(sim: Proc, module_tmp: Path) -> Iterator[tuple[InProcessGateway, InMemorySpanExporter]]:
    mp = pytest.MonkeyPatch()
    mp.setenv("PORTCULLIS_KEY_SECRET", KEY_SECRET)
    mp.setenv("PORTCULLIS_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY)
    cfg = gateway_config({"tiny": [sim.url]}, tracing={"enabled": True})
    cfg["store"]["database_url"] = f"sqlite+aiosqlite:///{module_tmp}/traced.db"
    exporter = InMemorySpanExporter()
    with InProcessGateway(cfg, exporter) as gw:
        yield gw, exporter
    mp.undo()


def _spans_of(exporter: InMemorySpanExporter, request_id: str) -> tuple[Any, list[Any]]:
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.attributes.get("portcullis.request_id") == request_id)
    family = [s for s in spans if s.context.trace_id == root.context.trace_id and s is not root]
    return root, sorted(family, key=lambda s: s.start_time)


def test_a_request_and_each_stage_are_spans(traced: tuple[InProcessGateway, InMemorySpanExporter]) -> None:
    gw, exporter = traced
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        stream=True,
        extra_headers={"x-request-id": "traced-1"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    wait_until(
        lambda: any(s.attributes.get("portcullis.request_id") == "traced-1" for s in exporter.get_finished_spans())
    )
    root, family = _spans_of(exporter, "traced-1")
    assert root.name == "POST /v1/chat/completions" and root.kind is SpanKind.SERVER
    attrs = root.attributes
    assert attrs["http.response.status_code"] == 200 and attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "tiny" and attrs["gen_ai.response.model"] == "tiny"
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["portcullis.stream"] is True and attrs["portcullis.time_to_first_token_ms"] > 0
    stages = [s for s in family if s.parent.span_id == root.context.span_id]
    assert [s.name for s in stages] == STAGES
    for before, after in itertools.pairwise(stages):  # one after another, each ending as the next begins
        assert before.end_time == after.start_time
    assert root.start_time <= stages[0].start_time and stages[-1].end_time <= root.end_time
    upstream = stages[-1]
    (attempt,) = [s for s in family if s.parent.span_id == upstream.context.span_id]
    assert attempt.name == "upstream.attempt" and attempt.kind is SpanKind.CLIENT
    assert attempt.attributes["portcullis.replica"] and attempt.attributes["portcullis.time_to_first_token_ms"] > 0


def test_the_clients_trace_is_continued(traced: tuple[InProcessGateway, InMemorySpanExporter]) -> None:
    gw, exporter = traced
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "x-request-id": "traced-2"},
    )
    wait_until(
        lambda: any(s.attributes.get("portcullis.request_id") == "traced-2" for s in exporter.get_finished_spans())
    )
    root, _ = _spans_of(exporter, "traced-2")
    assert format(root.context.trace_id, "032x") == trace_id and format(root.parent.span_id, "016x") == parent_id


def test_a_failed_attempt_and_an_error_are_marked(
    traced: tuple[InProcessGateway, InMemorySpanExporter], sim: Proc
) -> None:
    gw, exporter = traced
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}], extra_headers={"x-request-id": "traced-3"}
        )
    wait_until(
        lambda: any(s.attributes.get("portcullis.request_id") == "traced-3" for s in exporter.get_finished_spans())
    )
    root, family = _spans_of(exporter, "traced-3")
    assert root.attributes["http.response.status_code"] == 404 and root.attributes["error.type"] == "model_not_found"
    assert [s.name for s in family] == ["authenticate", "validate", "route"]  # refused at the route stage


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def test_otlp_export_from_a_gateway_process_and_the_trace_id_in_its_log(sim: Proc, tmp_path: Path) -> None:
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    cfg = gateway_config(
        {"tiny": [sim.url]}, tracing={"enabled": True, "endpoint": endpoint, "service_name": "pc-test"}
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            extra_headers={"x-request-id": "otlp-1"},
        )
        wait_until(lambda: '"request_id":"otlp-1"' in gw.log().replace(" ", ""), what="the access line")
        gw.signal(signal.SIGTERM)  # a graceful shutdown flushes the spans still batched
        assert gw.wait(30) == 0
        log = gw.log()
    finally:
        gw.stop()
    line = next(
        orjson.loads(x) for x in log.splitlines() if '"otlp-1"' in x and '"event":"request"' in x.replace(" ", "")
    )
    spans = []
    for body in _Collector.received:
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            for scope in resource.scope_spans:
                spans += [(service, s) for s in scope.spans]
    ours = [(svc, s) for svc, s in spans if s.trace_id.hex() == line["trace_id"]]
    assert {s.name for _, s in ours} >= {"POST /v1/chat/completions", "upstream", "upstream.attempt"}
    assert {svc for svc, _ in ours} == {"pc-test"}
    collector.shutdown()


def test_tracing_is_off_by_default_and_the_log_says_so(gateway: Proc) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        extra_headers={"x-request-id": "untraced"},
    )
    wait_until(lambda: '"untraced"' in gateway.log())
    line = next(orjson.loads(x) for x in gateway.log().splitlines() if '"untraced"' in x and "duration_ms" in x)
    assert line["trace_id"] is None
