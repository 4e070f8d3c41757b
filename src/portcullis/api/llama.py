"""llama.cpp's own endpoints, which editors and front-ends are built on, and rerank.

- `POST /completion`, `POST /infill`: generation, the whole request path (read as the OpenAI completion they
  mean: validation, routing, quotas, moderation, cache, admission, retries), natively to a llama-server
  (surfaces/llama.py) or translated to /v1/completions;
- `POST /v1/rerank` (and `/rerank`): scored like embeddings (validated and sized as the query and documents'
  text), answered by a backend that reranks (llama-server `--reranking`, vLLM, TEI);
- `POST /tokenize`, `/detokenize`, `/apply-template`: a llama-server's tokenizer and chat template, for the
  model named in the body; cheap, limited as requests (no tokens reserved);
- `GET /props?model=...`: what the model's llama-server said of itself when last probed (read-only).

What changes a server (`POST /props`, slot save/restore/erase, LoRA adapters, model load/unload) is never
passed on: those paths answer 403.
"""

from __future__ import annotations

import time
from typing import Any

from portcullis.api.common import query_params
from portcullis.api.openai import OpenAIDeps, admit_as_request, generate, read_object
from portcullis.errors import Forbidden, GatewayError, InvalidRequest, NotFound
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.routing.balancer import choose
from portcullis.routing.catalog import Replica
from portcullis.safety import validation
from portcullis.surfaces.llama import Completion, to_completion

# -- generation ------------------------------------------------------------------------------------------


async def _complete(api: OpenAIDeps, req: Request, ex: Exchange, *, infill: bool) -> None:
    payload = await read_object(api, req)
    openai_payload = to_completion(payload, infill=infill)
    completion = validation.validate_completion(openai_payload, api.config.validation)
    ex.surface = Completion(completion.model, infill=infill)
    await generate(api, req, ex, openai_payload, completion, route=req.path, native=payload)


async def completion(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    await _complete(api, req, ex, infill=False)


async def infill(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    await _complete(api, req, ex, infill=True)


# -- rerank ----------------------------------------------------------------------------------------------


async def rerank(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    payload = await read_object(api, req)
    query, documents = payload.get("query"), payload.get("documents")
    if not isinstance(query, str) or not query:
        raise InvalidRequest("'query' must be a non-empty string.", param="query", code="invalid_value")
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise InvalidRequest(
            "'documents' must be a non-empty list of strings.", param="documents", code="invalid_value"
        )
    top_n = payload.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise InvalidRequest("'top_n' must be a positive integer.", param="top_n", code="invalid_value")
    # Validated and sized as the embeddings of its texts: the same limits on inputs and characters.
    sized = validation.validate_embedding(
        {"model": payload.get("model"), "input": [query, *documents]}, api.config.validation
    )
    ex.model = sized.model
    model = await api.router.route(req, ex, payload, generates=False)
    await api.quota.admit(req, ex, sized)
    async with api.admission.slot(req, ex, model, payload) as target:
        await api.upstream.forward(req, ex, path="/v1/rerank", payload=payload, target=target)


# -- the tokenizer, the template, the server's properties ---------------------------------------------------


async def _llama_replica(api: OpenAIDeps, req: Request, ex: Exchange, asked: Any) -> tuple[str, Replica]:
    """The model's llama-server replica to ask (after the request was admitted as a request of no tokens)."""
    name = await admit_as_request(api, req, ex, asked)
    replicas = [r for r in api.catalog.replicas_for(name) if r.kind == "llama_cpp"]
    if not replicas:
        raise NotFound(
            f"Model '{asked}' is not served by a llama-server: {req.path} is not available for it.",
            param="model",
            code="endpoint_not_available",
        )
    replica = choose(replicas, (), time.monotonic())
    if replica is None:
        raise GatewayError(f"No replica of model '{asked}' is available now.", status=503, code="no_healthy_upstream")
    return name, replica


def _checked(api: OpenAIDeps, path: str, payload: dict[str, Any], replica: Replica) -> None:
    """What each one sends the server is held to the limits a generating request is: a template's messages to the
    chat limits and the image URL policy (a server fetches an image it is given by URL), a text to the characters
    a prompt may hold, token ids to ints the model's vocabulary has."""
    limits = api.config.validation
    if path == "/apply-template":
        validation.validate_chat({**payload, "max_tokens": 1}, limits)
    elif path == "/tokenize":
        content = payload.get("content")
        if not isinstance(content, str) or len(content) > limits.max_total_chars:
            raise InvalidRequest(
                f"'content' must be a string of at most {limits.max_total_chars} characters.",
                param="content",
                code="invalid_value",
            )
    else:
        tokens = payload.get("tokens")
        vocabulary = (replica.meta or {}).get("n_vocab")
        top = vocabulary if isinstance(vocabulary, int) and vocabulary > 0 else 1 << 31
        if (
            not isinstance(tokens, list)
            or len(tokens) > limits.max_total_chars
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < top for t in tokens)
        ):
            raise InvalidRequest(
                f"'tokens' must be a list of token ids (integers from 0 to {top - 1}).",
                param="tokens",
                code="invalid_value",
            )


async def _side(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    payload = await read_object(api, req)
    name, replica = await _llama_replica(api, req, ex, payload.get("model"))
    _checked(api, req.path, payload, replica)
    payload["model"] = replica.upstream_model or name
    status, answer = await api.upstream.call(replica, req.path, payload, model=name, timeout_s=30, load=True)
    if status >= 400 or answer is None:
        message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
        raise GatewayError(
            message or f"The upstream for model '{name}' answered {req.path} with status {status}.",
            status=status if 400 <= status < 500 else 502,
            type="invalid_request_error" if 400 <= status < 500 else "server_error",
            code="upstream_error",
        )
    await req.respond_json(200, answer)


async def tokenize(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    await _side(api, req, ex)


async def detokenize(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    await _side(api, req, ex)


async def apply_template(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    await _side(api, req, ex)


async def props(api: OpenAIDeps, req: Request, ex: Exchange) -> None:
    """What the model's llama-server said of itself when last probed (nothing is asked of it now)."""
    name, replica = await _llama_replica(api, req, ex, query_params(req).get("model"))
    if replica.props is None:
        raise GatewayError(f"Model '{name}' has not told its properties yet.", status=503, code="not_probed_yet")
    await req.respond_json(200, {**replica.props, "model_alias": name})


async def blocked(api: OpenAIDeps, req: Request, ex: Exchange, *path_params: str) -> None:
    raise Forbidden(
        f"{req.method} {req.path} changes a backend server; the gateway does not pass it on. Operators change "
        "their servers directly.",
        code="endpoint_blocked",
    )
