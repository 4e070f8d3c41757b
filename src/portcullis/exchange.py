"""The record of one request as it crosses the gateway, how it is cut short, and its response filters.

Every stage writes what it learned (model, replica, timings, tokens) here; the access log line and
the metrics are made from it at the end. An exchange can be aborted from outside: by a client that
disconnects, by the shutdown deadline, or by an interactive request that needs a background request's
slot. Abort cancels the request's task; the handler sees the reason and answers accordingly (nothing
for a gone client; a 503 or an in-band error event at shutdown).

Response filters are the response half of the stages (Envoy's encoder chain). A stage that admits a
request and has work to do on its answer appends a `ResponseFilter` to `Exchange.filters`; the upstream
stage runs whole answers and stream events through them in that order (the stage that admitted the
request first sees the answer first: the quota meter before the output guard before the cache, which
stores what the client got), and the dispatcher (app/dispatch.py) calls every filter's `done` when the request is over,
in the reverse order (like a stack unwinding: the cache stores before the quota settles, the quota
settles before the usage record is written). Filters are how `upstream/` stays ignorant of quota, cache
and safety: it only knows this protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from portcullis.errors import sse_error

if TYPE_CHECKING:
    from portcullis.identity.principal import Principal
    from portcullis.obs.tracing import Trace
    from portcullis.routing.catalog import Replica

Chunk = dict[str, Any]  # one stream event's JSON (a chat.completion.chunk or a text_completion)


class Abort(StrEnum):
    """Why an exchange's task was cancelled from outside (the value is the task's cancel message). Every
    cancellation goes through `Exchange.abort`; the handler, or the stage that owns the reason, answers it."""

    CLIENT_GONE = "client_disconnected"
    SHUTDOWN = "shutdown"
    PREEMPTED = "preempted"  # a background (batch) request gave its slot to an interactive one
    # These two are taken back (`Exchange.resume`) by the stage they belong to, which answers them and goes on:
    DEADLINE = "upstream_deadline"  # an upstream attempt's time limit passed: retried, a 504 or an error event
    MODERATION = "moderation"  # a parallel input verdict refused the request: the refusal is the answer

    @property
    def final(self) -> bool:
        """Does the request end with it (rather than a stage answering it and going on)?"""
        return self not in (Abort.DEADLINE, Abort.MODERATION)


class ResponseFilter(Protocol):
    """The response half of a stage. `answers` / `streams` say whether the upstream stage must call
    `answer` / `event` and `flush` at all (it skips the filters that would only pass things on).

    - `answer`: a whole (non-streamed) answer, returned as the client should get it;
    - `event`: one stream event → the events to pass on now (none: held, or dropped);
    - `flush`: the stream is over (its last event, an upstream error event, a break): what is held;
    - `closing`: set by `event` or `flush` when the stream must end now (a budget spent, content refused):
      the error event to send after what passed; nothing more is relayed;
    - `done`: the request is over (`status` as the client got it); runs after the response is sent and
      must not wait (settle, store, learn, record: what must wait goes to a task of the stage's own).
    """

    answers: bool
    streams: bool
    closing: bytes | None

    async def answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]: ...

    async def event(self, ex: Exchange, chunk: Chunk) -> list[Chunk]: ...

    async def flush(self, ex: Exchange) -> list[Chunk]: ...

    def done(self, ex: Exchange, status: int) -> None: ...


class Filter:
    """A response filter that passes everything on: subclass it and override what the stage needs."""

    __slots__ = ()
    answers = False
    streams = False
    closing: bytes | None = None

    async def answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        return answer

    async def event(self, ex: Exchange, chunk: Chunk) -> list[Chunk]:
        return [chunk]

    async def flush(self, ex: Exchange) -> list[Chunk]:
        return []

    def done(self, ex: Exchange, status: int) -> None:
        return None


class Surface(Protocol):
    """The API the client speaks when it is not chat completions (OpenAI's Responses, Anthropic's Messages:
    surfaces/). Its request went upstream as chat completions, or natively and its answer was read back as chat
    (`decode_*`); the stages' response filters see chat answers and chunks either way, and the surface turns
    what they pass into the client's API at the last step, before the bytes go out.

    - `native`: the upstream path of the API's own endpoint, when a replica may answer it natively (else None);
    - `decode_answer` / `decode_event`: a native answer / stream event's JSON → the chat answer / chunk (or
      None) and whether it is the stream's last event;
    - `answer`: a whole chat answer (as the filters left it) → the API's answer;
    - `events`: stream chunks → the API's events (SSE bytes; the first call opens the API's stream);
    - `end`: the stream is over and whole → the API's closing events;
    (`answer` and `end` may wait: a stored response is written before the client can ask for it)
    - `error`: the stream ends in error → the API's error event (after closing what it can)."""

    @property
    def native(self) -> str | None: ...

    @property
    def native_length(self) -> str:
        """The API's own name of the answer's length limit (max_tokens, max_output_tokens, n_predict)."""
        ...

    def decode_answer(self, answer: dict[str, Any]) -> dict[str, Any]: ...

    def decode_event(self, event: dict[str, Any]) -> tuple[Chunk | None, bool]: ...

    async def answer(self, answer: dict[str, Any]) -> dict[str, Any]: ...

    def events(self, chunks: list[Chunk]) -> bytes: ...

    async def end(self) -> bytes: ...

    def error(self, message: str, *, type: str, code: str | None) -> bytes: ...


