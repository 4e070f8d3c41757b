"""The upstream stage: attempts on replicas (with retries and failover), each relayed to the client.

One request, up to `resilience.retries + 1` attempts, each on the least loaded usable replica not yet
tried that can hold the request (the first one preferably where its prompt prefix is cached: affinity),
then the model's fallbacks, then a replica already tried, with exponential backoff and full
jitter between them, within the retry budget and the model's `total_s`. Only failures before anything
reached the client are retried (routing/retry.py says which). Every attempt's outcome goes to the
replica's breaker. `x-portcullis-attempts` tells the client how many attempts were made.

Timeouts of one model (`upstream.timeouts`, `models.<m>.timeouts`): connect (the client's), then one limit
per attempt, kept by a watchdog (deadline.py) and moved as the request goes: time to first event for a
stream, then the idle limit between events, never past the request's total.

The client sees the model name it asked for (or the fallback that served it). For streams the gateway
always asks the upstream for the usage chunk (so tokens are never undercounted) and drops that chunk
again when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any

import orjson

from portcullis.errors import BadGateway, GatewayError, GatewayTimeout, ServiceUnavailable
from portcullis.exchange import Abort, Exchange
from portcullis.http import Request
from portcullis.obs.lag import LAG
from portcullis.routing.balancer import choose, unavailable
from portcullis.routing.catalog import Answer, Replica
from portcullis.routing.retry import RETRYABLE_STATUS, AttemptFailed, backoff_delay, retry_after_of
from portcullis.upstream.client import PoolExhausted, upstream_error
from portcullis.upstream.h1 import ConnectFailed
from portcullis.upstream.relay import end_stream_with_error, relay_sse

if TYPE_CHECKING:
    from portcullis.config import ResilienceConfig
    from portcullis.hosts.schedule import Host
    from portcullis.obs.metrics import Metrics
    from portcullis.routing.admission import Target
    from portcullis.routing.affinity import Affinity
    from portcullis.upstream.warm import WarmRestarts

_ATTEMPTS = b"x-portcullis-attempts"
_ATTEMPT_VALUES = [str(n).encode() for n in range(16)]


class Upstream:
    """The upstream stage of one gateway: its retry settings and where it reports retries."""

    def __init__(
        self,
        resilience: ResilienceConfig,
        metrics: Metrics,
        affinity: Affinity | None = None,
        hosts: dict[str, Host] | None = None,
    ) -> None:
        self.resilience = resilience
        self.metrics = metrics
        self.affinity = affinity
        # Hosts that load models on demand (router mode, launched servers): an attempt on one of their replicas
        # first waits there for its model (hosts/schedule.py).
        self.hosts = hosts or {}
        self.warm: WarmRestarts | None = None  # counts the system prompts worth keeping warm (warm.py)

    async def forward(
        self,
        req: Request,
        ex: Exchange,
        *,
        path: str,
        payload: dict[str, Any],
        target: Target,
        native: dict[str, Any] | None = None,
    ) -> None:
        """`payload` goes to `path`; with `native` (the request as the client sent it, in the API of the exchange's
        surface), a replica that answers that API's endpoint itself gets `native` there instead."""
        if ex.trace is not None:
            ex.trace.stage("upstream")
        if self.warm is not None:
            self.warm.observe(target.model, payload)
        client_wants_usage = True
        if ex.stream:
            options = payload.get("stream_options")
            client_wants_usage = bool(isinstance(options, dict) and options.get("include_usage"))
            if not client_wants_usage:
                payload["stream_options"] = {**(options or {}), "include_usage": True}
        bodies: dict[tuple[str, bool], bytes] = {}
        surface = ex.surface
        native_path = surface.native if surface is not None and native is not None else None
        if surface is not None and native is not None and isinstance(payload.get("max_tokens"), int):
            # The length as validation capped it and admission may have degraded it: the native request obeys it too.
            native[surface.native_length] = payload["max_tokens"]
        ex.watch_disconnect(req)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + target.timeouts.total_s
        target.budget.request()
        headers = req.response_headers
        headers.append((_ATTEMPTS, b"1"))
        attempts_at = len(headers) - 1
        tried: list[Replica] = []
        retries = self.resilience.retries
        last_error: GatewayError | None = None
        while True:
            found = self._next_replica(target, tried, ex)
            if found is None:  # nothing usable (left): the last attempt's error says more than "none left"
                raise last_error or unavailable(target.replicas)
            replica, model = found
            tried.append(replica)
            ex.attempts += 1
            headers[attempts_at] = (_ATTEMPTS, _ATTEMPT_VALUES[min(ex.attempts, 15)])
            upstream_name = replica.upstream_model or model
            ex.native = native_path is not None and replica.speaks(native_path, time.monotonic())
            body = bodies.get((upstream_name, ex.native))
            if body is None:
                source = native if ex.native and native is not None else payload
                source["model"] = upstream_name
                body = orjson.dumps(source)
                if ex.stream:
                    # orjson's result keeps its whole buffer (4 KiB at least, up to twice its length); a stream
                    # holds its body for its whole life (for a retry): a copy of its length, 4 KiB less per stream.
                    body = memoryview(body).tobytes()
                bodies[upstream_name, ex.native] = body
            host = self._host_of(replica)
            if host is not None:
                # Until its model serves (or a 503/504 that says why not): told as x-portcullis-model-wait-ms.
                try:
                    waited = await host.enter(replica, ex, deadline)
                except ServiceUnavailable as exc:
                    if exc.code != "model_load_failed":
                        raise
                    # Its model does not load: nothing goes to this replica until it is tried again; a fallback may
                    # serve meanwhile (the loop finds none usable otherwise, and this error is the answer).
                    last_error = exc
                    hold = retry_after_of(exc.headers.get("Retry-After")) or 1.0
                    replica.cooldown_until = time.monotonic() + hold
                    continue
                if waited:
                    headers.append((b"x-portcullis-model-wait-ms", str(round(waited * 1000)).encode()))
            try:
                entered = time.monotonic()
                try:
                    await self._attempt(
                        req,
                        ex,
                        replica,
                        path=native_path if ex.native and native_path is not None else path,
                        body=body,
                        model=model,
                        target=target,
                        deadline=deadline,
                        client_wants_usage=client_wants_usage,
                    )
                finally:
                    if host is not None:
                        host.leave(replica, time.monotonic() - entered)
                return
            except AttemptFailed as failure:
                if ex.native and native_path is not None and _lacks(failure.error):
                    # It does not answer the API's endpoint after all: learned, and translated on the same replica
                    # at once (no retry spent: nothing was wrong with the request or the replica).
                    replica.lacks(native_path, time.monotonic())
                    tried.pop()
                    ex.attempts -= 1
                    continue
                error = last_error = failure.error
                if not failure.retryable or ex.attempts > retries:
                    raise error from None
                delay = backoff_delay(self.resilience.backoff, ex.attempts)
                if failure.retry_after is not None:
                    replica.cooldown_until = time.monotonic() + failure.retry_after
                    if choose(target.replicas, tried, need=ex.need) is None and not _usable_fallbacks(target):
                        # The same replica again: honour its wait (plus 10 ms, as the loop's timers may
                        # wake a little early and find it still cooling down).
                        delay = max(delay, failure.retry_after + 0.01)
                if loop.time() + delay >= deadline or delay > self.resilience.backoff.max_s + 1e-9:
                    raise error from None
                if not target.budget.try_retry():
                    self.metrics.retry_budget_exhausted.labels(target.model).inc()
                    raise error from None
                self.metrics.retries.labels(target.model, failure.kind or "other").inc()
                await asyncio.sleep(delay)

    async def _attempt(
        self,
        req: Request,
        ex: Exchange,
        replica: Replica,
        *,
        path: str,
        body: bytes,
        model: str,
        target: Target,
        deadline: float,
        client_wants_usage: bool,
    ) -> None:
        """One call to one replica. Raises AttemptFailed when it failed before the client saw anything."""
        assert replica.client is not None
        ex.replica = replica
        ex.replica_lost = False
        timeouts = target.timeouts
        loop = asyncio.get_running_loop()
        # The attempt's limit: the first event (streams) or the total; the relay moves it per event.
        ex.deadline = min(deadline, loop.time() + timeouts.ttft_s) if ex.stream else deadline
        breaker = replica.breaker
        probe = breaker.acquire()
        if ex.trace is not None:
            ex.trace.attempt_started(replica.name, model)
        t0 = time.perf_counter()
        replica.begin(t0)
        resp: Answer | None = None
        ok: bool | None = None
        kind: str | None = None
        connection = False  # holding one of the replica's traffic connections
        try:
            try:
                await replica.client.acquire()
                connection = True
                resp = await replica.client.post(path, body, model=model)
            except PoolExhausted as exc:  # our own congestion: says nothing about the replica
                raise AttemptFailed(exc, kind="pool", retryable=True) from None
            except BadGateway as exc:
                ok, kind = False, "connect"
                if isinstance(exc.__cause__, ConnectFailed):
                    host = self._host_of(replica)
                    if host is not None and host.lost(replica):
                        ok = None  # its launched process is gone: the host starts it again for the retry
                    else:
                        # Passive health: a refused connection takes the replica out until the prober sees it back.
                        replica.mark_down("connect failed")
                raise AttemptFailed(exc, kind="connect", retryable=True) from None
            except GatewayTimeout as exc:
                ok, kind = False, "timeout"
                raise AttemptFailed(exc, kind="timeout", retryable=True) from None
            replica.answered_at = time.monotonic()
            status = resp.status
            if status < 400 and ex.stream and resp.headers.get("content-type", "").startswith("text/event-stream"):
                ex.upstream_s += time.perf_counter() - t0
                try:
                    fault = await relay_sse(
                        req,
                        resp,
                        ex,
                        model=model,
                        client_wants_usage=client_wants_usage,
                        idle_s=timeouts.idle_s,
                        deadline=deadline,
                    )
                except AttemptFailed as failure:
                    ok, kind = False, failure.kind
                    raise
                ok, kind = fault is None, fault
                return
            try:
                raw = await resp.read()
            except OSError as exc:  # (h1.Broken, a ConnectionError) nothing reached the client yet: retryable
                ok, kind = False, "connect"
                raise AttemptFailed(
                    BadGateway(f"The connection to the upstream for model '{model}' broke during its answer."),
                    kind="connect",
                    retryable=True,
                ) from exc
            ex.upstream_s += time.perf_counter() - t0
            if status >= 400:  # (an error answer, read whole like any other)
                refused = _failure(status, raw, resp.headers.get("retry-after"), model)
                ok, kind = refused.kind is None, refused.kind
                raise refused
            ok = True
            ex.deadline = 0.0  # from here on only the client is written to
            await respond_as_requested_model(req, ex, raw, model)
        except asyncio.CancelledError:
            if not ex.resume(Abort.DEADLINE):
                raise  # the client left, the shutdown deadline, a preemption: not ours to answer
            ok, kind = False, "timeout"
            if resp is not None:
                resp.close()  # cancels the generation upstream
                resp = None
            streaming = req.status != 0
            if not connection:  # the limit passed while waiting for a pooled connection: our congestion
                ok = kind = None
                exhausted = PoolExhausted(
                    f"No connection to a replica of model '{model}' came free in time.",
                    code="upstream_pool_exhausted",
                    headers={"Retry-After": "1"},
                )
                raise AttemptFailed(exhausted, kind="pool", retryable=ex.stream and loop.time() < deadline) from None
            if ex.replica_lost:
                ex.replica_lost = False
                message = f"The replica serving model '{model}' stopped answering its health probes."
                if streaming:
                    ok = kind = None
                    message += " The stream was ended."
                    await end_stream_with_error(req, ex, message, code="upstream_unavailable")
                    return
                # The probes' verdict took the replica out already: no second count for its breaker.
                ok = kind = None
                lost = BadGateway(message, code="upstream_unavailable")
                raise AttemptFailed(lost, kind=None, retryable=True) from None
            phase = "idle" if streaming else ("first_token" if ex.stream and loop.time() < deadline else "total")
            limit = {"idle": timeouts.idle_s, "first_token": timeouts.ttft_s, "total": timeouts.total_s}[phase]
            message = {
                "idle": f"The upstream for model '{model}' sent nothing for {limit:g} s; the stream was ended.",
                "first_token": f"The upstream for model '{model}' did not start answering within {limit:g} s.",
                "total": f"The upstream for model '{model}' did not finish within {limit:g} s.",
            }[phase]
            if streaming:
                await end_stream_with_error(req, ex, message, code="upstream_timeout")
                return
            raise AttemptFailed(GatewayTimeout(message), kind="timeout", retryable=phase == "first_token") from None
        finally:
            ex.deadline = 0.0
            replica.end(time.perf_counter())
            if kind == "timeout" and LAG.busy():
                ok = None  # our own loop was too busy to read the answer in time: no evidence against the replica
            breaker.record(ok, kind, probe=probe)
            if ex.trace is not None:
                ex.trace.attempt_ended(ok, kind, ex.ttft_s)
            if ok:
                _observe(replica, ex)
                if ex.affinity and self.affinity is not None:
                    self.affinity.verify(ex, replica)  # did it hold what the placement counted on?
                    self.affinity.remember(ex.affinity, replica)
            if resp is not None:
                if ok:
                    resp.release()
                else:
                    resp.close()
            if connection:
                replica.client.release()

    async def call(
        self,
        replica: Replica,
        path: str,
        obj: Any,
        *,
        model: str,
        timeout_s: float | None = None,
        load: bool = False,
    ) -> tuple[int, Any]:
        """A side call (routing/catalog.py SideCall): (status, the answer's JSON or None). Raises our error
        tree (BadGateway, GatewayTimeout, PoolExhausted) when there is no answer.

        It counts in the replica's in-flight requests, and what it shows against the replica goes to its
        breaker: a refused or broken connection, a 5xx. Nothing else does: a side call's limit is its caller's
        own (a semantic-cache lookup gives up after a couple of seconds), not evidence of a hung replica; it
        never takes a half-open breaker's probe (a replica that answers /tokenize may still fail generation);
        and its answers do not count as the replica answering traffic (`answered_at`, which tells a swamped
        replica from a hung one)."""
        assert replica.client is not None
        host = self._host_of(replica)
        if host is not None:
            # A host's model: only while it serves, unless the call is what the client asked for (`load`: a passthrough
            # /tokenize, a guard model's verdict); a count or an estimate is not worth a model switch.
            if not load and not replica.loaded:
                raise ServiceUnavailable(f"The model '{model}' is not loaded now.", code="model_not_loaded")
            loop = asyncio.get_running_loop()
            await host.enter(replica, None, loop.time() + host.settings.load_timeout_s + (timeout_s or 60.0))
            if isinstance(obj, dict) and "model" not in obj:
                obj = {**obj, "model": replica.upstream_model or model}  # (a router serves several: it routes by this)
            entered = time.monotonic()
            try:
                return await self._call(replica, path, obj, model=model, timeout_s=timeout_s)
            finally:
                host.leave(replica, time.monotonic() - entered)
        return await self._call(replica, path, obj, model=model, timeout_s=timeout_s)

    async def _call(
        self, replica: Replica, path: str, obj: Any, *, model: str, timeout_s: float | None
    ) -> tuple[int, Any]:
        assert replica.client is not None
        breaker = replica.breaker
        replica.begin(time.perf_counter())
        ok: bool | None = None
        kind: str | None = None
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    resp = await replica.client.post(path, orjson.dumps(obj), model=model)
                    try:
                        raw = await resp.read()
                    finally:
                        resp.release()  # (closed when the limit cut the read short)
            except TimeoutError:
                raise GatewayTimeout(f"The upstream for model '{model}' did not answer {path} in time.") from None
            except OSError as exc:  # (h1.Broken)
                ok, kind = False, "connect"
                if (host := self._host_of(replica)) is not None and host.lost(replica):
                    ok = None  # a launched process gone: its host starts it again; not the breaker's business
                raise BadGateway(f"The upstream for model '{model}' broke its answer to {path}.") from exc
            except GatewayError as exc:
                if not isinstance(exc, PoolExhausted):
                    ok, kind = False, "connect"
                raise
            status = resp.status
            ok, kind = (False, "5xx") if status >= 500 else (True, None)
            try:
                return status, orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                return status, None
        finally:
            replica.end(time.perf_counter())
            breaker.record(ok, kind)

    def _host_of(self, replica: Replica) -> Host | None:
        """The host whose scheduler loads the replica's model (None: a replica of its own)."""
        return self.hosts.get(replica.host) if replica.host is not None else None

    def _next_replica(self, target: Target, tried: list[Replica], ex: Exchange) -> tuple[Replica, str] | None:
        """An untried replica of the model (where its prefix is, first), else of its fallbacks in order,
        else one already tried."""
        now = time.monotonic()
        need = ex.need
        if ex.affinity and self.affinity is not None:
            replica = self.affinity.place(target.replicas, ex, tried, now)
            if replica is not None:
                return replica, target.model
        replica = choose(target.replicas, tried, now, need)
        if replica is not None:
            return replica, target.model
        fallbacks = _usable_fallbacks(target)
        for name, replicas in fallbacks:
            replica = choose(replicas, tried, now, need)
            if replica is not None:
                return replica, name
        replica = choose(target.replicas, (), now, need)
        if replica is not None:
            return replica, target.model
        for name, replicas in fallbacks:
            replica = choose(replicas, (), now, need)
            if replica is not None:
                return replica, name
        return None


