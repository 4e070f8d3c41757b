"""Side calls (/tokenize, guard-model verdicts, semantic-cache embeddings) through Upstream.call, against a
real HTTP server on a loopback port: they count in the replica's in-flight requests, and only what shows the
replica broken reaches its breaker; a side call's own short limit does not, nor does it take a half-open probe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from portcullis.config import BreakerConfig, build_config
from portcullis.errors import GatewayTimeout
from portcullis.routing.breaker import BreakerState
from portcullis.routing.catalog import Catalog, Replica
from portcullis.upstream.client import UpstreamClient
from portcullis.upstream.proxy import Upstream


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, int]]]:
    seen = {"slow": 0}
    release = asyncio.Event()  # the slow handler answers only at teardown

    async def slow(request: web.Request) -> web.Response:
        seen["slow"] += 1
        await release.wait()
        return web.json_response({})

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    async def tokenize(request: web.Request) -> web.Response:
        return web.json_response({"tokens": [1, 2, 3]})

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_post("/broken", broken)
    app.router.add_post("/tokenize", tokenize)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    release.set()
    await runner.cleanup()


async def _replica(url: str, breaker: BreakerConfig) -> tuple[Upstream, Replica]:
    config = build_config(
        {"models": {"m": {"deployments": [{"url": url}]}}, "resilience": {"breaker": breaker.model_dump()}},
        source="(test)",
        environ={},
    )
    replica = Catalog.from_config(config).models["m"][0]
    replica.client = UpstreamClient(
        url, api_key=None, config=config.upstream, timeouts=config.timeouts_for("m"), max_connections=4
    )
    return Upstream(config.resilience, None), replica  # type: ignore[arg-type]


async def test_a_side_calls_own_limit_never_opens_the_breaker(server: tuple[str, dict[str, int]]) -> None:
    url, seen = server
    upstream, replica = await _replica(url, BreakerConfig(failures=2, window_s=30, open_s=60))
    assert replica.client is not None
    try:
        for _ in range(4):
            with pytest.raises(GatewayTimeout):
                await upstream.call(replica, "/slow", {}, model="m", timeout_s=0.05)
        assert seen["slow"] == 4 and replica.in_flight == 0
        assert replica.breaker.state is BreakerState.CLOSED, "a cache lookup's 50 ms limit opened the breaker"
        assert replica.answered_at == 0.0
        status, answer = await upstream.call(replica, "/tokenize", {"content": "x"}, model="m")
        assert (status, answer) == (200, {"tokens": [1, 2, 3]})
    finally:
        await replica.client.close()


async def test_a_5xx_counts_against_the_replica_and_a_half_open_probe_is_never_taken(
    server: tuple[str, dict[str, int]],
) -> None:
    url, _ = server
    upstream, replica = await _replica(url, BreakerConfig(failures=2, window_s=30, open_s=0.05))
    assert replica.client is not None
    try:
        for _ in range(2):
            assert (await upstream.call(replica, "/broken", {}, model="m"))[0] == 500
        assert replica.breaker.state is BreakerState.OPEN
        await asyncio.sleep(0.06)  # (open_s passed: the next request through is a half-open probe)
        replica.breaker.acquire()  # a real request takes the probe
        assert replica.breaker.state is BreakerState.HALF_OPEN
        await upstream.call(replica, "/tokenize", {"content": "x"}, model="m")
        assert replica.breaker.state is BreakerState.HALF_OPEN, "a /tokenize answer closed a half-open breaker"
        assert replica.breaker.probes == 1
    finally:
        await replica.client.close()
