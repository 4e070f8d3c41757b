"""Helpers for the quota tests: concurrent bursts over real HTTP (keys with limits: procs.create_key)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

MSG = [{"role": "user", "content": "hello there"}]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": MSG, "max_tokens": 4, **extra}


async def burst(
    urls: list[str], key: str, n: int, body: dict[str, Any], *, limit_s: float = 60.0
) -> list[tuple[int, dict[str, str], bytes]]:
    """n requests at once, spread round-robin over the gateways; (status, headers, body) each."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=limit_s)) as s:
        start = asyncio.Event()

        async def one(i: int) -> tuple[int, dict[str, str], bytes]:
            await start.wait()
            async with s.post(
                urls[i % len(urls)] + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            ) as r:
                return r.status, dict(r.headers), await r.read()

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


def away_from_minute_edge(margin_s: float = 10.0) -> None:
    """Minute windows roll at whole minutes (UTC); a burst that must land in one bucket starts after
    the edge when it is close. Deterministic: the wait is computed from the clock, at most `margin_s`."""
    into = time.time() % 60
    if into > 60 - margin_s:
        time.sleep(60 - into + 0.2)
