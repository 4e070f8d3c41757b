"""Relay a server-sent-event stream from the upstream to the client, one event at a time.

Each event is forwarded as soon as its closing blank line arrives; nothing is held back. What the
relay understands (llama-server's habits, and OpenAI's):
  - `:` comment lines are keep-alive pings: forwarded, so the client's idle timers stay quiet;
  - `data: [DONE]` ends the stream;
  - a chunk with `choices: []` and `usage` is the usage chunk: counted, and forwarded only if the
    client asked for it (`stream_options.include_usage`);
  - `data: {"error": ...}` mid-stream (llama-server ends such a stream without [DONE]) is normalised
    to the OpenAI error shape and ends the stream; unless it is about the request itself, it counts
    against the replica like a broken connection;
  - an upstream that ends or breaks without either gets an error event appended: a stream is never
    silently truncated;
  - nothing reaches the client before the upstream's first event, so a replica that fails before it
    can be retried on another (routing/retry.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from portcullis.errors import BadGateway, error_body
from portcullis.http import Request
from portcullis.routing.retry import AttemptFailed
from portcullis.upstream.client import upstream_error
from portcullis.upstream.exchange import Exchange

if TYPE_CHECKING:
    from portcullis.safety.output import OutputGuard

_DONE = b"data: [DONE]\n\n"


def sse_error(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    return b"data: " + error_body(message, type=type, code=code) + b"\n\n"


async def relay_sse(
    req: Request,
    resp: aiohttp.ClientResponse,
    ex: Exchange,
    *,
    model: str,
    client_wants_usage: bool,
    top_up: Callable[[Exchange], Awaitable[bool]] | None = None,
    idle_s: float = 0.0,
    deadline: float = 0.0,
) -> str | None:
    """Relay the stream; None when the replica did its part, else the breaker's kind of failure: "connect"
    when the upstream broke the stream, "5xx" when it ended it with an error event of its own (the
    client got an error event either way).

    Nothing is sent to the client before the upstream's first event: if the upstream breaks before
    it, `AttemptFailed` is raised and another replica may serve the request. From the first event on,
    the attempt's limit (`ex.deadline`, set by the caller to the time-to-first-token limit) is moved to
    `idle_s` after each event, never past `deadline` (0: no limits, as in tests of the relay alone).
    `top_up`, when given, is asked for more budget each time the stream passes what it covers.
    """
    content = resp.content
    guard = ex.output_guard
    data_lines: list[bytes] = []
    finished = False  # [DONE] or an error event was relayed
    fault: str | None = None  # what the upstream's final error event says about the replica
    started = False
    broken: str | None = None
    perf = time.perf_counter
    clock = asyncio.get_running_loop().time
    while True:
        t = perf()
        try:
            line = await content.readline()
        except (aiohttp.ClientError, OSError) as exc:
            broken = f"the connection to the upstream broke ({type(exc).__name__})"
            break
        ex.upstream_s += perf() - t
        if not line:
            break
        if line[0] == 0x3A:  # ':' comment / keep-alive ping (before the first event: nobody to keep alive)
            if started:
                await req.stream_chunk(b":" + line[1:].rstrip(b"\r\n") + b"\n\n")
            continue
        if line.startswith(b"data:"):
            data_lines.append(line[5:].strip())
            continue
        if line.strip():  # event:, id:, retry: fields carry nothing we relay
            continue
        if not data_lines:
            continue
        data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
        data_lines.clear()
        chunk, out, finished = _translate(data, ex, model=model, client_wants_usage=client_wants_usage)
        if finished and chunk is None and data != b"[DONE]":
            fault = replica_fault(data)
        if not started:
            started = True
            await req.start_stream()
        if top_up is not None and ex.streamed_tokens > ex.quota.covered_tokens and not await top_up(ex):
            ex.streamed_tokens -= 1  # this token is not delivered, so not charged
            ex.error_code = "budget_exceeded"
            await req.stream_chunk(
                sse_error(
                    "The budget was spent during this response; it was ended after the tokens already paid for.",
                    type="rate_limit_error",
                    code=ex.error_code,
                )
            )
            finished = True
            break
        if guard is not None:
            out = await _guarded(guard, chunk, out, finished, ex)
            if guard.closing is not None:  # refused: what passed was sent, then the error event; no more
                await req.stream_chunk(out + guard.closing)
                finished = True
                break
        elif chunk is not None:
            out = _event(chunk, ex)
        if out:
            await req.stream_chunk(out)
        if finished:
            break
        if deadline:
            ex.deadline = min(deadline, clock() + idle_s)
    if not finished and data_lines:  # last event without its blank line
        data = b"\n".join(data_lines)
        chunk, out, finished = _translate(data, ex, model=model, client_wants_usage=client_wants_usage)
        if finished and chunk is None and data != b"[DONE]":
            fault = replica_fault(data)
        if chunk is not None:
            out = _event(chunk, ex) if guard is None else await _guarded(guard, chunk, out, finished, ex)
        if out:
            if not started:
                started = True
                await req.start_stream()
            await req.stream_chunk(out)
    if not started:
        reason = broken or "the upstream ended the stream before its first event"
        raise AttemptFailed(
            BadGateway(f"The upstream for model '{model}' failed before answering: {reason}."),
            kind="connect",
            retryable=True,
        )
    if not finished:
        reason = broken or "the upstream ended the stream before it was complete"
        if guard is not None and guard.closing is None:  # what the upstream did send, judged, goes first
            held = await _guarded(guard, None, b"", True, ex)
            if guard.closing is not None:
                await req.stream_chunk(held + guard.closing)
                ex.finished = True
                await req.end_stream()
                return "connect"
            if held:
                await req.stream_chunk(held)
        ex.error_code = "upstream_stream_truncated"
        await req.stream_chunk(
            sse_error(f"The stream for model '{model}' was cut short: {reason}.", code=ex.error_code)
        )
    ex.finished = True
    await req.end_stream()
    return "connect" if ex.error_code == "upstream_stream_truncated" else fault


async def end_stream_with_error(req: Request, ex: Exchange, message: str, code: str) -> None:
    """End a stream that has started with an error event (a timeout, the shutdown deadline)."""
    ex.error_code = code
    await req.stream_chunk(sse_error(message, code=code))
    ex.finished = True
    await req.end_stream()


def _translate(
    data: bytes, ex: Exchange, *, model: str, client_wants_usage: bool
) -> tuple[dict[str, Any] | None, bytes, bool]:
    """One upstream event's data → (a chunk to send, or None with the bytes to send; whether the stream is over)."""
    if data == b"[DONE]":
        return None, _DONE, True
    try:
        chunk: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        ex.error_code = "bad_upstream_answer"
        message = f"The upstream for model '{model}' sent an event that is not JSON."
        return None, sse_error(message, code=ex.error_code), True
    if not isinstance(chunk, dict):
        return None, b"data: " + data + b"\n\n", False
    if "error" in chunk:
        err = upstream_error(500, data, model=model)
        ex.error_code = err.code or err.type
        return None, b"data: " + err.body() + b"\n\n", True
    usage = chunk.get("usage")
    if usage:
        ex.usage(usage)
    timings = chunk.get("timings")
    if timings is not None:
        ex.timings = timings
    choices = chunk.get("choices")
    if choices == [] and usage is not None and not client_wants_usage:
        return None, b"", False
    if choices and _has_token(choices[0]):
        ex.streamed_tokens += 1
        if ex.ttft_s is None:
            ex.ttft_s = time.perf_counter() - ex.started_at
    if "model" in chunk:
        chunk["model"] = model
    return chunk, b"", False


