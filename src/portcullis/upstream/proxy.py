"""The upstream stage: balance onto a replica, call it over its pooled connection, relay the answer.

The client always sees the model name it asked for. For streams the gateway always asks the upstream
for the usage chunk (so tokens are never undercounted) and drops that chunk again when the client did
not ask for it. Responses are relayed as they arrive: a JSON body in one piece, a stream event by event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from portcullis.errors import BadGateway, GatewayError
from portcullis.http import Request
from portcullis.routing.balancer import pick
from portcullis.routing.catalog import Replica, ReplicaState
from portcullis.upstream.client import upstream_error
from portcullis.upstream.exchange import Exchange
from portcullis.upstream.relay import relay_sse


async def forward(
    req: Request,
    ex: Exchange,
    *,
    path: str,
    payload: dict[str, Any],
    replicas: list[Replica],
    model: str,
    top_up: Callable[[Exchange], Awaitable[bool]] | None = None,
) -> None:
    replica = pick(replicas)
    ex.replica = replica
    client_wants_usage = True
    if replica.upstream_model:
        payload["model"] = replica.upstream_model
    if ex.stream:
        options = payload.get("stream_options")
        client_wants_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        if not client_wants_usage:
            payload["stream_options"] = {**(options or {}), "include_usage": True}
    body = orjson.dumps(payload)
    assert replica.client is not None

    ex.watch_disconnect(req.wait_disconnect())
    replica.in_flight += 1
    resp = None
    t0 = time.perf_counter()
    try:
        try:
            resp = await replica.client.post(path, body, model=model)
        except BadGateway:
            # Passive health: a refused connection takes the replica out until the prober sees it back.
            replica.state = ReplicaState.DOWN
            replica.last_error = "connect failed"
            raise
        content_type = resp.headers.get("content-type", "")
        if resp.status >= 400:
            raw = await resp.read()
            ex.upstream_s = time.perf_counter() - t0
            raise upstream_error(resp.status, raw, model=model)
        if ex.stream and content_type.startswith("text/event-stream"):
            ex.upstream_s = time.perf_counter() - t0
            await relay_sse(req, resp, ex, model=model, client_wants_usage=client_wants_usage, top_up=top_up)
            return
        raw = await resp.read()
        ex.upstream_s = time.perf_counter() - t0
        await respond_as_requested_model(req, ex, raw, model)
    finally:
        replica.in_flight -= 1
        ex.stop_watching()
        if resp is not None:
            resp.release()


async def respond_as_requested_model(req: Request, ex: Exchange, raw: bytes, model: str) -> None:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            f"The upstream for model '{model}' sent an answer that is not JSON.", status=502, code="bad_upstream_answer"
        ) from exc
    if isinstance(answer, dict):
        if "model" in answer:
            answer["model"] = model
        ex.usage(answer.get("usage"))
    ex.finished = True
    await req.respond(200, orjson.dumps(answer))
