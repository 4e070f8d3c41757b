"""OpenTelemetry traces: a span for each request and one for each stage it passes, exported over OTLP.

Off by default and then free: nothing is imported and `Exchange.trace` stays None, so every stage pays
one attribute test. On, a request gets a server span (`POST /v1/chat/completions`, continuing the
client's W3C `traceparent` when it sends one) whose children are its stages as the handler runs them:
authenticate, route, quota, moderation, cache, queue (admission), upstream; each upstream attempt is a
child of `upstream` with its replica, status and time to first token. Stages run one after another in a
handler, so `Trace.stage(name)` ends the previous stage's span and starts the next: the stages need no
`with` block of their own. Attribute names follow OpenTelemetry's HTTP and GenAI semantic conventions
(`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.usage.input_tokens`, ...)
where they exist, `portcullis.*` otherwise. The trace id goes into the request's access log line.

The SDK is an optional dependency (`pip install 'portcullis[tracing]'`); enabling tracing without it
stops startup with that instruction.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from portcullis.config import TracingConfig
    from portcullis.exchange import Exchange
    from portcullis.http import Request

_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/embeddings": "embeddings"}


class TracingUnavailable(Exception):
    """Tracing is enabled but the OpenTelemetry SDK is not installed."""


class Tracing:
    def __init__(self, config: TracingConfig, exporter: Any = None) -> None:
        """`exporter`: a SpanExporter to use instead of the configured one (tests pass an in-memory one)."""
        try:
            from opentelemetry import propagate, trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as exc:
            raise TracingUnavailable(
                "tracing.enabled: the OpenTelemetry SDK is not installed: pip install 'portcullis[tracing]'"
            ) from exc
        self._trace = trace
        self._propagate = propagate
        resource = Resource.create({"service.name": config.service_name})
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            headers = dict(config.headers)
            # Spans leave in batches from a background thread: the event loop never waits for the collector.
            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint, headers=headers or None))
            )
        elif config.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            self.provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        self.tracer = self.provider.get_tracer("portcullis")

    def begin(self, req: Request) -> Trace | None:
        """The request's trace, or None when it is not sampled."""
        parent = None
        if req.header(b"traceparent") is not None:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in req.scope["headers"]}
            parent = self._propagate.extract(carrier)
        span = self.tracer.start_span(
            f"{req.method} {req.path}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes={
                "http.request.method": req.method,
                "url.path": req.path,
                "portcullis.request_id": req.request_id,
            },
        )
        if not span.is_recording():
            return None
        return Trace(self, span)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what the batch processor still holds


class Trace:
    """The spans of one request."""

    __slots__ = ("_stage", "_tracing", "attempt", "context", "root", "trace_id")

    def __init__(self, tracing: Tracing, root: Any) -> None:
        self._tracing = tracing
        self.root = root
        self.context = tracing._trace.set_span_in_context(root)
        self.trace_id = format(root.get_span_context().trace_id, "032x")
        self._stage: Any = None
        self.attempt: Any = None

    def stage(self, name: str, **attributes: Any) -> None:
        """End the running stage's span and start `name`'s."""
        now = time.time_ns()
        if self._stage is not None:
            self._stage.end(end_time=now)
        self._stage = self._tracing.tracer.start_span(
            name, context=self.context, start_time=now, attributes=attributes or None
        )

    def attempt_started(self, replica: str, model: str) -> None:
        """One upstream attempt, a child of the upstream stage."""
        parent = self._tracing._trace.set_span_in_context(self._stage) if self._stage is not None else self.context
        self.attempt = self._tracing.tracer.start_span(
            "upstream.attempt",
            context=parent,
            kind=self._tracing._trace.SpanKind.CLIENT,
            attributes={"portcullis.replica": replica, "gen_ai.request.model": model},
        )

    def attempt_ended(self, ok: bool | None, kind: str | None, ttft_s: float | None) -> None:
        span = self.attempt
        if span is None:
            return
        self.attempt = None
        if ttft_s is not None:
            span.set_attribute("portcullis.time_to_first_token_ms", round(ttft_s * 1000, 3))
        if not ok:
            span.set_attribute("error.type", kind or "error")
            span.set_status(self._tracing._trace.Status(self._tracing._trace.StatusCode.ERROR))
        span.end()

    def finish(self, req: Request, ex: Exchange) -> None:
        """The request is over: the last stage and the request's span end, with what the request learned."""
        if self._stage is not None:
            self._stage.end()
            self._stage = None
        if self.attempt is not None:
            self.attempt_ended(False, "aborted", None)
        root = self.root
        attrs: dict[str, Any] = {"http.response.status_code": req.status, "http.route": req.path}
        operation = _OPERATIONS.get(req.path)
        if operation is not None:
            attrs["gen_ai.operation.name"] = operation
        if ex.model is not None:
            attrs["gen_ai.request.model"] = ex.model
        if ex.replica is not None:
            attrs["gen_ai.response.model"] = ex.replica.model
            attrs["portcullis.replica"] = ex.replica.name
        if ex.prompt_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = ex.prompt_tokens
        if ex.completion_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = ex.completion_tokens
        if ex.ttft_s is not None:
            attrs["portcullis.time_to_first_token_ms"] = round(ex.ttft_s * 1000, 3)
        principal = ex.principal
        if principal is not None:
            if principal.key_id:
                attrs["portcullis.key_id"] = principal.key_id
            if principal.tier:
                attrs["portcullis.tier"] = principal.tier
        for name, value in (
            ("portcullis.stream", ex.stream),
            ("portcullis.attempts", ex.attempts),
            ("portcullis.queue_ms", round(ex.queue_s * 1000, 3)),
            ("portcullis.cache_hit", ex.cache_hit),
            ("portcullis.route", ex.route_reason),
            ("portcullis.degraded", ex.degraded),
            ("portcullis.moderation", ex.moderation),
            ("error.type", ex.error_code),
        ):
            if value is not None:
                attrs[name] = value
        root.set_attributes(attrs)
        if req.status >= 500 or req.status == 0:
            root.set_status(self._tracing._trace.Status(self._tracing._trace.StatusCode.ERROR))
        root.end()
