"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

from portcullis.api.common import Live
from portcullis.exchange import Exchange
from portcullis.http import Request

if TYPE_CHECKING:
    from portcullis.config import Config
    from portcullis.obs.metrics import Metrics
    from portcullis.quota.stage import Quota
    from portcullis.routing.catalog import Catalog
    from portcullis.store.health import DatabaseHealth


@dataclass(frozen=True, slots=True)
class OpsDeps(Live):
    """What the probes and the metrics endpoint read."""

    config: Config
    catalog: Catalog
    db_health: DatabaseHealth
    quota: Quota
    metrics: Metrics


async def healthz(api: OpsDeps, req: Request, ex: Exchange) -> None:
    """Alive: the process answers. Says nothing about the upstreams."""
    await req.respond_json(200, {"status": "alive"})


async def readyz(api: OpsDeps, req: Request, ex: Exchange) -> None:
    """Ready: not draining, and every configured model has at least one ready replica.

    The database and Redis are reported, never judged: a gateway whose database hangs still serves every
    key it has verified (and queues usage), so taking it out of its load balancer would turn a degraded
    dependency into an outage."""
    dependencies = _dependencies(api)
    if api.draining:
        await req.respond_json(
            503, {"status": "draining", "models_without_ready_replica": [], "dependencies": dependencies}
        )
        return
    missing = api.catalog.unready_models()
    if missing:
        await req.respond_json(
            503, {"status": "not_ready", "models_without_ready_replica": missing, "dependencies": dependencies}
        )
        return
    await req.respond_json(200, {"status": "ready", "dependencies": dependencies})


def _dependencies(api: OpsDeps) -> dict[str, Any]:
    found: dict[str, Any] = {"database": api.db_health.status()}
    if api.config.store.redis_url:
        found["redis"] = {
            "quota": "degraded" if api.quota.degraded else "ok",
            "bus": "connected" if api.bus is not None and api.bus.connected else "disconnected",
        }
    return found


async def metrics(api: OpsDeps, req: Request, ex: Exchange) -> None:
    await req.respond(200, api.metrics.render(), [(b"content-type", CONTENT_TYPE_LATEST.encode())])
