"""A small asyncio load client for the resilience and chaos tests: what each request saw, exactly.

A streamed answer is read to its end and classified: complete ([DONE]), ended by an error event, or
cut without either (a silent truncation, which must never happen). Every call has a client timeout,
so a hang shows up as `hung`, never as a stuck test.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from procs import ADMIN_KEY


@dataclass
class Result:
    status: int
    latency: float
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    stream_complete: bool = False
    stream_error: dict[str, Any] | None = None
    hung: bool = False
    sent_at: float = 0.0

    @property
    def truncated(self) -> bool:
        return self.status == 200 and self.body == "stream" and not self.stream_complete and self.stream_error is None

    @property
    def attempts(self) -> int:
        return int(self.headers.get("x-portcullis-attempts", "0"))


def chat_body(*, stream: bool = False, max_tokens: int = 8, model: str = "m", text: str = "hello") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        # Not temperature 0: deterministic requests are answered from the cache after the first.
        "temperature": 0.7,
        "stream": stream,
    }


async def call(
    session: aiohttp.ClientSession,
    base: str,
    body: dict[str, Any],
    *,
    key: str = ADMIN_KEY,
    limit_s: float = 20.0,
) -> Result:
    started = time.perf_counter()
    sent_at = time.monotonic()
    try:
        async with asyncio.timeout(limit_s):
            async with session.post(
                base + "/v1/chat/completions", data=orjson.dumps(body), headers={"authorization": f"Bearer {key}"}
            ) as resp:
                headers = {k.lower(): v for k, v in resp.headers.items()}
                if resp.status != 200 or not body.get("stream"):
                    raw = await resp.read()
                    return Result(
                        resp.status, time.perf_counter() - started, headers, orjson.loads(raw), sent_at=sent_at
                    )
                result = Result(200, 0.0, headers, "stream", sent_at=sent_at)
                async for line in resp.content:
                    if line.startswith(b"data: [DONE]"):
                        result.stream_complete = True
                    elif line.startswith(b"data: "):
                        chunk = orjson.loads(line[6:])
                        if "error" in chunk:
                            result.stream_error = chunk["error"]
                result.latency = time.perf_counter() - started
                return result
    except TimeoutError:
        return Result(0, time.perf_counter() - started, hung=True, sent_at=sent_at)


async def open_loop(
    base: str,
    bodies: list[tuple[dict[str, Any], str]],
    *,
    rate: float,
    limit_s: float = 30.0,
) -> list[Result]:
    """Send (body, key) pairs at a fixed arrival rate, whatever the answers do (an open-loop load)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        tasks = []
        for i, (body, key) in enumerate(bodies):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(call(session, base, body, key=key, limit_s=limit_s)))
        return list(await asyncio.gather(*tasks))


def post_chat(
    base: str, payload: dict[str, Any], key: str = ADMIN_KEY, **headers: str
) -> tuple[int, dict[str, str], Any]:
    """One chat request: (status, headers in lower case, parsed JSON, or the raw bytes of a stream)."""

    async def run() -> tuple[int, dict[str, str], Any]:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                base + "/v1/chat/completions",
                data=orjson.dumps(payload),
                headers={"authorization": f"Bearer {key}", **headers},
            ) as r:
                raw = await r.read()
                return r.status, {k.lower(): v for k, v in r.headers.items()}, raw

    status, hdrs, raw = asyncio.run(run())
    return status, hdrs, (orjson.loads(raw) if not payload.get("stream") and raw else raw)
