"""Events between gateway processes over Redis pub/sub: key revocations and model switches.

Publishing is fire-and-forget; each process evicts or updates its local view when a message arrives.
Without Redis there is no bus: key caches expire within 1 s and model state is polled from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from portcullis.obs.logging import get_logger

CHANNEL = "portcullis:events"
log = get_logger("portcullis.bus")


class EventBus:
    def __init__(self, url: str) -> None:
        self.redis = aioredis.from_url(url)
        self._listener: asyncio.Task[None] | None = None

    async def publish(self, event: dict[str, Any]) -> None:
        await self.redis.publish(CHANNEL, orjson.dumps(event))

    async def start(self, handler: Callable[[dict[str, Any]], None]) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(CHANNEL)
        self._listener = asyncio.create_task(self._listen(pubsub, handler))

    async def _listen(self, pubsub: Any, handler: Callable[[dict[str, Any]], None]) -> None:
        while True:
            try:
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        handler(orjson.loads(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("bus_disconnected")
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await pubsub.subscribe(CHANNEL)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.redis.aclose()
