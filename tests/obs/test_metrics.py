"""The hand-kept per-request metrics must expose exactly what prometheus_client's own types would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from portcullis.obs.metrics import LATENCY_BUCKETS, Metrics
from portcullis.routing.catalog import Catalog


def _series(text: bytes, prefix: str) -> dict[str, float]:
    out = {}
    for line in text.decode().splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_histogram_matches_prometheus_client() -> None:
    values = [0.001, 0.005, 0.0051, 0.25, 0.2500001, 7.0, 1000.0]  # on, just over, between, past the last bound
    ours = Metrics(Catalog({"m": []}))
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "portcullis_request_duration_seconds",
        "x",
        ["route", "model"],
        buckets=LATENCY_BUCKETS,
        registry=reference_registry,
    )
    for v in values:
        ours.observe(
            route="/r",
            model="m",
            status=200,
            total_s=v,
            upstream_s=0.0,
            ttft_s=None,
            prompt_tokens=None,
            completion_tokens=None,
        )
        reference.labels("/r", "m").observe(v)
    prefix = "portcullis_request_duration_seconds_"
    expected = {k: v for k, v in _series(generate_latest(reference_registry), prefix).items() if "_created" not in k}
    assert _series(ours.render(), prefix) == expected


def test_counters_and_unknown_models_are_bounded() -> None:
    m = Metrics(Catalog({"m": []}))
    for model in ("m", "client-invented-1", "client-invented-2"):
        m.observe(
            route="/r",
            model=model,
            status=404,
            total_s=0.01,
            upstream_s=0.0,
            ttft_s=None,
            prompt_tokens=3,
            completion_tokens=None,
        )
    series = _series(m.render(), "portcullis_requests_total")
    assert series == {
        'portcullis_requests_total{model="m",route="/r",status="404"}': 1.0,
        'portcullis_requests_total{model="(unknown)",route="/r",status="404"}': 2.0,
    }
    assert _series(m.render(), "portcullis_tokens_total") == {
        'portcullis_tokens_total{kind="prompt",model="m"}': 3.0,
        'portcullis_tokens_total{kind="prompt",model="(unknown)"}': 6.0,
    }
