"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

from portcullis.exchange import Exchange
from portcullis.http import Request

if TYPE_CHECKING:
    from portcullis.app import Gateway


async def healthz(gw: Gateway, req: Request, ex: Exchange) -> None:
    """Alive: the process answers. Says nothing about the upstreams."""
    await req.respond_json(200, {"status": "alive"})


async def readyz(gw: Gateway, req: Request, ex: Exchange) -> None:
    """Ready: not draining, and every configured model has at least one ready replica.

    The database and Redis are reported, never judged: a gateway whose database hangs still serves every
    key it has verified (and queues usage), so taking it out of its load balancer would turn a degraded
    dependency into an outage."""
    dependencies = _dependencies(gw)
    if gw.draining:
        await req.respond_json(
            503, {"status": "draining", "models_without_ready_replica": [], "dependencies": dependencies}
        )
        return
    missing = gw.catalog.unready_models()
    if missing:
        await req.respond_json(
            503, {"status": "not_ready", "models_without_ready_replica": missing, "dependencies": dependencies}
        )
        return
    await req.respond_json(200, {"status": "ready", "dependencies": dependencies})


def _dependencies(gw: Gateway) -> dict[str, Any]:
    found: dict[str, Any] = {"database": gw.db_health.status()}
    if gw.config.store.redis_url:
        found["redis"] = {
            "quota": "degraded" if gw.quota.degraded else "ok",
            "bus": "connected" if gw.bus is not None and gw.bus.connected else "disconnected",
        }
    return found


async def metrics(gw: Gateway, req: Request, ex: Exchange) -> None:
    await req.respond(200, gw.metrics.render(), [(b"content-type", CONTENT_TYPE_LATEST.encode())])
