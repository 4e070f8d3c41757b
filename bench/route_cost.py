"""The cost of the route stage on the hot path: a plain model whose replicas report their context (so every
request is estimated and checked against it), the bench request's body.

Builds the real Router over a catalog whose one llama-server replica is ready with a 4,096-token context,
then times many `route()` calls of the bench request in one event loop, minus what making the request's
exchange and payload costs anyway. Also a router (`auto` over two models) for comparison.
Run: .venv/bin/python bench/route_cost.py   (prints one JSON line: microseconds per request)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from portcullis.config import build_config
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.obs.metrics import Metrics
from portcullis.routing.admission import Admission
from portcullis.routing.affinity import Affinity
from portcullis.routing.catalog import Catalog, ReplicaState
from portcullis.routing.router import Router

# The same body as bench/post.lua.
BODY = {
    "model": "bench",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello in five words."},
    ],
    "max_tokens": 16,
    "temperature": 0,
}


def _router() -> Router:
    config = build_config(
        {
            "models": {
                "bench": {"deployments": [{"url": "http://127.0.0.1:9"}]},
                "large": {"deployments": [{"url": "http://127.0.0.1:10"}]},
            },
            "routers": {"auto": {"candidates": ["bench", "large"]}},
        },
        source="(bench)",
        environ={},
    )
    catalog = Catalog.from_config(config)
    for replica in catalog.all_replicas():
        replica.state, replica.slots, replica.n_ctx = ReplicaState.READY, 64, 4096
    metrics = Metrics(catalog)
    admission = Admission(config, catalog, metrics)
    return Router(config, catalog, admission, Affinity(config.routing.affinity), metrics)


async def _per_call(router: Router, body: dict[str, Any], n: int) -> float:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"x-a", b"b")]}
    req = Request(scope, None, None)
    t0 = time.perf_counter()
    for _ in range(n):
        await router.route(req, Exchange(route="/v1/chat/completions", task=None, started_at=0.0), dict(body))
    spent = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        Exchange(route="/v1/chat/completions", task=None, started_at=0.0)
        dict(body)
    return (spent - (time.perf_counter() - t0)) / n * 1e6


async def measure(n: int = 100_000, rounds: int = 5) -> dict[str, float]:
    router = _router()
    plain = [await _per_call(router, BODY, n) for _ in range(rounds)]
    routed = [await _per_call(router, {**BODY, "model": "auto"}, n // 10) for _ in range(rounds)]
    return {
        "route_us_per_request": round(statistics.median(plain), 2),
        "router_us_per_request": round(statistics.median(routed), 2),
        "rounds": rounds,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure())))
