"""The gateway's life: what must hold before it serves (preflight: the auth setup, the database schema, the
key store, the bus, tracing), starting every component's background work, and stopping it in order. These
touch every component, so they take the composition root (gateway.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
from typing import TYPE_CHECKING

from portcullis.api.console import SsoClient
from portcullis.http import Receive, Send
from portcullis.identity import scopes
from portcullis.identity.auth import Identity
from portcullis.identity.jwt import JwtSetupError, JwtVerifier
from portcullis.identity.keys import KeyHasher, KeySecretMissing, KeyStore, key_id_of, key_secret
from portcullis.identity.tenancy import TenancyStore
from portcullis.obs.lag import LAG
from portcullis.obs.logging import flush_logs
from portcullis.obs.tracing import Tracing, TracingUnavailable
from portcullis.store import audit
from portcullis.store.bus import EventBus
from portcullis.store.db import make_engine, pending, upgrade
from portcullis.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from portcullis.app.gateway import Gateway

_MODEL_POLL_S = 1.0  # without Redis, how often each process re-reads which models are disabled
_THROUGHPUT_TICK_S = 10.0  # how often replicas' throughput (and hourly-priced deployments' prices) update


class StartupError(Exception):
    """The gateway cannot start with this configuration or database; the message says what to do."""


async def lifespan(gw: Gateway, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup(gw)
            except Exception as exc:
                gw.log.error("startup_failed", error=str(exc))
                flush_logs()
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown(gw)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def preflight(gw: Gateway) -> None:
    """Everything that must hold before serving: raises StartupError naming the fix."""
    auth = gw.config.auth
    if not (auth.api_keys or auth.jwt.enabled or auth.allow_anonymous):
        raise StartupError("auth: no way to authenticate: enable api_keys or jwt (or allow_anonymous for trials).")
    try:
        hasher = KeyHasher(key_secret(gw.config)) if auth.api_keys else None
    except KeySecretMissing as exc:
        raise StartupError(str(exc)) from exc
    jwt = None
    if auth.jwt.enabled:
        try:
            jwt = JwtVerifier(auth.jwt, set(gw.config.tiers))
        except (JwtSetupError, OSError, ValueError) as exc:
            raise StartupError(f"auth.jwt: {exc}") from exc
    if gw.config.dashboard.sso is not None:
        try:
            gw.sso = SsoClient(gw.config.dashboard.sso)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
    try:
        needs_migration = await pending(gw.engine)
    except Exception as exc:
        raise StartupError(f"store.database_url: cannot reach the database: {exc}") from exc
    if needs_migration:
        if not gw.config.store.auto_migrate:
            raise StartupError(
                "The database schema is not up to date. Run `portcullis db upgrade --config FILE` "
                "(or set store.auto_migrate: true)."
            )
        migrator = make_engine(gw.config.store.database_url)  # no statement deadline: may take long
        try:
            await upgrade(migrator)
        finally:
            await migrator.dispose()
    if hasher is not None:
        gw.keys = KeyStore(gw.engine, hasher)
    if gw.config.store.redis_url:
        gw.bus = EventBus(gw.config.store.redis_url, timeout_s=gw.config.store.redis_timeout_s)
    # Revocations count as pushed once the bus has subscribed (startup), and only while it stays so.
    gw.identity = Identity(
        gw.config,
        gw.keys if auth.api_keys else None,
        hasher,
        jwt,
        pushed_invalidation=False,
        health=gw.db_health,
        tenancy=TenancyStore(gw.engine) if jwt is not None and auth.jwt.team_claim else None,
    )
    # Failed authentications are counted where the quotas are: in Redis, shared by every process.
    gw.identity.throttle.shared = gw.quota.redis
    gw.metrics.count(
        "portcullis_event_bus_publish_failures",
        "Events (revocations, model switches) Redis did not take; the database still has them",
        lambda: gw.bus.publish_failures if gw.bus is not None else 0,
    )
    gw.metrics.count(
        "portcullis_auth_stale_keys",
        "Requests authenticated from a cached key while the database could not confirm it",
        lambda: gw.identity.stale_served if gw.identity is not None else 0,
    )
    if gw.config.tracing.enabled and gw.tracing is None:
        try:
            gw.tracing = Tracing(gw.config.tracing)
        except TracingUnavailable as exc:
            raise StartupError(str(exc)) from exc
    if auth.allow_anonymous:
        gw.log.warning("anonymous_access_enabled", detail="requests without credentials get every scope")
    await _bootstrap_admin_key(gw)


async def _bootstrap_admin_key(gw: Gateway) -> None:
    bootstrap = os.environ.get("PORTCULLIS_BOOTSTRAP_ADMIN_KEY")
    if not bootstrap or gw.keys is None:
        return
    key_id = key_id_of(bootstrap)
    if key_id is None:
        raise StartupError("PORTCULLIS_BOOTSTRAP_ADMIN_KEY is not a Portcullis key (pc-<16 hex>-<32+ chars>).")
    if await gw.keys.count() == 0:  # only on a first start: never resurrect a revoked key
        tier = max(gw.config.tiers, key=lambda t: gw.config.tiers[t].priority)
        await gw.keys.create(
            user="admin",
            tier=tier,
            scopes=tuple(sorted(scopes.ALL)),
            key=bootstrap,
            label="bootstrap admin key",
            actor=audit.SYSTEM,
        )
        gw.log.info("bootstrap_admin_key_created", key_id=key_id)


async def startup(gw: Gateway) -> None:
    if gw.identity is None:
        await preflight(gw)
    assert gw.identity is not None
    for replica in gw.catalog.all_replicas():
        replica.client = UpstreamClient(
            replica.url,
            api_key=replica.api_key,
            config=gw.config.upstream,
            timeouts=gw.config.timeouts_for(replica.model),
            max_connections=replica.max_connections,
        )
    gw.catalog.disabled = await gw.model_state.disabled_models()
    if gw.bus is not None:
        await gw.bus.start(gw.on_event, gw.on_bus_connection)
    # Model switches are polled from the database whenever the bus is not there to push them.
    gw.background_tasks.append(asyncio.create_task(_poll_model_state(gw)))
    gw.identity.start()
    await gw.moderation.start()
    LAG.start()
    gw.deadlines.start()
    gw.memory.start()
    gw.timeline.start()
    gw.admission.start()
    gw.quota.start()
    gw.usage.start()
    gw.background_tasks.append(asyncio.create_task(_tick_throughput(gw)))
    await gw.prober.first_round()
    gw.prober.start()
    for host in gw.hosts.values():  # (after the clients: a host may adopt models the server has loaded already)
        await host.start()
    gw.warm.start()
    if gw.batch_runner is not None:
        gw.batch_runner.start()
    # Everything allocated so far lives as long as the process: move it out of the collector's
    # reach, so the collections that per-request garbage triggers do not rescan it each time.
    gc.collect()
    gc.freeze()
    gw.log.info("started", models={m: [r.state.value for r in rs] for m, rs in gw.catalog.models.items()})


async def shutdown(gw: Gateway) -> None:
    if gw.batch_runner is not None:
        await gw.batch_runner.stop()
    await gw.prober.stop()
    for host in gw.hosts.values():  # waiting requests get their 503, launched processes end
        await host.stop()
    await gw.warm.stop()
    await gw.deadlines.stop()
    await gw.memory.stop()
    await LAG.stop()
    await gw.timeline.stop()
    await gw.admission.stop()
    for task in gw.background_tasks:
        task.cancel()
    await asyncio.gather(*gw.background_tasks, return_exceptions=True)
    if gw.identity is not None:
        await gw.identity.stop()
    await gw.quota.stop()
    await gw.cache.close()
    await gw.moderation.close()
    await gw.usage.stop()
    if gw.bus is not None:
        await gw.bus.close()
    if gw.sso is not None:
        await gw.sso.close()
    await gw.db_health.stop()
    for replica in gw.catalog.all_replicas():
        if replica.client is not None:
            await replica.client.close()
    await gw.engine.dispose()
    if gw.tracing is not None:
        await asyncio.to_thread(gw.tracing.shutdown)  # the last spans go out before the process ends
    gw.log.info("stopped")
    flush_logs()


async def _poll_model_state(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(_MODEL_POLL_S)
        if gw.bus is None or not gw.bus.connected:  # else pushed
            await read_model_state(gw)


async def read_model_state(gw: Gateway) -> None:
    try:
        async with asyncio.timeout(gw.config.store.timeout_s):
            gw.catalog.disabled = await gw.model_state.disabled_models()
    except Exception as exc:
        gw.log.warning("model_state_poll_failed", error=type(exc).__name__)


async def _tick_throughput(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(_THROUGHPUT_TICK_S)
        gw.catalog.tick()
