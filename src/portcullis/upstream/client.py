"""One pooled HTTP client per upstream replica, and the translation of its failures into our tree.

The connections are upstream/h1.py's (HTTP/1.1 on httptools): aiohttp, which they replace, was the largest part of
the gateway's CPU per request, and the faster Rust clients do not stop a cancelled request (h1.py says more). Each
replica has three sets of connections:

  traffic   a keep-alive pool of at most `max_connections` (the deployment's, or
            `upstream.max_connections_per_replica`). Requests wait for a free one at most `pool_s`; that
            wait is the gateway's own congestion, never evidence against the replica (`PoolExhausted`).
  fresh     a connection opened for one request and closed after it: the second try of a request whose
            pooled connection turned out to be dead (below).
(Health probes have connections of their own too, on a thread of their own: upstream/probe.py.)

A pooled connection can die while idle: llama-server (cpp-httplib) closes a keep-alive connection idle
for 5 s (uvicorn, under vLLM, too). The close is noticed only once the event loop reads it; a request that takes
the connection in the meantime finds the server gone before any answer (h1.Broken, `stale`). That says nothing
about the replica, so the request is sent once more on a fresh connection at once; only if that one fails too is
it a failure of the replica. Pooled connections are not reused after `keepalive_s` (default 4 s, under those
servers' 5 s), which makes the race rare.

Error messages here never name the upstream's address: the client sees the model, not our network.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import aiohttp
import orjson

from portcullis.config import UpstreamConfig, UpstreamTimeouts
from portcullis.errors import (
    BadGateway,
    ContextLengthExceeded,
    GatewayError,
    GatewayTimeout,
    ServiceUnavailable,
    UpstreamError,
)
from portcullis.upstream.h1 import Broken, ConnectFailed, H1Pool, H1Response

_JSON = {"content-type": "application/json"}
_POST = b"POST"


# (The moderators' own aiohttp sessions, safety/moderators.py.) What a pooled connection that the server had
# already closed fails with (the request never reached it). ClientConnectorError (a ClientOSError too) is not one
# of them: no connection could be made at all.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)


def stale_connection(exc: BaseException) -> bool:
    """Did the request fail on a connection that was already dead (worth one more try on a fresh one)?"""
    return isinstance(exc, _STALE) and not isinstance(exc, aiohttp.ClientConnectorError)


class PoolExhausted(ServiceUnavailable):
    """Every pooled connection to the replica stayed busy for `pool_s`: the gateway's congestion."""


class UpstreamClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        config: UpstreamConfig,
        timeouts: UpstreamTimeouts,
        max_connections: int | None = None,
    ) -> None:
        self.base_url = base_url
        t = timeouts
        self.pool_s = t.pool_s
        self.max_connections = max_connections or config.max_connections_per_replica
        # Free traffic connections; waited for (at most pool_s) only when none is free.
        self._free = asyncio.Semaphore(self.max_connections)
        self.in_use = 0
        self.fresh_retries = 0  # requests re-sent on a fresh connection after a pooled one was dead
        self.pool_timeouts = 0
        self._headers = dict(_JSON)
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._connect_s = t.connect_s
        self._keepalive_s = config.keepalive_s
        self._pool = self._new_pool(base_url)

    def _new_pool(self, base_url: str) -> H1Pool:
        return H1Pool(base_url, connect_s=self._connect_s, keepalive_s=self._keepalive_s, headers=self._headers)

    @property
    def base_url(self) -> str:
        return self._base_url

    @base_url.setter
    def base_url(self, url: str) -> None:
        """A launched server started again on another port (hosts/launch.py): the old connections go."""
        self._base_url = url
        old = getattr(self, "_pool", None)
        if old is not None:
            old.close()
            self._pool = self._new_pool(url)

    async def post(self, path: str, body: bytes, *, model: str) -> H1Response:
        """Send the request; return the answer once its head arrived (the body is the caller's)."""
        try:
            return await self._pool.request(_POST, path, body)
        except Broken as exc:
            if not exc.stale:
                raise translate_exception(exc, model) from exc
            # A pooled connection that was already dead (or the replica went away): try a fresh one.
        except GatewayError:
            raise
        except Exception as exc:
            _out_of_descriptors(exc)
            raise translate_exception(exc, model) from exc
        self.fresh_retries += 1
        try:
            return await self._pool.request(_POST, path, body, fresh=True)
        except Exception as exc:
            _out_of_descriptors(exc)
            raise translate_exception(exc, model) from exc

    async def acquire(self) -> None:
        """Take one of the replica's traffic connections (give it back with `release`), waiting at most
        `pool_s` when all are busy."""
        free = self._free
        if not free.locked():
            await free.acquire()  # returns at once
            self.in_use += 1
            return
        try:
            async with asyncio.timeout(self.pool_s):
                await free.acquire()
            self.in_use += 1
        except TimeoutError:
            self.pool_timeouts += 1
            raise PoolExhausted(
                f"All {self.max_connections} connections to a replica stayed busy for {self.pool_s:g} s.",
                code="upstream_pool_exhausted",
                headers={"Retry-After": "1"},
            ) from None

    def release(self) -> None:
        self.in_use -= 1
        self._free.release()

    async def call(self, path: str, obj: Any, *, timeout_s: float = 5.0) -> tuple[int, Any]:
        """A small JSON POST beside the traffic (e.g. /tokenize): (status, parsed JSON or None)."""
        async with asyncio.timeout(timeout_s):
            resp = await self._pool.request(_POST, path, orjson.dumps(obj))
            try:
                raw = await resp.read()
            finally:
                resp.release()  # (closed instead when the limit cut the read short)
        try:
            return resp.status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return resp.status, None

    async def close(self) -> None:
        self._pool.close()