class Client(Protocol):
    """What the disconnect watch needs of a request (http.Request)."""

    def on_disconnect(self, callback: Callable[[], None] | None) -> bool: ...

    def wait_disconnect(self) -> Coroutine[Any, Any, None]: ...


@dataclass(slots=True, eq=False)
class Exchange:
    route: str
    task: asyncio.Task[None] | None
    started_at: float
    request_id: str = ""
    principal: Principal | None = None
    model: str | None = None
    replica: Replica | None = None
    stream: bool = False
    upstream_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_code: str | None = None
    abort_reason: Abort | None = None
    # The response half of the stages that admitted this request, in the order they did (see the module's
    # docstring); the app's usage record and the router's learning are among them for metered routes.
    filters: list[ResponseFilter] = field(default_factory=list)
    # The quota stage's estimate of the prompt's tokens: what a request cut before the upstream's usage
    # counts is charged for its prompt (`account`). 0 when nothing was reserved.
    prompt_estimate: int = 0
    streamed_tokens: int = 0  # content chunks relayed (one token each from llama-server)
    cost: float = 0.0
    cache_hit: bool = False
    queue_s: float = 0.0  # waiting for a slot (admission)
    # Non-streamed answers: the upstream's own prompt time (llama-server's timings.prompt_ms), the
    # nearest thing to a time to first token that a one-piece answer tells.
    prompt_s: float | None = None
    attempts: int = 0
    # The current upstream attempt's time limit (loop time; 0: none); deadline.py aborts it when it passes.
    deadline: float = 0.0
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
    # The prefix blocks the affinity placement counted on finding at the replica (0: none), and the prompt tokens the
    # answer says were taken from the replica's cache (usage.prompt_tokens_details.cached_tokens, timings.cache_n).
    affinity_depth: int = 0
    cached_tokens: int | None = None
    timings: dict[str, Any] | None = None
    # Background work (a batch line): never queued, preempted when an interactive request needs the slot.
    background: bool = False
    low_priority: bool = False
    # Moderation: what it did ("input:redact,output:block"; the usage record's `moderation`), and a
    # fingerprint of the output policy that judges the answer (the cache keys on it; None: no output guard).
    moderation: str | None = None
    output_policy: str | None = None
    trace: Trace | None = None  # the request's spans when tracing is on
    # The client's API when it is not chat completions (see Surface); `native`: the current attempt went to the
    # API's own endpoint, so its answer is decoded back to chat before the filters see it.
    surface: Surface | None = None
    native: bool = False
    # Set just before the last byte is handed to the server: from then on nothing may cancel us.
    finished: bool = False
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    _hooked: Client | None = field(default=None, repr=False)  # told us it tells of a disconnect

    def abort(self, reason: Abort) -> None:
        """Cancel the request's task for `reason`; not once its last byte is on its way, and not over a reason
        already given, unless that one would be taken back and this one ends the request (a client that
        leaves while a deadline is being answered must still be seen as gone)."""
        current = self.abort_reason
        if self.finished or self.task is None or (current is not None and (current.final or not reason.final)):
            return
        self.abort_reason = reason
        self.task.cancel(reason)

    def resume(self, reason: Abort) -> bool:
        """In the stage that owns `reason`, handling a CancelledError: if that is why, take the cancellation
        back (the stage answers it) and return True; False when it is another reason, not the stage's to answer."""
        if self.abort_reason is not reason:
            return False
        self.abort_reason = None
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True

    def watch_disconnect(self, client: Client) -> None:
        """Abort when the client goes away (the body must have been read already). Once per exchange:
        the queue starts watching, the upstream stage keeps the same watcher. Told by the server when it can
        (no task), else by a task waiting in the request's `receive`."""
        if self._watcher is not None or self._hooked is not None:
            return
        if client.on_disconnect(self._client_gone):
            self._hooked = client
            return

        def _gone(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.abort(Abort.CLIENT_GONE)

        self._watcher = asyncio.ensure_future(client.wait_disconnect())
        self._watcher.add_done_callback(_gone)

    def _client_gone(self) -> None:
        self._hooked = None
        self.abort(Abort.CLIENT_GONE)

    def stop_watching(self) -> None:
        if self._hooked is not None:
            self._hooked.on_disconnect(None)
            self._hooked = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def error_event(self, message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
        """The event that ends a started stream in error, in the client's API (every such event is made here)."""
        if self.surface is not None:
            return self.surface.error(message, type=type, code=code)
        return sse_error(message, type=type, code=code)

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            if isinstance(prompt, int):
                self.prompt_tokens = prompt
            if isinstance(completion, int):
                self.completion_tokens = completion
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.cached_tokens = details["cached_tokens"]

    def account(self, status: int) -> None:
        """The request is over: its tokens are the upstream's own counts when it gave them, otherwise what
        we can show it spent (never less), priced at the replica that served it."""
        prompt = self.prompt_tokens
        completion = self.completion_tokens
        if prompt is None and completion is None:
            if self.replica is None:
                prompt = completion = 0  # refused before any upstream was asked
            elif self.streamed_tokens or status == 200 or (self.abort_reason is not None and self.abort_reason.final):
                # Cut before the usage chunk, or an upstream that reports no usage: the prompt was read and
                # these tokens were sent.
                prompt, completion = self.prompt_estimate, self.streamed_tokens
            else:
                prompt = completion = 0
        prompt, completion = prompt or 0, completion or 0
        self.prompt_tokens, self.completion_tokens = prompt, completion
        replica = self.replica
        if replica is not None and (prompt or completion):
            self.cost = (prompt * replica.prompt_per_1k + completion * replica.completion_per_1k) / 1000
