"""The OpenAI-compatible endpoints. Each handler reads top to bottom like the request path in DESIGN.md:

(authenticated, scope checked: app/dispatch.py) → read body (capped) → parse once → validate
→ route (the name resolved, allowed for this principal, a router's choice, context fit, prefix
placement) → admit quotas (priced by the chosen model) → moderate the input (before the rest, or
beside it in parallel mode; the output guard set for the relay) → cache / coalesce
→ admission (a slot of the model: now, after queueing, degraded, spilled, or 503) → upstream
attempts (affinity, retries, failover, breakers) → relay (output moderated; settled and recorded
when the response is over: app/dispatch.py)
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from portcullis.api.common import actor
from portcullis.errors import InvalidRequest
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity.auth import may_use, require_model
from portcullis.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from portcullis.quota import estimate
from portcullis.safety import validation
from portcullis.safety.moderation import GuardSlots

if TYPE_CHECKING:
    from portcullis.cache.batching import EmbeddingBatcher
    from portcullis.cache.exact import ResponseCache
    from portcullis.config import Config
    from portcullis.quota.stage import Quota
    from portcullis.routing.admission import Admission
    from portcullis.routing.catalog import Catalog
    from portcullis.routing.router import Router
    from portcullis.safety.moderation import Moderation
    from portcullis.store.model_state import ModelState
    from portcullis.surfaces.store import ResponseStore
    from portcullis.upstream.proxy import Upstream


@dataclass(frozen=True, slots=True)
class OpenAIDeps:
    """What the /v1 handlers use: the stages of the request path, in its order, and little else."""

    config: Config
    router: Router
    quota: Quota
    moderation: Moderation
    cache: ResponseCache
    batcher: EmbeddingBatcher | None
    admission: Admission
    upstream: Upstream
    catalog: Catalog
    model_state: ModelState
    publish: Callable[[dict[str, Any]], Awaitable[None]]  # tell every process (a model switched off)
    started_at: float
    responses: ResponseStore  # the Responses API's stored responses


async def read_object(api: OpenAIDeps, req: Request) -> dict[str, Any]:
    """The body (capped while read), parsed once into a JSON object."""
    body = await req.read_body(api.config.server.max_body_bytes)
    return validation.parse_json_object(body, api.config.validation)


async def admit_as_request(api: OpenAIDeps, req: Request, ex: Exchange, asked: Any) -> str:
    """A call that generates nothing (counting tokens, tokenizing, templating): the model it names, allowed for
    the principal and not a router, and the request admitted against request and concurrency limits with no
    tokens reserved or charged."""
    if not isinstance(asked, str):
        raise InvalidRequest("'model' is required (the gateway serves several).", param="model", code="invalid_value")
    name = api.catalog.resolve(asked)
    require_model(ex.principal, asked, name)
    if name in api.catalog.routers:
        raise InvalidRequest(f"'{asked}' is a router: name one of its models.", param="model", code="model_is_router")
    ex.model = name
    await api.quota.admit(req, ex, EmbeddingRequest.model_construct(model=name, input=""))
    ex.prompt_tokens = ex.completion_tokens = 0  # nothing generated, nothing charged
    return name


_CHAT, _TEXT = "/v1/chat/completions", "/v1/completions"


async def chat_completions(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    body = await req.read_body(api.config.server.max_body_bytes)
    payload = validation.parse_json_object(body, api.config.validation)
    del body  # (a stream's frame lives as long as it does: nothing it no longer needs stays here)
    await generate(api, req, ex, payload, validation.validate_chat(payload, api.config.validation), route=_CHAT)


async def completions(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    body = await req.read_body(api.config.server.max_body_bytes)
    payload = validation.parse_json_object(body, api.config.validation)
    del body
    await generate(api, req, ex, payload, validation.validate_completion(payload, api.config.validation), route=_TEXT)


async def generate(
    api: OpenAIDeps,
    req: Request,
    ex: Exchange,
    payload: dict[str, Any],
    request: ChatCompletionRequest | CompletionRequest,
    *,
    route: str,
    native: dict[str, Any] | None = None,
) -> None:
    """A validated chat (or completion) request through the rest of the path. The other APIs' requests come here
    as the chat or completion request they mean (api/surfaces.py, api/llama.py), their answers made by the
    exchange's surface; `native`: the request as the client sent it, for a replica that answers its API itself."""
    chat = isinstance(request, ChatCompletionRequest)
    ex.model, ex.stream = request.model, bool(request.stream)
    model = await api.router.route(req, ex, payload)
    await api.quota.admit(req, ex, request)
    del request  # the validated model (~1.4 KiB) is not needed past admission; a stream's frame would hold it
    async with api.moderation.screen(req, ex, payload, model, chat=chat):
        if await api.cache.answer(req, ex, payload, route=route, chat=chat):
            return  # from the cache, or shared with an identical request in flight
        if ex.moderation is not None and "redact" in ex.moderation:
            native = None  # the input was redacted in the request read from it: only that may go upstream
        path = _CHAT if chat else _TEXT
        async with api.admission.slot(req, ex, model, payload) as target:
            await api.upstream.forward(req, ex, path=path, payload=payload, target=target, native=native)