def _out_of_descriptors(exc: BaseException) -> None:
    """This process ran out of file descriptors (EMFILE, ENFILE): our own exhaustion, not the replica's."""
    os_error = exc.__cause__ if isinstance(exc, ConnectFailed) else getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.errno in (errno.EMFILE, errno.ENFILE):
        raise PoolExhausted(
            "The gateway has no file descriptors left for another upstream connection; try again shortly.",
            code="gateway_out_of_file_descriptors",
            headers={"Retry-After": "1"},
        ) from exc


def one_shot_session(timeout: aiohttp.ClientTimeout | None = None, limit: int = 0) -> aiohttp.ClientSession:
    """Connections opened for one request and closed after it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=limit),
        timeout=timeout or aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
    )


def translate_exception(exc: BaseException, model: str) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return GatewayTimeout(f"The upstream for model '{model}' did not answer in time.")
    if isinstance(exc, ConnectFailed | aiohttp.ClientConnectorError):
        return BadGateway(f"The upstream for model '{model}' could not be reached.")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return BadGateway(f"The connection to the upstream for model '{model}' failed.")
    return BadGateway(f"The upstream for model '{model}' failed unexpectedly.")


# llama-server's error types (server-common.cpp) and other backends' → our status and type.
_TYPE_BY_STATUS = {400: "invalid_request_error", 404: "invalid_request_error", 422: "invalid_request_error"}


def upstream_error(status: int, raw: bytes, *, model: str) -> GatewayError:
    """Normalise an upstream error answer into the OpenAI shape with the right status."""
    message = f"The upstream for model '{model}' answered with status {status}."
    up_type: str | None = None
    up_code: Any = None
    param: Any = None
    extra: dict[str, Any] = {}
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            up_type = err.get("type")
            up_code = err.get("code")
            param = err.get("param")
            extra = err
        elif isinstance(err, str):
            message = err

    if up_type == "exceed_context_size_error" or up_code == "context_length_exceeded":
        detail = ""
        if "n_prompt_tokens" in extra and "n_ctx" in extra:
            detail = f" (the prompt has {extra['n_prompt_tokens']} tokens; the context holds {extra['n_ctx']})"
        error = ContextLengthExceeded(
            f"This model's maximum context length was exceeded{detail}: {message}", param="messages"
        )
        # The backend's numbers stay beside OpenAI's fields: a client can shorten its prompt by what they tell.
        error.extra = {k: extra[k] for k in ("n_prompt_tokens", "n_ctx") if isinstance(extra.get(k), int)}
        return error
    if status == 503:
        loading = "loading" in message.lower()
        return ServiceUnavailable(
            f"The model '{model}' is loading; try again shortly." if loading else message,
            code="model_loading" if loading else "upstream_unavailable",
            headers={"Retry-After": "5"},
        )
    if status in (401, 403):
        # The upstream refused *our* credentials: the client's key is not at fault.
        return BadGateway(
            f"The gateway's credentials for the upstream of model '{model}' were refused.",
            code="upstream_auth_failed",
        )
    if status == 429:
        return UpstreamError(message, status=429, type="rate_limit_error", code="upstream_rate_limited")
    typ = _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return UpstreamError(
        message,
        status=status if 400 <= status <= 599 else 502,
        type=typ,
        code=up_code if isinstance(up_code, str) else None,
        param=param if isinstance(param, str) else None,
    )
