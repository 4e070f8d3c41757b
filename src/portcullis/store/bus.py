"""Events between gateway processes over Redis pub/sub: key revocations and model switches.

Pub/sub delivers to whoever is subscribed at that moment, and nothing to a process whose connection is
down, hung, or re-subscribing after Redis restarted. So the bus says when it is *connected*: subscribed,
and hearing Redis answer a PING at least every `_SILENT_S` seconds. While it is not, nothing may rely on
pushed events (the key cache falls back to its short TTL, model state is polled from the database), and
the database stays the truth: a revocation saved there reaches every process within that short TTL,
whether or not its event was ever delivered. Re-subscribing is tried every `_RETRY_S`, so a process is
connected again within a second of Redis's return.

Publishing has a deadline and never fails the caller: the change is already saved. An event Redis did not
take goes to an outbox that is sent again every `_RETRY_S` until Redis takes it (events are idempotent:
evict this key, this model is on or off), so processes that stayed connected while this one could not
publish (a latency spike on one path) still hear of it, late rather than never.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from portcullis.obs.logging import detached, get_logger

CHANNEL = "portcullis:events"
log = get_logger("portcullis.bus")
_PING_S = 0.5  # a PING on the subscription this often ...
_SILENT_S = 2.0  # ... and nothing heard for this long means the connection is dead or Redis hangs
_RETRY_S = 0.2  # between attempts to subscribe again, or to publish what Redis did not take
_OUTBOX_MAX = 1000


class EventBus:
    def __init__(self, url: str, *, timeout_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.redis = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        # Subscriptions block reading: no socket timeout there; liveness comes from PINGs instead.
        self._subscriber = aioredis.from_url(url, socket_connect_timeout=timeout_s)
        self.connected = False
        self.publish_failures = 0
        self._outbox: list[dict[str, Any]] = []
        self._sender: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._on_connection: Callable[[bool], None] | None = None

    async def publish(self, event: dict[str, Any]) -> bool:
        """Send the event to the other processes; False when Redis did not take it in time (it is then sent
        again from the outbox until it does)."""
        if await self._send(event):
            return True
        self.publish_failures += 1
        if event not in self._outbox:
            if len(self._outbox) >= _OUTBOX_MAX:
                self._outbox.pop(0)  # the oldest: the processes' short TTL has covered it by now
            self._outbox.append(event)
        if self._sender is None or self._sender.done():
            # Detached: its retries are for every request's events, not the one that started it.
            self._sender = asyncio.get_running_loop().create_task(self._send_outbox(), context=detached())
        return False

    async def _send(self, event: dict[str, Any]) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.publish(CHANNEL, orjson.dumps(event))
        except Exception as exc:
            log.warning("bus_publish_failed", kind=event.get("type"), error=type(exc).__name__)
            return False
        return True

    async def _send_outbox(self) -> None:
        while self._outbox:
            await asyncio.sleep(_RETRY_S)
            while self._outbox and await self._send(self._outbox[0]):
                self._outbox.pop(0)

    async def start(
        self, handler: Callable[[dict[str, Any]], None], on_connection: Callable[[bool], None] | None = None
    ) -> None:
        """Listen in the background; `on_connection(True/False)` is told whenever the bus connects or is lost.
        Returns once the first subscription was tried (connected or not)."""
        self._on_connection = on_connection
        first = asyncio.get_running_loop().create_future()
        self._listener = asyncio.create_task(self._listen(handler, first))
        await first

    async def _listen(self, handler: Callable[[dict[str, Any]], None], first: asyncio.Future[None]) -> None:
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await pubsub.subscribe(CHANNEL)
                self._set_connected(True)
                if not first.done():
                    first.set_result(None)
                await self._receive(pubsub, handler)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("bus_disconnected", error=type(exc).__name__)
                self._set_connected(False)
                if not first.done():
                    first.set_result(None)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout_s):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py (8.1)
            await asyncio.sleep(_RETRY_S)

    async def _receive(self, pubsub: Any, handler: Callable[[dict[str, Any]], None]) -> None:
        heard = pinged = time.monotonic()
        while True:
            now = time.monotonic()
            if now - heard > _SILENT_S:
                raise ConnectionError(f"nothing from Redis for {_SILENT_S:g} s")
            if now - pinged >= _PING_S:
                pinged = now
                async with asyncio.timeout(self.timeout_s):
                    await pubsub.ping()
            message = await pubsub.get_message(timeout=_PING_S / 2)
            if message is None:
                continue
            heard = time.monotonic()
            if message.get("type") == "message":
                try:
                    event = orjson.loads(message["data"])
                except orjson.JSONDecodeError:
                    log.warning("bus_bad_event")
                    continue
                handler(event)

    def _set_connected(self, connected: bool) -> None:
        if connected is self.connected:
            return
        self.connected = connected
        if connected:
            log.info("bus_connected")
        if self._on_connection is not None:
            self._on_connection(connected)

    async def close(self) -> None:
        for task in (self._listener, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for client in (self.redis, self._subscriber):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout_s):
                    await client.aclose()