async def embeddings(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    body = await req.read_body(api.config.server.max_body_bytes)
    payload = validation.parse_json_object(body, api.config.validation)
    embedding = validation.validate_embedding(payload, api.config.validation)
    ex.model = embedding.model
    model = await api.router.route(req, ex, payload, generates=False)
    await api.quota.admit(req, ex, embedding)
    if api.batcher is not None and await api.batcher.join(req, ex, payload):
        return  # answered with its part of another request's merged call
    async with api.admission.slot(req, ex, model, payload) as target:
        await api.upstream.forward(req, ex, path="/v1/embeddings", payload=payload, target=target)


async def moderations(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    """OpenAI's moderation endpoint, answered by the gateway's own moderator pipeline; metered like a model
    call (the caller's request, token and concurrency limits), at most `moderation.max_inputs` inputs, the
    guard model's calls through its admission (moderation.GuardSlots)."""
    body = await req.read_body(api.config.server.max_body_bytes)
    payload = validation.parse_json_object(body, api.config.validation)
    texts = validation.moderation_inputs(payload, api.config.validation)
    cap = api.config.moderation.max_inputs
    if len(texts) > cap:
        raise InvalidRequest(
            f"'input' has {len(texts)} items; at most {cap} are allowed per moderation request.",
            param="input",
            code="too_many_inputs",
        )
    model = payload.get("model")
    name = model if isinstance(model, str) else None
    api.moderation.answering(name)  # 404 before anything is reserved when nothing could answer
    # Sized like an embeddings request: the inputs' tokens, no completion.
    sized = EmbeddingRequest.model_construct(model=name or "", input=texts)
    await api.quota.admit(req, ex, sized)
    results = await api.moderation.evaluate(texts, name, slots=GuardSlots(api.admission, ex.principal))
    ex.prompt_tokens = estimate.reservation(sized, api.config.quota)[0]  # settled (and recorded) as spent
    await req.respond_json(
        200,
        {
            "id": "modr-" + os.urandom(12).hex(),
            "model": model if isinstance(model, str) else "portcullis-moderation",
            "results": results,
        },
    )


def _model_object(api: OpenAIDeps, name: str, kind: str, target: str | None) -> dict[str, Any]:
    """OpenAI's model object, plus what kind of name it is (extra fields the SDK keeps and ignores)."""
    obj: dict[str, Any] = {"id": name, "object": "model", "created": int(api.started_at), "owned_by": "portcullis"}
    if kind == "router":
        obj["portcullis"] = {"kind": "router", "candidates": list(api.catalog.routers[name].candidates)}
    elif kind == "alias":
        obj["portcullis"] = {"kind": "alias", "of": target}
    else:
        obj["portcullis"] = {"kind": "model"}
        # The backend's own description of the model, as llama-server gives it (a client sizes prompts by n_ctx_train).
        for replica in api.catalog.models.get(name, ()):
            if replica.meta is not None and "meta" not in obj:
                obj["meta"] = replica.meta
            if replica.modalities is not None and "modalities" not in obj:
                obj["modalities"] = replica.modalities
    return obj


async def list_models(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    """Models, routers and aliases the caller may use."""
    data = [
        _model_object(api, name, kind, target)
        for name, kind, target in api.catalog.names()
        if may_use(ex.principal, name, target)
    ]
    await req.respond_json(200, {"object": "list", "data": data})


async def get_model(api: OpenAIDeps, req: Request, ex: Exchange, model: str) -> None:
    resolved = api.catalog.resolve(model)  # 404 model_not_found when unknown or disabled
    require_model(ex.principal, model, resolved)
    kind = "alias" if resolved != model else ("router" if model in api.catalog.routers else "model")
    await req.respond_json(200, _model_object(api, model, kind, resolved if kind == "alias" else None))


async def delete_model(api: OpenAIDeps, req: Request, ex: Exchange, model: str) -> None:
    """Switch a model off in the live catalog, on every process, persistently (OpenAI's delete shape)."""
    api.catalog.replicas_for(model)
    require_model(ex.principal, model)  # a principal limited to some models switches no other off
    # The state lives in the database, not the key store: a gateway taking only JWTs has it too.
    await api.model_state.set_model_disabled(model, True, actor=actor(api.config, req, ex))
    await api.publish({"type": "model", "name": model, "disabled": True})
    await req.respond_json(200, {"id": model, "object": "model", "deleted": True})
