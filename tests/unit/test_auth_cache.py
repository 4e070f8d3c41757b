"""The key cache's edges, in process: a store that fails, and a cache that must not grow without bound."""

from __future__ import annotations

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
    monkeypatch.setattr(auth_module, "_CACHE_SWEEP_AT", 100)
    monkeypatch.setattr(auth_module, "_NEGATIVE_TTL_S", -1.0)  # every negative entry already expired
    store = EmptyStore()
    identity = Identity(CONFIG, store, KeyHasher(b"k" * 32), None, pushed_invalidation=False)  # type: ignore[arg-type]
    identity.throttle.per_minute = 10**9
    for i in range(1000):
        with pytest.raises(Unauthenticated):
            await identity.authenticate(_request(_key(i)))
    assert store.loads == 1000
    assert len(identity._cache) <= 100
