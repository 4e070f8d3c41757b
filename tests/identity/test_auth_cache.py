"""The key cache's edges, in process: a store that fails, and a cache that must not grow without bound."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from portcullis.config import build_config
from portcullis.errors import ServiceUnavailable, Unauthenticated
from portcullis.http import Request
from portcullis.identity import auth as auth_module
from portcullis.identity.auth import Identity
from portcullis.identity.keys import KeyHasher

CONFIG = build_config({"models": {"m": {"deployments": [{"url": "http://127.0.0.1:9"}]}}}, source="(test)", environ={})


class BrokenStore:
    async def get(self, key_id: str) -> Any:
        raise ConnectionRefusedError("database down")


class EmptyStore:
    def __init__(self) -> None:
        self.loads = 0

    async def get(self, key_id: str) -> Any:
        self.loads += 1
        return None


def _request(key: str) -> Request:
    scope = {
        "method": "GET",
        "path": "/v1/models",
        "client": ("127.0.0.1", 1),
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    return Request(scope, None, None)  # type: ignore[arg-type]


def _key(i: int) -> str:
    return f"pc-{i:016x}-" + "s" * 43


async def test_an_unreachable_key_store_is_503_not_500() -> None:
    identity = Identity(CONFIG, BrokenStore(), KeyHasher(b"k" * 32), None, pushed_invalidation=False)  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable) as info:
        await identity.authenticate(_request(_key(1)))
    assert info.value.code == "auth_store_unavailable" and info.value.headers["Retry-After"]


async def test_sprayed_unknown_ids_do_not_grow_the_cache_without_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "_UNKNOWN_MAX", 100)
    monkeypatch.setattr(auth_module, "_NEGATIVE_TTL_S", -1.0)  # every negative entry already expired
    store = EmptyStore()
    identity = Identity(CONFIG, store, KeyHasher(b"k" * 32), None, pushed_invalidation=False)  # type: ignore[arg-type]
    identity.throttle.per_minute = 10**9
    for i in range(1000):
        with pytest.raises(Unauthenticated):
            await identity.authenticate(_request(_key(i)))
    assert store.loads == 1000
    assert len(identity._cache) <= 100


# -- the database away: stale-if-error, deadlines, revocations ------------------------------------------


class SwitchableStore:
    """Answers with the record of every key it holds, until told to fail or to hang."""

    def __init__(self, hasher: KeyHasher) -> None:
        self.hasher = hasher
        self.records: dict[str, Any] = {}
        self.mode = "up"
        self.loads = 0

    def add(self, i: int) -> str:
        from datetime import UTC, datetime

        from portcullis.identity.keys import KeyRecord

        key = _key(i)
        self.records[key.split("-")[1]] = KeyRecord(
            id=key.split("-")[1],
            key_hash=self.hasher.hash(key),
            user=f"u{i}",
            tier="free",
            scopes=("chat:write",),
            models=None,
            label=None,
            limits=None,
            budget=None,
            created_at=datetime.now(UTC),
        )
        return key

    async def get(self, key_id: str) -> Any:
        self.loads += 1
        if self.mode == "down":
            raise ConnectionRefusedError("database down")
        if self.mode == "hung":
            await asyncio.sleep(3600)
        return self.records.get(key_id)


def _identity(store: SwitchableStore, **auth: Any) -> tuple[Identity, Any]:
    from portcullis.store.health import DatabaseHealth

    config = build_config(
        {"models": {"m": {"deployments": [{"url": "http://127.0.0.1:9"}]}}, "auth": auth},
        source="(test)",
        environ={},
    )
    health = DatabaseHealth(None, timeout_s=1.0, log=_QuietLog())  # type: ignore[arg-type]
    identity = Identity(config, store, store.hasher, None, pushed_invalidation=False, health=health)  # type: ignore[arg-type]
    return identity, health


class _QuietLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


async def test_a_verified_key_is_served_from_the_cache_while_the_database_fails() -> None:
    store = SwitchableStore(KeyHasher(b"k" * 32))
    key = store.add(1)
    identity, health = _identity(store, key_cache_ttl_s=0.01)
    assert (await identity.authenticate(_request(key))).user == "u1"
    store.mode = "down"
    await asyncio.sleep(0.02)  # the cached entry expired
    assert (await identity.authenticate(_request(key))).user == "u1"  # stale, but verified
    assert identity.stale_served == 1 and health.degraded
    other = store.add(2)
    with pytest.raises(ServiceUnavailable):  # never verified: nothing to fall back on
        await identity.authenticate(_request(other))
    wrong = key[:-4] + "xxxx"
    with pytest.raises(Unauthenticated):  # the cached record still checks the secret
        await identity.authenticate(_request(wrong))
    await health.stop()


async def test_a_hung_database_costs_one_lookup_deadline_then_nothing() -> None:
    store = SwitchableStore(KeyHasher(b"k" * 32))
    keys = [store.add(i) for i in range(3)]
    identity, health = _identity(store, key_cache_ttl_s=0.01, key_lookup_timeout_s=0.2)
    for key in keys:
        await identity.authenticate(_request(key))
    store.mode = "hung"
    await asyncio.sleep(0.02)
    started = time.monotonic()
    await identity.authenticate(_request(keys[0]))  # waits out the deadline, then serves the cached record
    assert 0.15 < time.monotonic() - started < 0.5
    started = time.monotonic()
    for key in keys[1:]:  # the database is known to be away now: served at once
        await identity.authenticate(_request(key))
    assert time.monotonic() - started < 0.05
    assert health.degraded
    await health.stop()


async def test_a_revoked_key_is_never_served_stale_nor_one_past_the_stale_limit() -> None:
    store = SwitchableStore(KeyHasher(b"k" * 32))
    revoked, old = store.add(1), store.add(2)
    identity, health = _identity(store, key_cache_ttl_s=0.01, key_cache_stale_s=0.05)
    for key in (revoked, old):
        await identity.authenticate(_request(key))
    identity.invalidate(revoked.split("-")[1])  # the revocation pushed over the bus
    store.mode = "down"
    with pytest.raises(ServiceUnavailable):
        await identity.authenticate(_request(revoked))
    await asyncio.sleep(0.06)  # older than key_cache_stale_s
    with pytest.raises(ServiceUnavailable):
        await identity.authenticate(_request(old))
    await health.stop()


async def test_without_the_bus_no_cached_key_outlives_the_polled_ttl() -> None:
    store = SwitchableStore(KeyHasher(b"k" * 32))
    key = store.add(1)
    identity, _ = _identity(store)
    identity.revocations_pushed(True)
    assert identity.ttl == 30.0
    await identity.authenticate(_request(key))
    entry = identity._cache[key.split("-")[1]]
    assert entry[3] - time.monotonic() > 25  # pushed revocations: trusted 30 s
    identity.revocations_pushed(False)  # the bus went away: a revocation may be missed from now on
    assert identity.ttl == 1.0
    assert identity._cache[key.split("-")[1]][3] - time.monotonic() <= 1.0


async def test_unknown_ids_that_have_not_expired_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "_UNKNOWN_MAX", 100)
    identity = Identity(CONFIG, EmptyStore(), KeyHasher(b"k" * 32), None, pushed_invalidation=False)  # type: ignore[arg-type]
    identity.throttle.per_minute = 10**9
    for i in range(1000):
        with pytest.raises(Unauthenticated):
            await identity.authenticate(_request(_key(i)))
    assert len(identity._cache) <= 100 and len(identity._unknown) <= 100
