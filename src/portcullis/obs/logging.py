"""Structured JSON logs, one line per event, written off the hot path.

structlog renders each event to one JSON line (orjson); the lines go to a bounded in-memory buffer that
a loop callback flushes to stdout in one write every `flush_interval_s` (and at shutdown). A full
buffer drops lines and counts them rather than block a request. Prompts and completions are never
logged: the access line carries sizes, tokens and timings only.

Every line logged on a request's path carries the request's `request_id`, `key_id` and `model`: they are
bound once per request in its contextvars context (`bind_request`, `bind_principal`, `bind_model`) and
structlog's `merge_contextvars` adds them to each line (a field the call passes itself wins). Outside a
request (startup, background loops) a line carries none of them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

import orjson
import structlog
from structlog.contextvars import STRUCTLOG_KEY_PREFIX, bind_contextvars, clear_contextvars

T = TypeVar("T")


class BufferedLineWriter:
    def __init__(self, stream: BinaryIO, *, max_lines: int = 20_000, flush_interval_s: float = 0.05) -> None:
        self.stream = stream
        self.max_lines = max_lines
        self.flush_interval_s = flush_interval_s
        self.lines: list[bytes] = []
        self.dropped = 0
        self._scheduled = False

    def write(self, line: bytes) -> None:
        if len(self.lines) >= self.max_lines:
            self.dropped += 1
            return
        self.lines.append(line)
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (CLI, startup): write through
                self.flush()
                return
            self._scheduled = True
            loop.call_later(self.flush_interval_s, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self.dropped:
            self.lines.append(orjson.dumps({"event": "log_lines_dropped", "count": self.dropped}) + b"\n")
            self.dropped = 0
        if not self.lines:
            return
        data = b"".join(self.lines)
        self.lines.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass


class _BufferedLogger:
    """The structlog 'logger' at the end of the chain: hands the rendered line to the writer."""

    def __init__(self, writer: BufferedLineWriter) -> None:
        self._writer = writer

    def msg(self, message: bytes) -> None:
        self._writer.write(message + b"\n")

    log = debug = info = warning = warn = error = critical = exception = msg


_writer: BufferedLineWriter | None = None


def configure_logging(level: str = "info", stream: BinaryIO | None = None) -> BufferedLineWriter:
    global _writer
    _writer = BufferedLineWriter(stream or sys.stdout.buffer)
    writer = _writer
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: _BufferedLogger(writer),
        cache_logger_on_first_use=True,
    )
    # Route the standard library's records (uvicorn, aiohttp) through the same JSON lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StdlibJsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(getattr(logging, level.upper()))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # we write our own access line
    return writer


def configure_command_logging() -> None:
    """For `portcullis keys ...` and the other operator commands: their output is stdout (often --json, read by
    a script), so the library's events go to stderr, and only warnings and errors (the audit event of a change the
    command made is in the audit log already; the gateway's own log carries them)."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class _StdlibJsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "event": record.getMessage(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def access_line(fields: dict[str, Any]) -> None:
    """The per-request line, rendered straight to JSON into the same buffer as every other line.

    It skips structlog's processor chain on purpose: under load that chain was about 3% of the
    gateway's CPU per request (py-spy, bench at 32 connections), for a line whose shape never varies.
    """
    fields["event"] = "request"
    fields["level"] = "info"
    fields["timestamp"] = _timestamp()
    line = orjson.dumps(fields) + b"\n"
    if _writer is not None:
        _writer.write(line)
    else:
        sys.stdout.buffer.write(line)


_second = [-1, ""]


def _timestamp() -> str:
    """ISO 8601 UTC with microseconds; the part up to the second is formatted once per second."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[0], _second[1] = whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{int((now - whole) * 1_000_000):06d}Z"


def flush_logs() -> None:
    if _writer is not None:
        _writer.flush()


def get_logger(name: str = "portcullis") -> Any:
    return structlog.get_logger(name)


# -- the request's context -------------------------------------------------------------------------
# structlog's own context variables for the three request fields (the same objects bind_contextvars uses, so
# both spellings meet), fetched once: binding them is then a plain ContextVar.set each.
_REQUEST_ID, _KEY_ID, _MODEL = (
    token.var
    for token in contextvars.Context()
    .run(bind_contextvars, request_id=Ellipsis, key_id=Ellipsis, model=Ellipsis)
    .values()
)


def bind_request(request_id: str) -> None:
    """Start a request's log context (first thing in the dispatcher's handle): its id, `key_id` and `model` null until
    known. All three are set, never added to: a request's task may start in a copy of an earlier request's
    context (uvicorn creates a pipelined request's task from inside the previous one's)."""
    _REQUEST_ID.set(request_id)
    _KEY_ID.set(None)
    _MODEL.set(None)


def bind_principal(principal: Any) -> None:
    """Once authenticated (or run as the batch's owner): the key id on every later line. None: not known."""
    if principal is not None:
        _KEY_ID.set(principal.key_id)


def bind_model(model: str | None) -> None:
    """The model the route stage resolved (a router's choice once made)."""
    _MODEL.set(model)


def bind(**fields: Any) -> None:
    """Any other field, on every later line of the current context (bind_request resets only its three)."""
    bind_contextvars(**fields)


async def isolated(awaitable: Awaitable[T]) -> T:
    """Await a request run inside another task (app/internal.py, from a batch line's task), then give
    that task back its own log context: the request's bindings must not label the caller's later lines."""
    saved = contextvars.copy_context()
    try:
        return await awaitable
    finally:
        for var in contextvars.copy_context():
            if var.name.startswith(STRUCTLOG_KEY_PREFIX):
                var.set(saved.get(var, Ellipsis))


def detached() -> contextvars.Context:
    """A context without any request's log fields, for a long-lived task a request may happen to start (a
    recovery probe, a retry loop): `loop.create_task(coro, context=detached())`. Without it the task would
    label its lines, for its whole life, with the request that started it."""
    context = contextvars.copy_context()
    context.run(clear_contextvars)
    return context
