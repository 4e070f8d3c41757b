"""Where cached answers live: this process's memory (an LRU bounded in bytes), or Redis (shared).

Values are the answer's JSON bytes. Both honour a TTL per entry; the memory store also evicts the
least recently used entries beyond `max_bytes` (keys and values counted), and refuses an entry larger
than `max_entry_bytes` rather than flushing everything else for it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol


class CacheStore(Protocol):
    shared: bool  # seen by every process (then identical requests are coalesced across processes too)

    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def close(self) -> None: ...

    # Coalescing across processes (cache/exact.py): one process leads a key (answers it upstream) under a
    # lease; the others wait for its answer while it is led.
    async def lead(self, key: str, ttl_s: float) -> bool: ...  # True: this process took the lease
    async def led(self, key: str) -> bool: ...  # is someone answering it?
    async def renew(self, keys: list[str], ttl_s: float) -> None: ...
    async def unlead(self, key: str) -> None: ...


class MemoryStore:
    shared = False

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key → (expires, value)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        cost = len(key) + len(value)
        if cost > self.max_entry_bytes or cost > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + ttl_s, value)
        self.size += cost
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.size -= len(key) + len(value)

    def __len__(self) -> int:
        return len(self._entries)

    # One process sees this store: identical requests are coalesced in process (exact.py), never through it.
    async def lead(self, key: str, ttl_s: float) -> bool:
        return True

    async def led(self, key: str) -> bool:
        return False

    async def renew(self, keys: list[str], ttl_s: float) -> None:
        return None

    async def unlead(self, key: str) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self.size = 0


class StoreDown(Exception):
    """The Redis cache failed or was late moments ago: it is left alone for a while (a miss)."""


class RedisStore:
    """Entries as plain Redis strings with PX expiry; Redis's own maxmemory policy bounds the bytes.

    A cache must never be slower than no cache. Every call has a deadline (`timeout_s`); a call that fails
    or passes it makes the store step aside for `retry_s`: calls fail at once (StoreDown, a miss to the
    cache) until then, and then a single call tries Redis again (the others still step aside meanwhile).
    """

    shared = True

    def __init__(self, url: str, prefix: str = "pc:cache:", timeout_s: float = 0.25, retry_s: float = 5.0) -> None:
        import redis.asyncio as redis

        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.down_until = 0.0  # monotonic; 0 while Redis answers
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.lead_prefix = prefix.rstrip(":") + ":lead:"

    def _enter(self) -> None:
        down_until = self.down_until
        if down_until:
            now = time.monotonic()
            if now < down_until:
                raise StoreDown
            self.down_until = now + self.timeout_s + 0.05  # this call probes; the others keep stepping aside

    def _failed(self) -> None:
        self.down_until = time.monotonic() + self.retry_s

    async def get(self, key: str) -> bytes | None:
        self._enter()
        try:
            value = await self._redis.get(self.prefix + key)
        except Exception:
            self._failed()
            raise
        self.down_until = 0.0
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._enter()
        try:
            await self._redis.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000)))
        except Exception:
            self._failed()
            raise
        self.down_until = 0.0

    # Coalescing across processes: the process answering a key holds a short lease on it ("lead"),
    # renewed while the answer is under way; the others wait for the answer to appear in the cache, or
    # for the lease to go (the leader failed, or died and its lease expired) and then try to lead.

    async def lead(self, key: str, ttl_s: float) -> bool:
        """Take the lead on `key` (True), or find another process has it (False)."""
        self._enter()
        try:
            return bool(await self._redis.set(self.lead_prefix + key, b"1", nx=True, px=int(ttl_s * 1000)))
        except Exception:
            self._failed()
            raise

    async def led(self, key: str) -> bool:
        """Whether some process still leads `key`."""
        self._enter()
        try:
            return bool(await self._redis.exists(self.lead_prefix + key))
        except Exception:
            self._failed()
            raise

    async def renew(self, keys: list[str], ttl_s: float) -> None:
        self._enter()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.pexpire(self.lead_prefix + key, int(ttl_s * 1000))
                await pipe.execute()
        except Exception:
            self._failed()
            raise

    async def unlead(self, key: str) -> None:
        self._enter()
        try:
            await self._redis.delete(self.lead_prefix + key)
        except Exception:
            self._failed()
            raise

    async def close(self) -> None:
        await self._redis.aclose()