def _observe(replica: Replica, ex: Exchange) -> None:
    """What a successful answer shows about the replica: llama-server's own timings, or our clock."""
    timings = ex.timings
    prefill = decode = ttft = None
    if isinstance(timings, dict):
        prefill = _number(timings.get("prompt_per_second"))
        decode = _number(timings.get("predicted_per_second"))
        prompt_ms = _number(timings.get("prompt_ms"))
        ttft = prompt_ms / 1000 if prompt_ms is not None else None
    elif ex.ttft_s is not None:
        ttft = max(0.0, ex.ttft_s - ex.queue_s)
    if decode is None and ex.completion_tokens and ex.upstream_s > 0:
        decode = ex.completion_tokens / ex.upstream_s
    replica.observe(ttft_s=ttft, prefill_tps=prefill, stream_tps=decode, completion_tokens=ex.completion_tokens)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def _usable_fallbacks(target: Target) -> list[tuple[str, list[Replica]]]:
    disabled = target.catalog.disabled
    return [(name, replicas) for name, replicas in target.fallbacks if name not in disabled]


def _failure(status: int, raw: bytes, retry_after: str | None, model: str) -> AttemptFailed:
    """An upstream error answer → what the breaker counts and whether to retry."""
    error = upstream_error(status, raw, model=model)
    wait = retry_after_of(retry_after)
    if wait is not None and status in (429, 503):
        error.headers = {**error.headers, "Retry-After": retry_after or "1"}
    if status == 429:
        return AttemptFailed(error, kind="429", retryable=True, retry_after=wait)
    if status == 501:  # a feature this model or server lacks (llama-server: infill without FIM tokens): not a fault
        return AttemptFailed(error, kind=None, retryable=False)
    if status in RETRYABLE_STATUS:
        return AttemptFailed(error, kind="5xx", retryable=True, retry_after=wait if status == 503 else None)
    if status >= 500 or isinstance(error, (BadGateway, ServiceUnavailable)):
        return AttemptFailed(error, kind="5xx", retryable=False)
    return AttemptFailed(error, kind=None, retryable=False)  # the client's 4xx: the replica is fine