# Error types (llama-server's and OpenAI's) that are about the request, not the server that answered it.
_REQUEST_ERRORS = frozenset(
    {
        "invalid_request_error",
        "exceed_context_size_error",
        "not_found_error",
        "authentication_error",
        "permission_error",
        "context_length_exceeded",
    }
)


def replica_fault(data: bytes) -> str | None:
    """A stream's final error event: "5xx" when the replica failed (decode error, out of memory, an
    answer that is not JSON), None when the error is about the request (like a 4xx)."""
    try:
        err = orjson.loads(data).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "5xx"
    if not isinstance(err, dict):
        return "5xx"
    status = err.get("code")
    if err.get("type") in _REQUEST_ERRORS or err.get("code") in _REQUEST_ERRORS:
        return None
    if isinstance(status, int) and 400 <= status < 500 and status != 429:
        return None
    return "5xx"


def _event(chunk: dict[str, Any], ex: Exchange) -> bytes:
    """A chunk as the client gets it (and as the cache assembles it)."""
    if ex.cache is not None and ex.cache.assembler is not None:
        ex.cache.assembler.add(chunk)
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def _guarded(guard: OutputGuard, chunk: dict[str, Any] | None, out: bytes, finished: bool, ex: Exchange) -> bytes:
    """Through output moderation: a chunk is held until its window is judged; at the end of the stream
    ([DONE], an upstream error event, a break) the held windows are judged and go first."""
    if chunk is not None:
        return b"".join(_event(c, ex) for c in await guard.feed(chunk))
    if finished:
        held = b"".join(_event(c, ex) for c in await guard.flush())
        return held if guard.closing is not None else held + out
    return out


def _has_token(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"))
    return bool(choice.get("text"))
