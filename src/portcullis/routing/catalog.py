"""The catalog: model names → their replicas (one per configured deployment), with live state; the
names clients may send (models, aliases, routers) and what each one means.

A `Replica` is shared data: the prober writes its health and capacity, the balancer reads them, the
upstream stage counts its in-flight requests and feeds it what each answer showed (time to first token,
decoding speed, tokens produced while busy). Nobody else mutates it.

Prices: a deployment priced per 1,000 tokens keeps that price. One priced by the hour (`gpu_hour`) gets
a price per token from its throughput: completion tokens produced per second while it had work, over
the last few minutes (`tokens_per_s` from the config until measured); a prompt token costs
`prompt_ratio` of a completion token. Idle time is not charged to anyone's requests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from portcullis.config import NATIVE_PATHS, BreakerConfig, Config, DeploymentConfig, RouterConfig
from portcullis.errors import NotFound
from portcullis.routing.breaker import Breaker, BreakerState


class Answer(Protocol):
    """An upstream's answer whose head arrived (upstream/h1.py's H1Response): its body is read whole or line by line,
    then the connection is released (back to the pool, the answer read to its end) or closed (the rest unwanted)."""

    status: int
    headers: Mapping[str, str]  # names in lower case

    async def read(self) -> bytes: ...

    async def readline(self) -> bytes: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class Client(Protocol):
    """A replica's connection pool, as the rest of the gateway sees it (upstream/client.py makes them; the
    routing package names only this, so it never imports the upstream stage that imports it)."""

    base_url: str  # the replica's url (a launched server's may change when it starts again on another port)
    in_use: int  # traffic connections taken
    fresh_retries: int  # requests re-sent on a fresh connection after a pooled one was dead
    pool_timeouts: int

    async def acquire(self) -> None: ...

    def release(self) -> None: ...

    async def post(self, path: str, body: bytes, *, model: str) -> Answer: ...

    async def close(self) -> None: ...


class SideCall(Protocol):
    """One small JSON call to a replica beside the traffic (/tokenize, a guard model's verdict, an embedding
    for the semantic cache): the upstream stage's `Upstream.call`, handed to the stages that need one, so every
    call to a backend counts in its in-flight requests and tells its breaker how it went."""

    async def __call__(
        self,
        replica: Replica,
        path: str,
        obj: Any,
        *,
        model: str,
        timeout_s: float | None = None,
        load: bool = False,
    ) -> tuple[int, Any]: ...


@dataclass(slots=True)
class Signals:
    """What a llama-server says of its own load (upstream/probe.py read_signals), with when it said it."""

    processing: int = 0  # /metrics requests_processing
    deferred: int = 0  # /metrics requests_deferred: waiting inside the server for a slot
    prompt_tps: float | None = None
    decode_tps: float | None = None
    busy_slots: int = 0  # /slots: slots processing
    kv_utilization: float | None = None  # /slots: the share of the KV cache processing slots hold
    external: int = 0  # requests it carries beyond the gateway's own (other clients), at the last reading
    read_at: float = 0.0
    metrics_at: float = 0.0
    slots_at: float = 0.0
    fresh_until: float = 0.0  # monotonic: after this the reading is too old to act on
    metrics_off_until: float = 0.0  # /metrics answered 404/501: not asked again before this
    slots_off_until: float = 0.0
    # The replicas on this server (deployments of several models may share one llama-server): one reading for all,
    # and "ours" is what the gateway has in flight on any of them.
    members: list[Replica] = field(default_factory=list, repr=False)


class ReplicaState(StrEnum):
    UNKNOWN = "unknown"  # not probed yet
    READY = "ready"
    WARMING = "warming"  # llama-server answers 503 "Loading model": alive, not serving yet
    DOWN = "down"  # no answer, or an unexpected one


@dataclass(eq=False, slots=True)
class Replica:
    model: str
    name: str
    url: str
    kind: str  # "llama_cpp" | "openai"
    upstream_model: str | None
    weight: int
    api_key: str | None = field(default=None, repr=False)
    state: ReplicaState = ReplicaState.UNKNOWN
    in_flight: int = 0
    # llama-server's parallel slots (/props total_slots); for other backends the configured weight.
    slots: int = 1
    n_ctx: int | None = None  # context per slot, when the upstream tells
    last_error: str | None = None
    # Consecutive probe results: n > 0 successes, n < 0 failures (health.up_after / down_after).
    probe_streak: int = 0
    answered_at: float = 0.0  # monotonic time it last answered a request (headers, or a whole answer)
    failing_since: float = 0.0  # monotonic time the first probe of the current run of failed ones began
    client: Client | None = None
    # Price per 1,000 tokens in quota.currency (budgets and usage records).
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    max_in_flight: int | None = None  # configured; None: the slots (llama-server) or unlimited
    max_connections: int | None = None  # the traffic pool's size (None: upstream.max_connections_per_replica)
    breaker: Breaker = field(default_factory=lambda: Breaker("", BreakerConfig()))
    # After an upstream 429 with Retry-After, the replica gets nothing new until then (monotonic time).
    cooldown_until: float = 0.0
    quality: float | None = None
    tags: tuple[str, ...] = ()
    n_ctx_configured: int | None = None
    # The API endpoints it answers itself (DeploymentConfig.native); one it answered 404 or 405 is taken out for
    # NATIVE_RETRY_S (`lacks`), then tried again: a server upgraded in place gets its native requests back.
    native: set[str] = field(default_factory=set)
    native_lost: dict[str, float] = field(default_factory=dict)
    # What the backend tells of its model (llama-server's /v1/models `meta`, /props `modalities`): shown as it came.
    meta: dict[str, Any] | None = None
    modalities: dict[str, Any] | None = None
    props: dict[str, Any] | None = None  # llama-server's /props as last probed (GET /props shows it)
    # Priced by the hour: the machine's price, the throughput assumed until measured, prompt/completion.
    gpu_hour: float | None = None
    assumed_tps: float | None = None
    prompt_ratio: float = 0.1
    # What answers showed (exponentially weighted): seconds to the first token, prompt tokens processed
    # per second, one stream's decoding speed in tokens/s, and the replica's throughput in completion
    # tokens per busy second.
    ttft_s: float | None = None
    prefill_tps: float | None = None
    stream_tps: float | None = None
    measured_tps: float | None = None
    busy_since: float = 0.0
    busy_s: float = 0.0
    tokens_out: int = 0
    _marks: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_THROUGHPUT_MARKS), repr=False)
    # On a host (hosts.<name>: router mode, launched servers): the model is loaded only when needed. The host's
    # scheduler says whether it serves now (`loaded`); one that does not is chosen last and has no slots to count.
    host: str | None = None
    loaded: bool = True
    signals: Signals = field(default_factory=Signals, repr=False)

    def speaks(self, path: str, now: float) -> bool:
        """Does it answer this API endpoint itself (as configured, and not found lacking it lately)?"""
        if path in self.native:
            return True
        lost = self.native_lost.get(path)
        if lost is not None and now - lost >= NATIVE_RETRY_S:
            del self.native_lost[path]
            self.native.add(path)
            return True
        return False

    def lacks(self, path: str, now: float) -> None:
        """It answered that endpoint 404 or 405: its requests go translated for a while."""
        if path in self.native:
            self.native.discard(path)
            self.native_lost[path] = now

    def take_props(self, props: dict[str, Any]) -> None:
        """What llama-server's /props says of it: its slots (total_slots), the context per slot, the rest as shown by
        GET /props (its file system paths left out: the operator's business, not the clients')."""
        slots = props.get("total_slots")
        if isinstance(slots, int) and slots > 0:
            self.slots = slots
        settings = props.get("default_generation_settings")
        if isinstance(settings, dict) and isinstance(settings.get("n_ctx"), int) and settings["n_ctx"] > 0:
            self.n_ctx = settings["n_ctx"]
        self.props = {k: v for k, v in props.items() if k not in ("model_path", "chat_template_path")}
        if isinstance(props.get("modalities"), dict):
            self.modalities = props["modalities"]  # {"vision": ..., "audio": ...}: shown by /v1/models

    def mark_down(self, reason: str) -> None:
        """Passive health: a refused connection takes the replica out at once; probes bring it back."""
        self.state = ReplicaState.DOWN
        self.last_error = reason
        self.probe_streak = 0

    def external(self, now: float) -> int:
        """Requests the server carries for other clients, by its last fresh reading (0 when it has none)."""
        signals = self.signals
        return signals.external if now < signals.fresh_until else 0

    @property
    def context(self) -> int | None:
        """Tokens one request may use here (prompt + completion): the slot's context, learned or configured."""
        return self.n_ctx if self.n_ctx is not None else self.n_ctx_configured

    # -- what answers show ---------------------------------------------------------------------

    def begin(self, now: float) -> None:
        if self.in_flight == 0:
            self.busy_since = now
        self.in_flight += 1

    def end(self, now: float) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy_s += now - self.busy_since

    def observe(
        self,
        *,
        ttft_s: float | None,
        prefill_tps: float | None,
        stream_tps: float | None,
        completion_tokens: int | None,
    ) -> None:
        """One successful answer: what it says about this replica's speed."""
        if ttft_s is not None:
            self.ttft_s = _ewma(self.ttft_s, ttft_s)
        if prefill_tps:
            self.prefill_tps = _ewma(self.prefill_tps, prefill_tps)
        if stream_tps:
            self.stream_tps = _ewma(self.stream_tps, stream_tps)
        if completion_tokens:
            self.tokens_out += completion_tokens

    def mark_throughput(self, now: float) -> None:
        """Every few seconds: the throughput over the marks kept (busy time, so idle time is free)."""
        busy = self.busy_s + (now - self.busy_since if self.in_flight else 0.0)
        marks = self._marks
        marks.append((busy, self.tokens_out))
        if len(marks) >= 2:
            busy0, tokens0 = marks[0]
            if busy - busy0 >= _MIN_BUSY_S and self.tokens_out > tokens0:
                self.measured_tps = (self.tokens_out - tokens0) / (busy - busy0)
        if self.gpu_hour is not None:
            self.price_from_throughput()

    def price_from_throughput(self) -> None:
        assert self.gpu_hour is not None
        tps = self.measured_tps or self.assumed_tps or 1.0
        self.completion_per_1k = self.gpu_hour / 3600 / tps * 1000
        self.prompt_per_1k = self.completion_per_1k * self.prompt_ratio

    @property
    def capacity(self) -> int:
        """The balancing weight: llama-server's slots, or a generic backend's configured weight."""
        return self.slots if self.kind == "llama_cpp" else self.weight

    @property
    def limit(self) -> int | None:
        """Requests the gateway may have in flight here at once (None: no limit, no queueing)."""
        if self.host is not None and not self.loaded:
            return None  # waits at its host for the model to load, not in admission's queue
        if self.max_in_flight is not None:
            return self.max_in_flight
        return self.slots if self.kind == "llama_cpp" else None

    def usable(self, now: float) -> bool:
        """Ready (prober), let through by its breaker, not cooling down after a 429."""
        return self.state is ReplicaState.READY and self.breaker.allows(now) and now >= self.cooldown_until

    @classmethod
    def from_config(
        cls,
        model: str,
        index: int,
        dep: DeploymentConfig,
        breaker: BreakerConfig,
        quality: float | None = None,
        url: str = "",
    ) -> Replica:
        """`url`: where a host's deployment is reached (the router's; a launched process's is set by its host)."""
        parts = urlsplit(dep.url or url)
        if dep.name:
            name = dep.name
        elif dep.host is not None:
            name = dep.host
        else:
            name = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        replica = cls(
            model=model,
            name=name,
            url=dep.url or url,
            host=dep.host,
            kind=dep.kind,
            upstream_model=dep.upstream_model,
            weight=dep.weight,
            api_key=dep.api_key(),
            prompt_per_1k=dep.cost.prompt_per_1k,
            completion_per_1k=dep.cost.completion_per_1k,
            max_in_flight=dep.max_in_flight,
            max_connections=dep.max_connections,
            breaker=Breaker(f"{model}/{name}", breaker),
            quality=dep.quality if dep.quality is not None else quality,
            tags=tuple(dep.tags),
            n_ctx_configured=dep.n_ctx,
            gpu_hour=dep.cost.gpu_hour,
            assumed_tps=dep.cost.tokens_per_s,
            prompt_ratio=dep.cost.prompt_ratio,
            native=set(dep.native if dep.native is not None else (NATIVE_PATHS if dep.kind == "llama_cpp" else ())),
        )
        if replica.gpu_hour is not None:
            replica.price_from_throughput()
        return replica


