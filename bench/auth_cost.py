"""The cost of authenticating a request whose API key is already cached (the hot path).

Builds the real Identity stage on a SQLite key store, creates a key, authenticates once (the miss that
loads and caches it), then times many authentications of the same request in one event loop.
Run: .venv/bin/python bench/auth_cost.py   (prints one JSON line: microseconds per request)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time

from portcullis.config import build_config
from portcullis.http import Request
from portcullis.identity.auth import Identity
from portcullis.identity.keys import KeyHasher, KeyStore
from portcullis.store.db import make_engine, upgrade


async def measure(n: int = 200_000, rounds: int = 5) -> dict[str, float]:
    folder = tempfile.mkdtemp(prefix="portcullis-authbench-")
    config = build_config(
        {
            "store": {"database_url": f"sqlite+aiosqlite:///{folder}/keys.db"},
            "models": {"m": {"deployments": [{"url": "http://127.0.0.1:9"}]}},
        },
        source="(bench)",
        environ={},
    )
    engine = make_engine(config.store.database_url)
    await upgrade(engine)
    store = KeyStore(engine, KeyHasher(os.urandom(32)))
    key, _ = await store.create(user="bench", tier="free")
    identity = Identity(config, store, store.hasher, None, pushed_invalidation=True)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "client": ("127.0.0.1", 5000),
        "headers": [
            (b"host", b"gateway"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-length", b"150"),
        ],
    }
    await identity.authenticate(Request(scope, None, None))  # the miss: load and cache
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            # A fresh Request each time, as per request: its header dict is built on first use.
            await identity.authenticate(Request(scope, None, None))
        per_call.append((time.perf_counter() - t0) / n * 1e6)
        baseline0 = time.perf_counter()
        for _ in range(n):
            Request(scope, None, None).header(b"authorization")
        per_call[-1] -= (time.perf_counter() - baseline0) / n * 1e6  # minus what every request pays anyway
    await engine.dispose()
    return {"auth_us_per_request": statistics.median(per_call), "rounds": rounds, "calls_per_round": n}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure())))
