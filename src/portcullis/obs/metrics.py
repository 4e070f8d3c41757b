"""Prometheus metrics. Labels are bounded: routes and models come from the config, never the client.

Gauges of live state (a replica's in-flight requests, slots and health; a model's queue) are read at scrape
time by collectors their components own and register (`Metrics.register`), so the hot path pays nothing for
them and this module imports no stage.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class Named(Protocol):
    """Whatever names the configured models (the catalog): labels are only ever these."""

    @property
    def models(self) -> Mapping[str, Any]: ...


# The *_created series double the scrape for no use in dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]  # (prometheus_client leaves it unannotated)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _CountedCollector(Collector):
    def __init__(self, counted: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.counted = counted

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (doc, read) in self.counted.items():
            yield CounterMetricFamily(name, doc, value=read())


class _Histogram:
    """A histogram's state for one label set: per-bucket counts (not yet cumulative), sum, count."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.sum = 0.0


class _RequestCollector(Collector):
    """Exports the per-request series that Metrics.observe keeps in plain dicts."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        labels: tuple[str, ...]  # each series has its own label count
        m = self.metrics
        requests = CounterMetricFamily("portcullis_requests", "Requests answered", labels=["route", "model", "status"])
        for labels, value in m.requests.items():
            requests.add_metric(list(labels), value)
        yield requests
        tokens = CounterMetricFamily("portcullis_tokens", "Tokens reported by the upstream", labels=["model", "kind"])
        for labels, value in m.tokens.items():
            tokens.add_metric(list(labels), value)
        yield tokens
        cost = CounterMetricFamily(
            "portcullis_cost", "Spend on answered requests, in quota.currency (deployment prices)", labels=["model"]
        )
        for labels, value in m.cost.items():
            cost.add_metric(list(labels), value)
        yield cost
        if m.per_key is not None:  # server.metrics_per_key: the operator chose a label per API key
            by_key = CounterMetricFamily(
                "portcullis_key_requests", "Requests answered, per API key (opt-in)", labels=["key_id"]
            )
            key_tokens = CounterMetricFamily(
                "portcullis_key_tokens", "Tokens, per API key and kind (opt-in)", labels=["key_id", "kind"]
            )
            key_cost = CounterMetricFamily("portcullis_key_cost", "Spend, per API key (opt-in)", labels=["key_id"])
            for key_id, (n, prompt, completion, spent) in m.per_key.items():
                by_key.add_metric([key_id], n)
                key_tokens.add_metric([key_id, "prompt"], prompt)
                key_tokens.add_metric([key_id, "completion"], completion)
                key_cost.add_metric([key_id], spent)
            yield by_key
            yield key_tokens
            yield key_cost
        cache = CounterMetricFamily(
            "portcullis_cache_lookups",
            "Cache lookups by result: hit, miss, bypass (not cacheable), coalesced (shared an identical request)",
            labels=["route", "result"],
        )
        for labels, value in m.cache_lookups.items():
            cache.add_metric(list(labels), value)
        yield cache
        for name, doc, label_names, bounds, series in (
            (
                "portcullis_request_duration_seconds",
                "Time from request to the last byte of the answer",
                ["route", "model"],
                LATENCY_BUCKETS,
                m.latency,
            ),
            (
                "portcullis_upstream_duration_seconds",
                "Time spent waiting on the upstream",
                ["model"],
                LATENCY_BUCKETS,
                m.upstream_latency,
            ),
            (
                "portcullis_time_to_first_token_seconds",
                "Time from request to the first streamed token",
                ["model"],
                LATENCY_BUCKETS,
                m.ttft,
            ),
            (
                "portcullis_overhead_seconds",
                "The gateway's own time: total minus time waiting on the upstream",
                ["route"],
                OVERHEAD_BUCKETS,
                m.overhead,
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=label_names)
            for labels, hist in series.items():
                cumulative, running = [], 0
                for bound, count in zip((*bounds, float("inf")), hist.counts, strict=True):
                    running += count
                    cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
                family.add_metric(list(labels), cumulative, sum_value=hist.sum)
            yield family


class Metrics:
    """Per-request metrics, kept in plain dicts and exported at scrape time.

    prometheus_client's own Counter/Histogram take a lock per increment and scan buckets linearly in
    Python: probed inside the running gateway, recording one request that way (six series) plus the
    access line cost 26 µs. The event loop is single-threaded, so plain counters and a bisect suffice;
    the exposition format is unchanged (a collector renders these as the usual counter and histogram).
    """

    def __init__(self, catalog: Named, *, per_key: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.cost: dict[tuple[str], float] = {}
        # key id → [requests, prompt tokens, completion tokens, spend]; only when the operator opts in
        # (server.metrics_per_key): one series per key is unbounded in the number of keys.
        self.per_key: dict[str, list[float]] | None = {} if per_key else None
        self._known_models = set(catalog.models)
        self.requests: dict[tuple[str, str, str], float] = {}
        self.tokens: dict[tuple[str, str], float] = {}
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.upstream_latency: dict[tuple[str], _Histogram] = {}
        self.ttft: dict[tuple[str], _Histogram] = {}
        self.overhead: dict[tuple[str], _Histogram] = {}
        self.cache_lookups: dict[tuple[str, str], float] = {}  # (route, result) → count; per request
        self.registry.register(_RequestCollector(self))
        # Quota and usage events: rare next to requests, so prometheus_client's own types are fine here.
        r = self.registry
        self.quota_refusals = Counter(
            "portcullis_quota_refusals", "Requests refused by a quota", ["reason"], registry=r
        )
        self.quota_store_errors = Counter(
            "portcullis_quota_store_errors", "Quota store (Redis) calls that failed", registry=r
        )
        self.quota_store_degraded = Gauge(
            "portcullis_quota_store_degraded",
            "1 while the quota store is unreachable and quota.on_store_error applies",
            registry=r,
        )
        self.budget_alerts = Counter(
            "portcullis_budget_alerts", "Budget thresholds crossed", ["subject", "period", "threshold"], registry=r
        )
        self.alert_webhook_failures = Counter(
            "portcullis_alert_webhook_failures", "Budget alerts the webhook never accepted", registry=r
        )
        self.usage_written = Counter("portcullis_usage_records_written", "Usage records written", registry=r)
        self.usage_dropped = Counter(
            "portcullis_usage_records_dropped", "Usage records dropped because the queue was full", registry=r
        )
        self.usage_queue = Gauge("portcullis_usage_queue_length", "Usage records waiting to be written", registry=r)
        # Dependencies: the database and the Redis bus, as this process sees them.
        self.database_degraded = Gauge(
            "portcullis_database_degraded",
            "1 while database calls fail or pass their deadline (verified keys are served from the cache)",
            registry=r,
        )
        self.bus_connected = Gauge(
            "portcullis_event_bus_connected",
            "1 while the Redis event bus is subscribed and answering (revocations are pushed)",
            registry=r,
        )
        # Counters kept by their owners as plain ints, read at scrape time: name → (help, read).
        self._counted: dict[str, tuple[str, Callable[[], float]]] = {}
        self.registry.register(_CountedCollector(self._counted))
        # Resilience and admission: events of the slow path.
        self.queue_wait = Histogram(
            "portcullis_queue_wait_seconds",
            "Time queued requests waited for a slot",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.admission_rejections = Counter(
            "portcullis_admission_rejections",
            "Requests refused by admission control (reject, queue_full, queue_timeout, no_replica, shutdown)",
            ["model", "reason"],
            registry=r,
        )
        self.degradations = Counter(
            "portcullis_degradations",
            "Requests served degraded (max_tokens capped, model)",
            ["model", "action"],
            registry=r,
        )
        self.retries = Counter(
            "portcullis_retries", "Upstream attempts retried, by the failure retried", ["model", "failure"], registry=r
        )
        self.retry_budget_exhausted = Counter(
            "portcullis_retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            ["model"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "portcullis_breaker_transitions", "Circuit breaker state changes", ["model", "replica", "to"], registry=r
        )

        self.cache_store_errors = Counter(
            "portcullis_cache_store_errors", "Cache store (Redis) calls that failed", registry=r
        )
        # Moderation: not every request pays for these (only moderated ones), so prometheus_client's own.
        self.moderation_checks = Counter(
            "portcullis_moderation_checks",
            "Verdicts asked of remote moderators, by outcome (pass, flagged, error, timeout)",
            ["moderator", "stage", "outcome"],
            registry=r,
        )
        self.moderation_violations = Counter(
            "portcullis_moderation_violations",
            "Moderation findings, by moderator, category, stage (input, output, endpoint) and action",
            ["moderator", "category", "stage", "action"],
            registry=r,
        )
        self.moderation_seconds = Histogram(
            "portcullis_moderation_seconds",
            "Time a remote moderator took to answer",
            ["moderator"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.moderation_cancelled_upstream = Counter(
            "portcullis_moderation_cancelled_upstream",
            "Upstream calls cancelled by a parallel input moderation verdict",
            registry=r,
        )
        self.route_decisions = Counter(
            "portcullis_route_decisions",
            "Requests a router placed, by router and the model it chose",
            ["router", "model"],
            registry=r,
        )

    def count(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Export a counter its owner keeps (a plain int attribute, say) under `name`."""
        self._counted[name] = (doc, read)

    def register(self, collector: Collector) -> None:
        """A component's own collector, read at scrape time (the catalog's replica gauges, admission's queues,
        affinity's placements, the batch runner's lines): obs/ knows no stage, each stage knows its numbers."""
        self.registry.register(collector)

    def observe(
        self,
        *,
        route: str,
        model: str | None,
        status: int,
        total_s: float,
        upstream_s: float,
        ttft_s: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cost: float = 0.0,
        key_id: str | None = None,
    ) -> None:
        label = model if model in self._known_models else "(unknown)"
        key = (route, label, str(status))
        self.requests[key] = self.requests.get(key, 0.0) + 1.0
        _observe(self.latency, (route, label), LATENCY_BUCKETS, total_s)
        _observe(self.overhead, (route,), OVERHEAD_BUCKETS, max(total_s - upstream_s, 0.0))
        if upstream_s:
            _observe(self.upstream_latency, (label,), LATENCY_BUCKETS, upstream_s)
        if ttft_s is not None:
            _observe(self.ttft, (label,), LATENCY_BUCKETS, ttft_s)
        if prompt_tokens:
            k = (label, "prompt")
            self.tokens[k] = self.tokens.get(k, 0.0) + prompt_tokens
        if completion_tokens:
            k = (label, "completion")
            self.tokens[k] = self.tokens.get(k, 0.0) + completion_tokens
        if cost:
            c = (label,)
            self.cost[c] = self.cost.get(c, 0.0) + cost
        if self.per_key is not None and key_id is not None:
            entry = self.per_key.get(key_id)
            if entry is None:
                entry = self.per_key[key_id] = [0.0, 0.0, 0.0, 0.0]
            entry[0] += 1
            entry[1] += prompt_tokens or 0
            entry[2] += completion_tokens or 0
            entry[3] += cost

    def cache_lookup(self, route: str, result: str) -> None:
        key = (route, result)
        self.cache_lookups[key] = self.cache_lookups.get(key, 0.0) + 1.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _observe(series: dict[Any, _Histogram], labels: Any, bounds: tuple[float, ...], value: float) -> None:
    hist = series.get(labels)
    if hist is None:
        hist = series[labels] = _Histogram(len(bounds))
    hist.counts[bisect_left(bounds, value)] += 1
    hist.sum += value
