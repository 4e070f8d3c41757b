"""Requests the gateway makes to itself (batch lines): an ASGI scope built in process, carrying the batch
owner's principal under a key no network request can carry (dispatch.INTERNAL), through the whole request
path like a client's request, answered into a buffer; the refusal's code and wait come back as values.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from portcullis.app.dispatch import INTERNAL, Internal
from portcullis.http import Receive, Scope, Send
from portcullis.identity.principal import Principal
from portcullis.jobs.runner import Answer
from portcullis.obs.logging import isolated


class InternalCaller:
    """jobs.runner.InternalCall, over the dispatcher's `handle`."""

    def __init__(self, handle: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handle = handle

    async def __call__(self, method: str, path: str, body: bytes, principal: Principal, *, request_id: str) -> Answer:
        """Run one request through the whole request path as `principal`, in the background (batch lines):
        the status and body a client would have got, and a refusal's code and wait as values."""
        internal = Internal(principal)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
            "client": None,
            "server": None,
            INTERNAL: internal,
        }
        sent = False
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never  # nobody disconnects; the wait ends when the request's watcher is cancelled
            return {"type": "http.disconnect"}

        status = 0
        headers: dict[bytes, bytes] = {}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.update(message.get("headers", ()))
            else:
                chunks.append(message.get("body", b""))

        await isolated(self.handle(scope, receive, send))
        return Answer(status, b"".join(chunks), internal.error, _retry_after(headers) if status >= 400 else 0.0)


def _retry_after(headers: dict[bytes, bytes]) -> float:
    """A refusal's wait: retry-after-ms when given (the precise one), else Retry-After's seconds."""
    for name, scale in ((b"retry-after-ms", 1000.0), (b"retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            with contextlib.suppress(ValueError):
                return float(value) / scale
    return 0.0