async def respond_as_requested_model(req: Request, ex: Exchange, raw: bytes, model: str) -> None:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            f"The upstream for model '{model}' sent an answer that is not JSON.", status=502, code="bad_upstream_answer"
        ) from exc
    surface = ex.surface
    if surface is not None and not isinstance(answer, dict):
        # (an answer the filters cannot read is never passed on: it would go out unjudged and uncounted)
        raise GatewayError(
            f"The upstream for model '{model}' sent an answer of an unexpected shape.",
            status=502,
            code="bad_upstream_answer",
        )
    if surface is not None and ex.native:
        answer = surface.decode_answer(answer)  # the API's own answer, read as chat for the filters
    if isinstance(answer, dict):
        if "model" in answer:
            answer["model"] = model
        # What the upstream reported, before any filter can refuse the answer: its tokens are charged, its
        # timings teach the replica's speeds, either way.
        ex.usage(answer.get("usage"))
        if answer.get("object") == "chat.completion":
            _conform(answer)
        timings = answer.get("timings")
        if isinstance(timings, dict):
            ex.timings = timings
            if isinstance(timings.get("prompt_ms"), int | float):
                ex.prompt_s = timings["prompt_ms"] / 1000
        for f in ex.filters:  # the stages' response halves (exchange.py): split, judged, kept for the cache
            if f.answers:
                answer = await f.answer(ex, answer)
        ex.usage(answer.get("usage"))  # as a filter left it (an embeddings batch's leader: its own share)
        if surface is not None:
            answer = await surface.answer(answer)
    ex.finished = True
    await req.respond(200, orjson.dumps(answer))


def _conform(answer: dict[str, Any]) -> None:
    """What OpenAI's document requires of a chat answer and some backends leave out: each choice's `logprobs`
    and its message's `refusal` (null when there is none)."""
    for choice in answer.get("choices") or ():
        if isinstance(choice, dict):
            choice.setdefault("logprobs", None)
            message = choice.get("message")
            if isinstance(message, dict):
                message.setdefault("refusal", None)


# A 404 that names a model (llama-server's router mode, a proxy in front of several servers) is about the model,
# not the endpoint: it is passed on, and the replica keeps answering the API natively.
_MODEL_NOT_FOUND = re.compile(r"model[^.]*\bnot (?:be )?found|no such model|unknown model|model_not_found", re.I)


def _lacks(error: GatewayError) -> bool:
    """Does this answer to a native request say the server has no such endpoint?"""
    if error.status == 405:
        return True
    return error.status == 404 and not _MODEL_NOT_FOUND.search(f"{error.message} {error.code or ''}")
