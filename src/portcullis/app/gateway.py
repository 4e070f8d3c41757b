"""The gateway as an ASGI app, built from a Config: the composition root.

What is built, and what each part is handed (gateway.py, here); the request path's frame (dispatch.py); the
gateway's life: preflight, startup, shutdown (lifecycle.py); requests it makes to itself (internal.py). Here
too: events shared between processes (a key revoked, a model switched off), the replicas' health and breaker
callbacks, and the shutdown drain.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from portcullis.api import admin, batches, dashboard, openai, openapi, ops, routes
from portcullis.api.console import SsoClient
from portcullis.app import lifecycle
from portcullis.app.dispatch import Dispatcher, refuse_websocket
from portcullis.app.internal import InternalCaller
from portcullis.app.lifecycle import StartupError, read_model_state
from portcullis.cache.batching import EmbeddingBatcher
from portcullis.cache.exact import ResponseCache
from portcullis.config import Config
from portcullis.exchange import Abort, Exchange
from portcullis.hosts import make_hosts
from portcullis.hosts.schedule import HostCollector
from portcullis.http import Receive, Scope, Send
from portcullis.identity.auth import Identity
from portcullis.identity.keys import KeyStore
from portcullis.jobs.runner import BatchRunner
from portcullis.jobs.store import BatchStore
from portcullis.obs.logging import get_logger
from portcullis.obs.memory import MemoryReturn
from portcullis.obs.metrics import Metrics
from portcullis.obs.timeline import Timeline
from portcullis.obs.tracing import Tracing
from portcullis.offpeak import OffPeak
from portcullis.quota.stage import Quota
from portcullis.quota.usage import UsageRecorder
from portcullis.routing.admission import Admission
from portcullis.routing.affinity import Affinity
from portcullis.routing.breaker import Breaker, BreakerState
from portcullis.routing.catalog import Catalog, Replica, ReplicaState
from portcullis.routing.router import Router
from portcullis.safety.moderation import Moderation
from portcullis.store.bus import EventBus
from portcullis.store.db import make_engine
from portcullis.store.health import DatabaseHealth
from portcullis.store.model_state import ModelState
from portcullis.surfaces.store import ResponseStore
from portcullis.upstream.deadline import Deadlines
from portcullis.upstream.probe import Prober
from portcullis.upstream.proxy import Upstream
from portcullis.upstream.warm import WarmRestarts

__all__ = ["Gateway", "StartupError", "create_app"]


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = Catalog.from_config(config)
        self.metrics = Metrics(self.catalog, per_key=config.server.metrics_per_key)
        self.timeline = Timeline(self.metrics)  # the dashboard's time series
        # Dashboard sign-ins (in Redis through the bus's client when there is one, else here).
        self.dashboard_sessions = dashboard.Sessions(config.dashboard.session_ttl_s)
        self.sso: SsoClient | None = None  # the console's single sign-on (made at preflight: it reads a secret)
        dashboard.SSO_LINK[0] = config.dashboard.sso is not None
        self.log = get_logger("portcullis")
        self.admission = Admission(config, self.catalog, self.metrics)
        self.affinity = Affinity(config.routing.affinity)
        # Hosts that load their models on demand (router-mode llama-servers, launched servers), each with its
        # scheduler: the upstream stage waits there for a model before an attempt.
        self.hosts = make_hosts(
            config,
            self.catalog,
            offpeak=OffPeak(config.scheduling.off_peak),
            priority_of=lambda ex: self.admission.priority_of(ex.principal, low=ex.low_priority),
        )
        # Every call to a backend goes through the upstream stage: traffic (forward) and side calls alike.
        self.upstream = Upstream(config.resilience, self.metrics, self.affinity, self.hosts)
        call = self.upstream.call
        self.warm = WarmRestarts(config, self.catalog, call)
        if self.warm.enabled:
            self.upstream.warm = self.warm
            self.metrics.count(
                "portcullis_warm_saved", "Slots primed and saved with a system prompt", lambda: self.warm.saves
            )
            self.metrics.count(
                "portcullis_warm_restored",
                "Saved slots restored into a replica back from a restart",
                lambda: self.warm.restores,
            )
        self.router = Router(config, self.catalog, self.admission, self.affinity, self.metrics, call)
        self.moderation = Moderation(config, self.catalog, self.metrics, self.log, call)
        self.cache = ResponseCache(config.cache, config.store.redis_url, self.metrics, self.catalog, call)
        self.batcher = EmbeddingBatcher(config.embedding_batching) if config.embedding_batching.enabled else None
        self._replica_of: dict[Breaker, Replica] = {}
        for replica in self.catalog.all_replicas():
            replica.breaker.listener = self._on_breaker
            self._replica_of[replica.breaker] = replica
        # (a host's replicas are watched by the host: a model not loaded has nothing to probe)
        probed = [r for r in self.catalog.all_replicas() if r.host is None]
        self.prober = Prober(probed, config.health, on_change=self._on_replica_change)
        self.started_at = time.time()
        self.draining = False
        self.exchanges: set[Exchange] = set()
        # Upstream attempts' time limits, checked on the live exchanges by one watchdog.
        self.deadlines = Deadlines(self.exchanges)
        self.memory = MemoryReturn(self.exchanges, self.log)  # after a spike, give the memory back
        self.engine = make_engine(config.store.database_url, timeout_s=config.store.timeout_s, statements=True)
        self.db_health = DatabaseHealth(
            self.engine, timeout_s=config.store.timeout_s, log=self.log, metrics=self.metrics
        )
        self.quota = Quota(config, self.metrics, self.log, self.catalog)
        self.usage = UsageRecorder(
            self.engine,
            config.quota.usage,
            self.metrics,
            self.log,
            health=self.db_health,
            database_url=config.store.database_url,
            timeout_s=config.store.timeout_s,
        )
        # Made at preflight (they need the key secret, the JWT setup, Redis): the key store (None: API keys are off),
        # authentication, the bus (None: no Redis).
        self.keys: KeyStore | None = None
        self.identity: Identity | None = None
        self.bus: EventBus | None = None
        # Models switched off at run time: the catalog's state, with or without API keys (JWT-only gateways too).
        self.model_state = ModelState(self.engine)
        self.batch_store = BatchStore(self.engine) if config.batch.enabled else None
        self.call_internal = InternalCaller(self.handle)  # batch lines' requests, through the whole path
        self.batch_runner = (
            BatchRunner(
                config,
                self.batch_store,
                call=self.call_internal,
                admission=self.admission,
                catalog=self.catalog,
                concurrency_of=self.quota.concurrency_of,
                scope_of=self.scope_of,
                keys=lambda: self.keys,
            )
            if self.batch_store is not None
            else None
        )
        # Each component's own gauges and counters, read at scrape time.
        for component in (self.catalog, self.admission, self.affinity, self.batch_runner):
            if component is not None:
                self.metrics.register(component.collector())
        if self.hosts:
            self.metrics.register(HostCollector(self.hosts))
        self.background_tasks: list[asyncio.Task[None]] = []
        # What each group of handlers uses (api/*.py), and the route table made of them.
        self.openapi = openapi.OpenAPIDeps()
        table = routes.table(
            openai_deps=openai.OpenAIDeps(
                config=config,
                router=self.router,
                quota=self.quota,
                moderation=self.moderation,
                cache=self.cache,
                batcher=self.batcher,
                admission=self.admission,
                upstream=self.upstream,
                catalog=self.catalog,
                model_state=self.model_state,
                publish=self.publish,
                started_at=self.started_at,
                responses=ResponseStore(self.engine, config.responses.retention_s),
            ),
            admin_deps=admin.AdminDeps(
                config=config,
                catalog=self.catalog,
                admission=self.admission,
                router=self.router,
                engine=self.engine,
                model_state=self.model_state,
                publish=self.publish,
                key_store=lambda: self.keys,
                host_snapshots=lambda: [host.snapshot() for host in self.hosts.values()],
            ),
            batches_deps=batches.BatchDeps(
                config=config,
                catalog=self.catalog,
                batch_store=self.batch_store,
                batch_runner=self.batch_runner,
                scope_of=self.scope_of,
                log=self.log,
            ),
            dashboard_deps=dashboard.DashboardDeps(
                config=config,
                catalog=self.catalog,
                admission=self.admission,
                timeline=self.timeline,
                engine=self.engine,
                db_health=self.db_health,
                batch_store=self.batch_store,
                dashboard_sessions=self.dashboard_sessions,
                key_store=lambda: self.keys,
                authentication=lambda: self.identity,
                event_bus=lambda: self.bus,
                is_draining=lambda: self.draining,
                admin_route=lambda method, path: self.dispatch.match(method, path),
                sso_client=lambda: self.sso,
                host_snapshots=lambda: [host.snapshot() for host in self.hosts.values()],
            ),
            ops_deps=ops.OpsDeps(
                config=config,
                catalog=self.catalog,
                db_health=self.db_health,
                quota=self.quota,
                metrics=self.metrics,
                event_bus=lambda: self.bus,
                is_draining=lambda: self.draining,
            ),
            openapi_deps=self.openapi,
            metrics_public=config.server.metrics_public,
        )
        self.openapi.openapi = orjson.dumps(openapi.document(table, _version(), list(config.models)))
        self.dispatch = Dispatcher(
            config,
            table,
            exchanges=self.exchanges,
            metrics=self.metrics,
            usage=self.usage,
            router=self.router,
            db_health=self.db_health,
            log=self.log,
            identity=lambda: self.identity,
        )
        self.routes = self.dispatch.routes  # (read by tests and the batch routes' scope_of)
        self.pattern_routes = self.dispatch.pattern_routes

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.dispatch.handle(scope, receive, send)
        elif kind == "lifespan":
            await lifecycle.lifespan(self, receive, send)
        elif kind == "websocket":
            await refuse_websocket(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.dispatch.handle(scope, receive, send)

    @property
    def tracing(self) -> Tracing | None:
        return self.dispatch.tracing

    @tracing.setter
    def tracing(self, tracing: Tracing | None) -> None:  # built at preflight when enabled (tests set their own)
        self.dispatch.tracing = tracing

    def scope_of(self, endpoint: str) -> str:
        """The scope a client needs to POST to `endpoint` (the route table's): a batch line needs it too."""
        return self.routes[("POST", endpoint)].scope

    # -- life -----------------------------------------------------------------------------------

    async def preflight(self) -> None:
        await lifecycle.preflight(self)

    async def startup(self) -> None:
        await lifecycle.startup(self)

    async def shutdown(self) -> None:
        await lifecycle.shutdown(self)

    # -- state shared between processes --------------------------------------------------------

    async def publish(self, event: dict[str, Any]) -> None:
        """Tell every process (this one directly, the others over the bus when there is one). The change is
        already saved: if Redis does not take the event, the others see it within the key cache's short TTL
        (they are not connected either) or at their next poll, so this never fails the admin's request."""
        self.on_event(event)
        if self.bus is not None:
            await self.bus.publish(event)

    def on_bus_connection(self, connected: bool) -> None:
        self.metrics.bus_connected.set(1 if connected else 0)
        if self.identity is not None:
            self.identity.revocations_pushed(connected)
        if connected:
            # A switch made between the last poll and the subscription is in no event: read it once.
            task = asyncio.get_running_loop().create_task(read_model_state(self))
            self.background_tasks.append(task)
            task.add_done_callback(self.background_tasks.remove)

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "key" and self.identity is not None:
            self.identity.invalidate(str(event.get("id")))
        elif event.get("type") == "tenancy":
            # What a team or an organisation grants or limits changed: read every key and make every plan again.
            if self.identity is not None:
                self.identity.invalidate_all()
            self.quota.forget_plans()
        elif event.get("type") == "model":
            name = str(event.get("name"))
            if event.get("disabled"):
                self.catalog.disabled.add(name)
            else:
                self.catalog.disabled.discard(name)

    # -- replicas and breakers -----------------------------------------------------------------

    def _on_breaker(self, breaker: Breaker, old: BreakerState, new: BreakerState, reason: str) -> None:
        replica = self._replica_of[breaker]
        self.metrics.breaker_transitions.labels(replica.model, replica.name, new.value).inc()
        log = self.log.warning if new is BreakerState.OPEN else self.log.info
        log("breaker", model=replica.model, replica=replica.name, old=old.value, new=new.value, reason=reason)
        self.admission.kick(replica.model)
        if new is BreakerState.OPEN:
            self.admission.kick_later(replica.model, breaker.config.open_s)

    def _on_replica_change(self, replica: Replica) -> None:
        if self.warm.enabled:
            self.warm.changed(replica)  # back after being down: its saved system prompts go back into its slots
        if replica.state is ReplicaState.DOWN and self._elsewhere(replica):
            # Probes found it dead (hung, gone): the attempts still waiting on it for an answer would wait out
            # their whole time limit. Cut them now (the watchdog's next tick) and retry them elsewhere. Streams
            # that are flowing are left alone: their tokens say the replica lives (the idle limit watches them).
            # With nowhere else to go they wait on: probes cannot tell a hung replica from a swamped one.
            # One that answered requests while its probes failed is swamped, not hung: its requests are left.
            if replica.answered_at < replica.failing_since:
                now = asyncio.get_running_loop().time()
                for ex in self.exchanges:
                    if ex.replica is replica and ex.deadline > 0.0 and ex.streamed_tokens == 0:
                        ex.replica_lost = True
                        ex.deadline = now
        self.admission.kick(replica.model)

    def _elsewhere(self, replica: Replica) -> bool:
        """Is there another usable replica of its model, or of a fallback, to retry its requests on?"""
        now = time.monotonic()
        models = [replica.model, *self.catalog.fallbacks.get(replica.model, [])]
        usable = (r for m in models if m not in self.catalog.disabled for r in self.catalog.models[m])
        return any(r is not replica and r.usable(now) for r in usable)

    # -- graceful shutdown --------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: stop being ready at once; the server stops accepting after the grace."""
        if not self.draining:
            self.draining = True
            self.log.info("draining", in_flight=len(self.exchanges))
            # Queued requests have not started: answer them now (503 + Retry-After), do not drop them.
            self.admission.close()
            if self.batch_runner is not None:  # its running lines go back to pending for the next process
                self.batch_runner.drain()

    def cut_in_flight(self) -> None:
        """The shutdown deadline: end whatever is still running (streams get an error event)."""
        for ex in list(self.exchanges):
            if ex.route not in self.dispatch.quiet:
                ex.abort(Abort.SHUTDOWN)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("portcullis")
    except PackageNotFoundError:
        return "0"


def create_app(config: Config) -> Gateway:
    return Gateway(config)
