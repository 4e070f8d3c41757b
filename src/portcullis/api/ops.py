"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

from portcullis.http import Request
from portcullis.upstream.exchange import Exchange

if TYPE_CHECKING:
    from portcullis.app import Gateway


async def healthz(gw: Gateway, req: Request, ex: Exchange) -> None:
    """Alive: the process answers. Says nothing about the upstreams."""
    await req.respond_json(200, {"status": "alive"})


async def readyz(gw: Gateway, req: Request, ex: Exchange) -> None:
    """Ready: not draining, and every configured model has at least one ready replica."""
    if gw.draining:
        await req.respond_json(503, {"status": "draining", "models_without_ready_replica": []})
        return
    missing = gw.catalog.unready_models()
    if missing:
        await req.respond_json(503, {"status": "not_ready", "models_without_ready_replica": missing})
        return
    await req.respond_json(200, {"status": "ready"})


async def metrics(gw: Gateway, req: Request, ex: Exchange) -> None:
    await req.respond(200, gw.metrics.render(), [(b"content-type", CONTENT_TYPE_LATEST.encode())])
