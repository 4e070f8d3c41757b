"""Structured JSON logs, one line per event, written off the hot path.

structlog renders each event to one JSON line (orjson); the lines go to a bounded in-memory buffer that
a loop callback flushes to stdout in one write every `flush_interval_s` (and at shutdown). A full
buffer drops lines and counts them rather than block a request. Prompts and completions are never
logged: the access line carries sizes, tokens and timings only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
import structlog


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