NATIVE_RETRY_S = 600.0  # how long a replica found lacking an API endpoint is asked in chat completions instead

_EWMA = 0.2


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA * (new - old)


_MIN_BUSY_S = 1.0  # busy seconds a throughput figure needs before it replaces the assumed one
_THROUGHPUT_MARKS = 30  # marks kept (one per Catalog.tick, every 10 s: five minutes)


class Catalog:
    def __init__(
        self,
        models: dict[str, list[Replica]],
        fallbacks: dict[str, list[str]] | None = None,
        *,
        routers: dict[str, RouterConfig] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.models = models
        # Models a request may fail over to, in order (models.<m>.fallbacks).
        self.fallbacks = fallbacks or {}
        # Logical models that choose a candidate per request (routing/router.py), and other names.
        self.routers = routers or {}
        self.aliases = aliases or {}  # alias → model or router name
        # Models switched off at run time (DELETE /v1/models/{id}); persisted, shared by every process.
        self.disabled: set[str] = set()

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        breaker = config.resilience.breaker
        aliases = {a: name for name, m in config.models.items() for a in m.aliases}
        aliases.update({a: name for name, r in config.routers.items() for a in r.aliases})
        return cls(
            {
                name: [
                    Replica.from_config(name, i, dep, breaker, model.quality, url=_host_url(config, dep))
                    for i, dep in enumerate(model.deployments)
                ]
                for name, model in config.models.items()
            },
            {name: list(model.fallbacks) for name, model in config.models.items()},
            routers=dict(config.routers),
            aliases=aliases,
        )

    def resolve(self, name: str) -> str:
        """The model or router a client's name means (an alias resolved); 404 when none, or switched off."""
        name = self.aliases.get(name, name)
        if name in self.routers or (name in self.models and name not in self.disabled):
            return name
        raise NotFound(
            f"The model '{name}' does not exist or you do not have access to it.", param="model", code="model_not_found"
        )

    def max_price(self, model: str) -> tuple[float, float]:
        """The dearest replica's (prompt, completion) price per 1k tokens: what a reservation assumes."""
        replicas = self.models.get(model, ())
        return max((r.prompt_per_1k for r in replicas), default=0.0), max(
            (r.completion_per_1k for r in replicas), default=0.0
        )

    def tick(self) -> None:
        now = time.monotonic()
        for replica in self.all_replicas():
            replica.mark_throughput(now)

    def replicas_for(self, model: str) -> list[Replica]:
        replicas = self.models.get(model)
        if replicas is None or model in self.disabled:
            raise NotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return replicas

    def enabled(self) -> list[str]:
        return [name for name in self.models if name not in self.disabled]

    def names(self) -> list[tuple[str, str, str | None]]:
        """Every name a client may send: (name, kind: model | router | alias, what an alias stands for)."""
        out: list[tuple[str, str, str | None]] = [(name, "model", None) for name in self.enabled()]
        out += [(name, "router", None) for name in self.routers]
        out += [
            (alias, "alias", target)
            for alias, target in self.aliases.items()
            if target in self.routers or target not in self.disabled
        ]
        return out

    def collector(self) -> Collector:
        """Every replica's live state as gauges, read at scrape time."""
        return ReplicaCollector(self)

    def all_replicas(self) -> list[Replica]:
        return [r for replicas in self.models.values() for r in replicas]

    def unready_models(self) -> list[str]:
        """Enabled models with no replica that is ready and let through by its breaker."""
        now = time.monotonic()
        return [
            name
            for name, replicas in self.models.items()
            if name not in self.disabled
            and not any(r.state is ReplicaState.READY and r.breaker.allows(now) for r in replicas)
        ]


def _host_url(config: Config, dep: DeploymentConfig) -> str:
    host = config.hosts.get(dep.host) if dep.host is not None else None
    return host.url or "" if host is not None else ""


class ReplicaCollector(Collector):
    """Every replica's live state, read at scrape time (registered by the composition: app/gateway.py)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
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
        breaker = GaugeMetricFamily(
            "portcullis_breaker_state",
            "Circuit breaker state of a replica (1 for the current state)",
            labels=["model", "replica", "state"],
        )
        retry_in = GaugeMetricFamily(
            "portcullis_breaker_retry_in_seconds",
            "Seconds until an open breaker lets a probe through",
            labels=["model", "replica"],
        )
        connections = GaugeMetricFamily(
            "portcullis_upstream_connections_in_use",
            "Pooled traffic connections to a replica held by requests",
            labels=["model", "replica"],
        )
        fresh = CounterMetricFamily(
            "portcullis_upstream_fresh_connection_retries",
            "Requests sent again on a fresh connection because their pooled one was already closed",
            labels=["model", "replica"],
        )
        pool_timeouts = CounterMetricFamily(
            "portcullis_upstream_pool_timeouts",
            "Requests that found every pooled connection to a replica busy for pool_s",
            labels=["model", "replica"],
        )
        # The Gateway API Inference Extension's model-server protocol, per replica (docs/llama-server.md): what an
        # endpoint picker scrapes from each model server, here for the llama.cpp fleet behind this gateway.
        queued = GaugeMetricFamily(
            "portcullis_replica_queued_requests",
            "Requests waiting for a replica: inside llama-server (requests_deferred) when it reports it",
            labels=["model", "replica"],
        )
        running = GaugeMetricFamily(
            "portcullis_replica_running_requests",
            "Requests a replica is processing: llama-server's requests_processing when fresh, else the gateway's own",
            labels=["model", "replica"],
        )
        kv = GaugeMetricFamily(
            "portcullis_replica_kv_cache_utilization",
            "Share (0..1) of a replica's KV cache held by the requests it processes: from llama-server's /slots "
            "when fresh, else estimated as busy slots over slots",
            labels=["model", "replica"],
        )
        now = time.monotonic()
        for r in self.catalog.all_replicas():
            signals = r.signals
            current = now < signals.fresh_until
            queued.add_metric([r.model, r.name], signals.deferred if current else 0)
            running.add_metric([r.model, r.name], signals.processing if current and signals.metrics_at else r.in_flight)
            if current and signals.kv_utilization is not None:
                kv.add_metric([r.model, r.name], signals.kv_utilization)
            else:
                kv.add_metric([r.model, r.name], min(1.0, r.in_flight / max(1, r.capacity)))
            if r.client is not None:
                connections.add_metric([r.model, r.name], r.client.in_use)
                fresh.add_metric([r.model, r.name], r.client.fresh_retries)
                pool_timeouts.add_metric([r.model, r.name], r.client.pool_timeouts)
            in_flight.add_metric([r.model, r.name], r.in_flight)
            slots.add_metric([r.model, r.name], r.capacity)
            for s in ReplicaState:
                state.add_metric([r.model, r.name, s.value], 1.0 if r.state is s else 0.0)
            for b in BreakerState:
                breaker.add_metric([r.model, r.name, b.value], 1.0 if r.breaker.state is b else 0.0)
            retry_in.add_metric([r.model, r.name], r.breaker.retry_in())
        yield in_flight
        yield slots
        yield state
        yield breaker
        yield retry_in
        yield connections
        yield fresh
        yield pool_timeouts
        yield queued
        yield running
        yield kv
