"""The OpenAI-compatible endpoints. Each handler reads top to bottom like the request path in DESIGN.md:

    (authenticated, scope checked: app.py) → read body (capped) → parse once → validate
    → model allowed for this principal → look up the model → admit quotas → cache / coalesce
    → admission (a slot of the model: now, after queueing, degraded, or 503) → upstream attempts
    (retries, failover, breakers) → relay (settled and recorded when the response is over: app.py)

Stages still to come (moderation, routing) slot in between, in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from portcullis.http import Request
from portcullis.identity.auth import require_model
from portcullis.safety import validation
from portcullis.upstream.exchange import Exchange

if TYPE_CHECKING:
    from portcullis.app import Gateway


async def chat_completions(gw: Gateway, req: Request, ex: Exchange) -> None:
    body = await req.read_body(gw.config.server.max_body_bytes)
    payload = validation.parse_json_object(body, gw.config.validation)
    chat = validation.validate_chat(payload, gw.config.validation)
    ex.model, ex.stream = chat.model, bool(chat.stream)
    require_model(ex.principal, chat.model)
    gw.catalog.replicas_for(chat.model)  # 404 for an unknown or switched-off model
    await gw.quota.admit(req, ex, chat)
    if await gw.cache.answer(req, ex, payload, route="/v1/chat/completions", chat=True):
        return  # from the cache, or shared with an identical request in flight
    async with gw.admission.slot(req, ex, chat.model, payload) as target:
        await gw.upstream.forward(
            req, ex, path="/v1/chat/completions", payload=payload, target=target, top_up=gw.quota.stream_guard(ex)
        )


async def completions(gw: Gateway, req: Request, ex: Exchange) -> None:
    body = await req.read_body(gw.config.server.max_body_bytes)
    payload = validation.parse_json_object(body, gw.config.validation)
    completion = validation.validate_completion(payload, gw.config.validation)
    ex.model, ex.stream = completion.model, bool(completion.stream)
    require_model(ex.principal, completion.model)
    gw.catalog.replicas_for(completion.model)  # 404 for an unknown or switched-off model
    await gw.quota.admit(req, ex, completion)
    if await gw.cache.answer(req, ex, payload, route="/v1/completions", chat=False):
        return  # from the cache, or shared with an identical request in flight
    async with gw.admission.slot(req, ex, completion.model, payload) as target:
        await gw.upstream.forward(
            req, ex, path="/v1/completions", payload=payload, target=target, top_up=gw.quota.stream_guard(ex)
        )


async def embeddings(gw: Gateway, req: Request, ex: Exchange) -> None:
    body = await req.read_body(gw.config.server.max_body_bytes)
    payload = validation.parse_json_object(body, gw.config.validation)
    embedding = validation.validate_embedding(payload, gw.config.validation)
    ex.model = embedding.model
    require_model(ex.principal, embedding.model)
    gw.catalog.replicas_for(embedding.model)
    await gw.quota.admit(req, ex, embedding)
    if gw.batcher is not None and await gw.batcher.join(req, ex, payload):
        return  # answered with its part of another request's merged call
    async with gw.admission.slot(req, ex, embedding.model, payload) as target:
        await gw.upstream.forward(req, ex, path="/v1/embeddings", payload=payload, target=target)


async def list_models(gw: Gateway, req: Request, ex: Exchange) -> None:
    created = int(gw.started_at)
    allowed = ex.principal.models if ex.principal else None
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "portcullis"}
        for name in gw.catalog.enabled()
        if allowed is None or name in allowed
    ]
    await req.respond_json(200, {"object": "list", "data": data})


async def get_model(gw: Gateway, req: Request, ex: Exchange, model: str) -> None:
    require_model(ex.principal, model)
    gw.catalog.replicas_for(model)  # 404 model_not_found when unknown or disabled
    await req.respond_json(
        200, {"id": model, "object": "model", "created": int(gw.started_at), "owned_by": "portcullis"}
    )


async def delete_model(gw: Gateway, req: Request, ex: Exchange, model: str) -> None:
    """Switch a model off in the live catalog, on every process, persistently (OpenAI's delete shape)."""
    gw.catalog.replicas_for(model)
    assert gw.keys is not None
    await gw.keys.set_model_disabled(model, True)
    await gw.publish({"type": "model", "name": model, "disabled": True})
    await req.respond_json(200, {"id": model, "object": "model", "deleted": True})
