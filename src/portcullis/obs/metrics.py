"""Prometheus metrics. Labels are bounded: routes and models come from the config, never the client.

Per-replica gauges (in-flight, slots, state) are read from the catalog at scrape time by a collector,
so the hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from portcullis.routing.catalog import Catalog, ReplicaState

# The *_created series double the scrape for no use in dashboards or alerts.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class ReplicaCollector(Collector):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily(
            "portcullis_replica_in_flight", "Requests in flight to a replica", labels=["model", "replica"]
        )
        slots = GaugeMetricFamily(
            "portcullis_replica_slots",
            "Parallel slots of a replica (llama-server total_slots)",
            labels=["model", "replica"],
        )
        state = GaugeMetricFamily(
            "portcullis_replica_state",
            "Health state of a replica (1 for the current state)",
            labels=["model", "replica", "state"],
        )
        for r in self.catalog.all_replicas():
            in_flight.add_metric([r.model, r.name], r.in_flight)
            slots.add_metric([r.model, r.name], r.capacity)
            for s in ReplicaState:
                state.add_metric([r.model, r.name, s.value], 1.0 if r.state is s else 0.0)
        yield in_flight
        yield slots
        yield state


class Metrics:
    def __init__(self, catalog: Catalog) -> None:
        self.registry = CollectorRegistry()
        self._known_models = set(catalog.models)
        r = self.registry
        self.requests = Counter("portcullis_requests", "Requests answered", ["route", "model", "status"], registry=r)
        self.latency = Histogram(
            "portcullis_request_duration_seconds",
            "Time from request to the last byte of the answer",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "portcullis_upstream_duration_seconds",
            "Time spent waiting on the upstream",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "portcullis_time_to_first_token_seconds",
            "Time from request to the first streamed token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "portcullis_overhead_seconds",
            "The gateway's own time: total minus time waiting on the upstream",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("portcullis_tokens", "Tokens reported by the upstream", ["model", "kind"], registry=r)
        r.register(ReplicaCollector(catalog))
        # prometheus_client's .labels() hashes and locks; the hot path reuses the children.
        self._children: dict[tuple[object, ...], object] = {}

    def model_label(self, model: str | None) -> str:
        return model if model in self._known_models else "(unknown)"

    def _child(self, metric: Counter | Histogram, *labels: str):
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

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
    ) -> None:
        label = self.model_label(model)
        self._child(self.requests, route, label, str(status)).inc()
        self._child(self.latency, route, label).observe(total_s)
        self._child(self.overhead, route).observe(max(total_s - upstream_s, 0.0))
        if upstream_s:
            self._child(self.upstream_latency, label).observe(upstream_s)
        if ttft_s is not None:
            self._child(self.ttft, label).observe(ttft_s)
        if prompt_tokens:
            self._child(self.tokens, label, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self._child(self.tokens, label, "completion").inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
