"""The endpoints of the other APIs clients speak: OpenAI's Responses and Anthropic's Messages, and counting a
request's input tokens in each. A generating request is read into the chat request it means (surfaces/), the
exchange's surface set to answer in the client's API, and the chat request goes the whole request path
(api/openai.py `generate`): validation with the chat limits, routing, quotas, moderation, cache, admission,
upstream (natively to a replica that answers the API itself).

Counting is cheap and limited as a request (no tokens reserved): a replica that counts the API natively does,
else a llama-server counts the prompt its template makes (/apply-template, /tokenize), else the quota stage's
estimate answers (told in `x-portcullis-token-count: estimate`).
"""

from __future__ import annotations

import time
from typing import Any

from portcullis.api.common import query_params
from portcullis.api.openai import OpenAIDeps, admit_as_request, generate, read_object
from portcullis.errors import GatewayError, InvalidRequest
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.quota import estimate
from portcullis.routing.balancer import choose
from portcullis.safety import validation
from portcullis.surfaces import messages, responses
from portcullis.surfaces.messages import Messages
from portcullis.surfaces.responses import Responses

# -- Anthropic's Messages API ------------------------------------------------------------------------


async def create_message(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    payload = await read_object(api, req)
    chat_payload = messages.to_chat(payload)
    chat = validation.validate_chat(chat_payload, api.config.validation)
    ex.surface = Messages(chat.model, chat_payload.get("stop"))
    await generate(api, req, ex, chat_payload, chat, route="/v1/messages", native=payload)


async def count_message_tokens(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    payload = await read_object(api, req)
    chat_payload = messages.count_tokens_chat(payload)
    count = await _count(api, req, ex, payload, chat_payload, native="/v1/messages/count_tokens")
    await req.respond_json(200, {"input_tokens": count})


# -- OpenAI's Responses API --------------------------------------------------------------------------


def _owner(ex: Exchange) -> str:
    return ex.principal.user if ex.principal is not None else ""


async def _context(api: OpenAIDeps, ex: Exchange, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a request continues (previous_response_id): the stored response's context, its input
    and its output items."""
    previous = payload.get("previous_response_id")
    if previous is None:
        return []
    if not isinstance(previous, str):
        raise InvalidRequest("'previous_response_id' must be a string.", param="previous_response_id")
    context, own, response = await api.responses.get(_owner(ex), previous)
    items = context + own + list(response.get("output") or [])
    cap = api.config.responses.max_items
    if len(items) > cap:
        raise InvalidRequest(
            f"The conversation holds {len(items)} items; at most {cap} can be continued.",
            param="previous_response_id",
            code="conversation_too_long",
        )
    return items


async def create_response(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    payload = await read_object(api, req)
    store = payload.get("store", True)
    if not isinstance(store, bool):
        raise InvalidRequest("'store' must be a boolean.", param="store", code="invalid_value")
    context = await _context(api, ex, payload)
    own = responses.input_items(payload)
    chat_payload = responses.to_chat(payload, context)
    chat = validation.validate_chat(chat_payload, api.config.validation)
    owner = _owner(ex)

    async def keep(response: dict[str, Any]) -> None:
        # Stored before the client gets the answer (it may ask for it at once); never an answer refused or cut.
        if ex.error_code is None and response["status"] in ("completed", "incomplete"):
            await api.responses.put(owner, context, own, response)

    ex.surface = Responses(payload, keep if store else None)
    # Natively: the whole conversation as input (the backend stores nothing of ours).
    native = {k: v for k, v in payload.items() if k not in ("previous_response_id", "store")}
    native["input"] = context + own
    await generate(api, req, ex, chat_payload, chat, route="/v1/responses", native=native)


async def get_response(api: OpenAIDeps, req: Request, ex: Exchange, response_id: str) -> None:
    _, _, response = await api.responses.get(_owner(ex), response_id)
    await req.respond_json(200, response)


async def delete_response(api: OpenAIDeps, req: Request, ex: Exchange, response_id: str) -> None:
    if not await api.responses.delete(_owner(ex), response_id):
        raise GatewayError(
            f"No response found with id '{response_id}'.",
            status=404,
            type="invalid_request_error",
            code="response_not_found",
        )
    await req.respond_json(200, {"id": response_id, "object": "response", "deleted": True})


async def list_input_items(api: OpenAIDeps, req: Request, ex: Exchange, response_id: str) -> None:
    """The response's own input items (newest first unless ?order=asc), as OpenAI's list."""
    _, own, _ = await api.responses.get(_owner(ex), response_id)
    items = [{"id": item.get("id") or f"item_{response_id[5:]}_{i}", **item} for i, item in enumerate(own)]
    order = query_params(req).get("order", "desc")
    if order != "asc":
        items.reverse()
    await req.respond_json(
        200,
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        },
    )


async def count_response_tokens(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    payload = await read_object(api, req)
    context = await _context(api, ex, payload)
    chat_payload = responses.to_chat({**payload, "stream": False}, context)
    native = {k: v for k, v in payload.items() if k not in ("previous_response_id", "store", "stream")}
    native["input"] = context + responses.input_items(payload)
    count = await _count(api, req, ex, native, chat_payload, native="/v1/responses/input_tokens")
    await req.respond_json(200, {"object": "response.input_tokens", "input_tokens": count})


async def count_chat_tokens(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    payload = await read_object(api, req)
    chat_payload = {**payload, "stream": False}
    count = await _count(api, req, ex, payload, chat_payload, native="/v1/chat/completions/input_tokens")
    await req.respond_json(200, {"object": "chat.completion.input_tokens", "input_tokens": count})


# -- counting ------------------------------------------------------------------------------------------


async def _count(
    api: OpenAIDeps,
    req: Request,
    ex: Exchange,
    payload: dict[str, Any],
    chat_payload: dict[str, Any],
    *,
    native: str,
) -> int:
    """The input tokens of a request: counted by a replica of its model, natively or from its template, else
    estimated. Limited like a request of no tokens (request limits, concurrency), never as generation."""
    chat_payload.pop("max_tokens", None)
    chat = validation.validate_chat(chat_payload, api.config.validation)
    name = await admit_as_request(api, req, ex, chat.model)
    replica = choose(api.catalog.replicas_for(name), (), time.monotonic())
    if replica is not None:
        upstream_name = replica.upstream_model or name
        try:
            if replica.speaks(native, time.monotonic()):
                status, answer = await api.upstream.call(
                    replica, native, {**payload, "model": upstream_name}, model=name, timeout_s=10
                )
                if status < 300 and isinstance(answer, dict) and isinstance(answer.get("input_tokens"), int):
                    return int(answer["input_tokens"])
                if status in (404, 405):
                    replica.lacks(native, time.monotonic())
            if replica.kind == "llama_cpp":
                count = await _template_count(api, replica, {**chat_payload, "model": upstream_name}, name)
                if count is not None:
                    return count
        except GatewayError:
            pass  # the estimate answers
    req.response_headers.append((b"x-portcullis-token-count", b"estimate"))
    return estimate.reservation(chat, api.config.quota)[0]


async def _template_count(api: OpenAIDeps, replica: Any, chat_payload: dict[str, Any], name: str) -> int | None:
    status, templated = await api.upstream.call(replica, "/apply-template", chat_payload, model=name, timeout_s=10)
    if status >= 300 or not isinstance(templated, dict) or not isinstance(templated.get("prompt"), str):
        return None
    ask = {"content": templated["prompt"], "add_special": True, "parse_special": True}
    status, tokens = await api.upstream.call(replica, "/tokenize", ask, model=name, timeout_s=10)
    if status >= 300 or not isinstance(tokens, dict) or not isinstance(tokens.get("tokens"), list):
        return None
    return len(tokens["tokens"])
