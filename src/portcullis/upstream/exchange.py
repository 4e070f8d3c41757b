"""The record of one request as it crosses the gateway, and how it is cut short.

Every stage writes what it learned (model, replica, timings, tokens) here; the access log line and
the metrics are made from it at the end. An exchange can be aborted from outside: by a client that
disconnects, or by the shutdown deadline. Abort cancels the request's task; the handler sees the
reason and answers accordingly (nothing for a gone client; a 503 or an in-band error event at shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from portcullis.identity.principal import Principal
from portcullis.routing.catalog import Replica

ABORT_CLIENT_GONE = "client_disconnected"
ABORT_SHUTDOWN = "shutdown"
ABORT_PREEMPTED = "preempted"  # a background (batch) request gave its slot to an interactive one


@dataclass(slots=True, eq=False)
class Exchange:
    route: str
    task: asyncio.Task[None] | None
    started_at: float
    principal: Principal | None = None
    model: str | None = None
    replica: Replica | None = None
    stream: bool = False
    upstream_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_code: str | None = None
    abort_reason: str | None = None
    # What the quota stage holds for this request until it is settled (quota/stage.py Held).
    quota: Any = None
    streamed_tokens: int = 0  # content chunks relayed (one token each from llama-server)
    cost: float = 0.0
    cache_hit: bool = False
    cache: Any = None  # a cacheable miss on its way upstream (cache/exact.py Ticket)
    batch: Any = None  # an embeddings batch this request leads (cache/batching.py Batch)
    queue_s: float = 0.0  # waiting for a slot (admission)
    # Non-streamed answers: the upstream's own prompt time (llama-server's timings.prompt_ms), the
    # nearest thing to a time to first token that a one-piece answer tells.
    prompt_s: float | None = None
    attempts: int = 0
    # The current upstream attempt's time limit (loop time; 0: none) and whether it passed (deadline.py).
    deadline: float = 0.0
    deadline_expired: bool = False
    # The attempt's replica was found dead while the attempt waited on it (health probes): cut it now.
    replica_lost: bool = False
    degraded: str | None = None  # what degradation changed, as told in x-portcullis-degraded
    # An output moderator failed open on this answer: it went out unjudged, so it is never cached (a hit would
    # hand the unjudged text to everyone under the policy for the cache's TTL).
    unjudged: bool = False
    # Routing: why a router chose the model (logged), the tokens a replica must hold (0: any), the
    # prompt's prefix keys (affinity), llama-server's `timings` of the answer.
    route_reason: str | None = None
    need: int = 0
    prompt_size: tuple[int, int] | None = None  # (UTF-8 bytes of the prompt's texts, framing tokens)
    affinity: tuple[bytes, ...] = ()
    timings: dict[str, Any] | None = None
    # Background work (a batch line): never queued, preempted when an interactive request needs the slot.
    background: bool = False
    low_priority: bool = False
    # Moderation: what it did ("input:redact,output:block"; the usage record's `moderation`), and the
    # output guard that judges the answer before the client sees it (safety/output.py).
    moderation: str | None = None
    output_guard: Any = None
    trace: Any = None  # the request's spans when tracing is on (obs/tracing.py Trace)
    # Set just before the last byte is handed to the server: from then on nothing may cancel us.
    finished: bool = False
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    def abort(self, reason: str) -> None:
        if self.finished or self.abort_reason is not None or self.task is None:
            return
        self.abort_reason = reason
        self.task.cancel(reason)

    def watch_disconnect(self, wait_disconnect: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Abort when the client goes away (the body must have been read already). Once per exchange:
        the queue starts watching, the upstream stage keeps the same watcher."""
        if self._watcher is not None:
            return

        def _gone(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.abort(ABORT_CLIENT_GONE)

        self._watcher = asyncio.ensure_future(wait_disconnect())
        self._watcher.add_done_callback(_gone)

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            if isinstance(prompt, int):
                self.prompt_tokens = prompt
            if isinstance(completion, int):
                self.completion_tokens = completion
