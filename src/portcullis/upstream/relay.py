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
from typing import Any

import orjson

from portcullis.errors import BadGateway
from portcullis.exchange import Exchange, ResponseFilter, Surface
from portcullis.http import Request
from portcullis.routing.catalog import Answer
from portcullis.routing.retry import AttemptFailed
from portcullis.upstream.client import upstream_error

_DONE = b"data: [DONE]\n\n"


async def relay_sse(
    req: Request,
    resp: Answer,
    ex: Exchange,
    *,
    model: str,
    client_wants_usage: bool,
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
    Every event passes the exchange's response filters that watch streams (exchange.py), in order.
    """
    readline = resp.readline
    chain = _Chain([f for f in ex.filters if f.streams], ex)
    # (most streams have no filter watching, nor another API to speak: no await per event then)
    filtered = bool(chain.filters) or ex.surface is not None
    data_lines: list[bytes] = []
    finished = False  # [DONE] or an error event was relayed, or a filter ended the stream
    fault: str | None = None  # what the upstream's final error event says about the replica
    started = False
    broken: str | None = None
    # The client did not ask for the usage chunk (the gateway did): llama-server then puts its timings on that
    # chunk, which is dropped. The finish chunk before it waits for it and takes its timings (where llama-server
    # puts them when nobody asks for usage), so a streaming client gets the timings either way.
    hold_finish = not client_wants_usage and ex.surface is None
    waiting: dict[str, Any] | None = None  # that finish chunk
    perf = time.perf_counter
    clock = asyncio.get_running_loop().time
    while True:
        t = perf()
        try:
            line = await readline()
        except OSError as exc:  # (h1.Broken)
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
        tokens = ex.streamed_tokens
        chunk, out, finished = _translate(data, ex, model=model, client_wants_usage=client_wants_usage)
        if finished and chunk is None and out != _DONE:  # an error event ended it (not [DONE], nor a native end)
            fault = replica_fault(data)
        if not started:
            started = True
            await req.start_stream()
        if hold_finish:
            if waiting is not None:
                if chunk is None and not out and not finished:  # the dropped usage chunk: its timings
                    timings = ex.timings
                    if timings is not None and "timings" not in waiting:
                        waiting["timings"] = timings
                    chunk, waiting = waiting, None
                else:  # anything else: the finish chunk goes first
                    sent = await chain.pass_on(waiting, b"", False) if filtered else _sse(waiting)
                    waiting = None
                    if chain.closing is not None:
                        await req.stream_chunk(sent + chain.closing)
                        finished = True
                        break
                    if sent:
                        await req.stream_chunk(sent)
            elif ex.streamed_tokens == tokens and chunk is not None and (choices := chunk.get("choices")):
                # (only a chunk that carried no token is looked at: most carry one, and a finish chunk none)
                last = choices[-1]
                if type(last) is dict and last.get("finish_reason") is not None:
                    waiting = chunk
                    continue
        if filtered:
            out = await chain.pass_on(chunk, out, finished)
        elif chunk is not None:
            out = _sse(chunk)
        if chain.closing is not None:  # a filter ended it: what passed was sent, then its error event
            await req.stream_chunk(out + chain.closing)
            finished = True
            break
        if out:
            await req.stream_chunk(out)
        if finished:
            break
        if deadline:
            ex.deadline = min(deadline, clock() + idle_s)
        # Nothing of this event is held while the next is awaited (most of an open stream's life).
        chunk = choices = last = None
    if waiting is not None and not finished:  # the stream ended (or broke) after its finish chunk
        sent = await chain.pass_on(waiting, b"", False) if filtered else _sse(waiting)
        if chain.closing is not None:
            await req.stream_chunk(sent + chain.closing)
            ex.finished = True
            await req.end_stream()
            return "connect" if broken else None
        if sent:
            await req.stream_chunk(sent)
    if not finished and data_lines:  # last event without its blank line
        data = b"\n".join(data_lines)
        chunk, out, finished = _translate(data, ex, model=model, client_wants_usage=client_wants_usage)
        if finished and chunk is None and out != _DONE:  # an error event ended it (not [DONE], nor a native end)
            fault = replica_fault(data)
        out = await chain.pass_on(chunk, out, finished)
        if chain.closing is not None:
            out += chain.closing
            finished = True
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
        held = await chain.pass_on(None, b"", True)  # what the upstream did send, through the filters, goes first
        if chain.closing is not None:
            await req.stream_chunk(held + chain.closing)
            ex.finished = True
            await req.end_stream()
            return "connect"
        if held:
            await req.stream_chunk(held)
        ex.error_code = "upstream_stream_truncated"
        await req.stream_chunk(
            ex.error_event(f"The stream for model '{model}' was cut short: {reason}.", code=ex.error_code)
        )
    ex.finished = True
    await req.end_stream()
    return "connect" if ex.error_code == "upstream_stream_truncated" else fault


class _Chain:
    """The response filters that watch this stream, and the error event one of them ended it with."""

    __slots__ = ("closing", "ex", "filters")

    def __init__(self, filters: list[ResponseFilter], ex: Exchange) -> None:
        self.filters = filters
        self.ex = ex
        self.closing: bytes | None = None

    async def pass_on(self, chunk: dict[str, Any] | None, out: bytes, finished: bool) -> bytes:
        """One translated upstream event → the bytes to send. A chunk goes through every filter; at the end
        of the stream (`finished`) each filter's held events go through the filters after it, and first
        (the raw `out`, [DONE] or an error event, is dropped when a filter ends the stream instead)."""
        if chunk is not None and finished:  # a native stream's last event: its chunk, then the end
            sent = await self.pass_on(chunk, b"", False)
            return sent if self.closing is not None else sent + await self.pass_on(None, out, True)
        filters = self.filters
        surface = self.ex.surface
        if not filters:
            if surface is not None:
                return surface.events([chunk]) if chunk is not None else await _end(surface, out)
            return out if chunk is None else _sse(chunk)
        ex = self.ex
        chunks: list[dict[str, Any]] = [] if chunk is None else [chunk]
        for i, f in enumerate(filters):
            if chunks:
                passed: list[dict[str, Any]] = []
                for c in chunks:
                    passed += await f.event(ex, c)
                    if f.closing is not None:
                        break
                chunks = passed
            if finished and chunk is None and f.closing is None:
                chunks += await f.flush(ex)
            if f.closing is not None:
                self.closing = f.closing
                for later in filters[i + 1 :]:  # what passed this filter still goes through the rest
                    chunks = [d for c in chunks for d in await later.event(ex, c)]
                return self.encode(chunks)
        sent = self.encode(chunks)
        if chunk is not None:
            return sent
        return sent + (out if surface is None else await _end(surface, out))

    def encode(self, chunks: list[dict[str, Any]]) -> bytes:
        surface = self.ex.surface
        if surface is not None:
            return surface.events(chunks) if chunks else b""
        return b"".join(map(_sse, chunks))


async def _end(surface: Surface, out: bytes) -> bytes:
    """The raw end of a stream (`[DONE]`, or an upstream error) in the client's API."""
    if isinstance(out, _LateError):
        return surface.error(out.message, type=out.kind, code=out.code)
    return await surface.end() if out == _DONE else out


class _LateError(bytes):
    """An upstream's error event, for a surface to make when its place in the stream comes: after the events the
    filters still held (its events are numbered after theirs, and open what nothing opened yet)."""

    message: str
    kind: str
    code: str | None


def _stream_error(ex: Exchange, message: str, kind: str, code: str | None) -> bytes:
    if ex.surface is None:
        return ex.error_event(message, type=kind, code=code)
    late = _LateError()
    late.message, late.kind, late.code = message, kind, code
    return late


async def end_stream_with_error(req: Request, ex: Exchange, message: str, code: str) -> None:
    """End a stream that has started with an error event (a timeout, the shutdown deadline)."""
    ex.error_code = code
    await req.stream_chunk(ex.error_event(message, code=code))
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
        return None, _stream_error(ex, message, "server_error", ex.error_code), True
    if not isinstance(chunk, dict):
        return None, (b"data: " + data + b"\n\n") if ex.surface is None else b"", False
    if "error" in chunk:
        err = upstream_error(500, data, model=model)
        ex.error_code = err.code or err.type
        if ex.surface is not None:
            return None, _stream_error(ex, err.message, err.type, err.code), True
        return None, b"data: " + err.body() + b"\n\n", True
    end = b""  # (a native stream's last event ends it: there is no [DONE])
    if ex.native:  # the API's own event (surfaces/): read as the chat chunk it means, then counted like one
        assert ex.surface is not None
        event = chunk
        chunk, last = ex.surface.decode_event(event)
        if isinstance(event.get("timings"), dict):  # (llama-server adds its timings to the last event)
            ex.timings = event["timings"]
        if chunk is None:
            return None, _DONE if last else b"", last
        if "error" in chunk:  # the API's own error event
            ex.error_code = chunk["error"].get("code") or "upstream_error"
            message = chunk["error"].get("message") or "The upstream failed."
            return None, _stream_error(ex, message, "server_error", ex.error_code), True
        if last:
            end = _DONE
    usage = chunk.get("usage")
    if usage:
        ex.usage(usage)
    timings = chunk.get("timings")
    if timings is not None:
        ex.timings = timings
    choices = chunk.get("choices")
    if choices == [] and usage is not None and not client_wants_usage:
        return None, end, end is _DONE
    if choices and _has_token(choices[0]):
        ex.streamed_tokens += 1
        if ex.ttft_s is None:
            ex.ttft_s = time.perf_counter() - ex.started_at
    if "model" in chunk:
        chunk["model"] = model
    return chunk, end, end is _DONE


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
    """A stream's final error event (chat's, or a native API's own): "5xx" when the replica failed (decode error,
    out of memory, an answer that is not JSON), None when the error is about the request (like a 4xx)."""
    try:
        event = orjson.loads(data)
        err = event.get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "5xx"
    if err is None:  # a native Responses stream's: the code beside the event's type, or in the failed response
        kind = event.get("type")
        if kind == "error":
            err = event
        elif kind == "response.failed":
            err = (event.get("response") or {}).get("error")
    if not isinstance(err, dict):
        return "5xx"
    status = err.get("code")
    if err.get("type") in _REQUEST_ERRORS or err.get("code") in _REQUEST_ERRORS:
        return None
    if isinstance(status, int) and 400 <= status < 500 and status != 429:
        return None
    return "5xx"


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _has_token(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"))
    return bool(choice.get("text"))
