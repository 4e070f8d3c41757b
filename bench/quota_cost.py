"""The cost of quota admission and settlement per request, in process and with Redis.

Builds the real Quota stage for a principal with the default tiers' kind of limits (requests per
minute and per day, tokens per minute, concurrency), none ever reached, then times admit + settle:
  - memory: one request at a time (the in-process limiter is synchronous);
  - redis: the CPU this process spends per request with 32 requests in flight (what the gateway pays
    under load), and the wall time of one admission alone (the round trip).
And the same for a key of a team of an organisation with limits of the same shape at all three levels (the key's,
the team's, the organisation's: every window, concurrency, one script call for all of them).
Run: .venv/bin/python bench/quota_cost.py [--redis redis://127.0.0.1:6379/0]   (prints one JSON line)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from portcullis.config import build_config
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity.principal import Principal
from portcullis.obs.logging import get_logger
from portcullis.obs.metrics import Metrics
from portcullis.protocol import ChatCompletionRequest
from portcullis.quota.stage import Quota
from portcullis.routing.catalog import Catalog

# The shape of the default tiers' limits (config.py), with values no benchmark reaches. bench/run.py
# gives its limited gateways the same.
LIMITS = {"requests": {"minute": 10**9, "day": 10**9}, "tokens": {"minute": 10**12}, "concurrency": 10**6}
SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
CHAT = ChatCompletionRequest.model_validate(
    {"model": "m", "messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 64}
)


def _stage(backend: str, redis_url: str | None) -> Quota:
    config = build_config(
        {
            "store": {"redis_url": redis_url} if redis_url else {},
            "tiers": {"bench": {"limits": LIMITS}, "unlimited": {}},
            "quota": {"backend": backend},
            "models": {"m": {"deployments": [{"url": "http://127.0.0.1:9"}]}},
        },
        source="(bench)",
        environ={},
    )
    catalog = Catalog.from_config(config)
    return Quota(config, Metrics(catalog), get_logger("bench"), catalog)


async def _one(quota: Quota, principal: Principal) -> None:
    req = Request(SCOPE, None, None)  # type: ignore[arg-type]
    ex = Exchange(route="/v1/chat/completions", task=None, started_at=0.0, principal=principal, model="m")
    await quota.admit(req, ex, CHAT)
    ex.prompt_tokens, ex.completion_tokens = 18, 40
    ex.account(200)  # as the dispatcher ends a request: tokens accounted, then the filters' done (the settle)
    for f in reversed(ex.filters):
        f.done(ex, 200)


def _principal(user: str, key_id: str, *, levels: bool, tier: str = "bench") -> Principal:
    """A bench key; with `levels`, of a team of an organisation that have the same limits as the key."""
    if not levels:
        return Principal(user=user, tier=tier, scopes=frozenset(), key_id=key_id)
    return Principal(
        user=user,
        tier=tier,
        scopes=frozenset(),
        key_id=key_id,
        org="org_bench",
        team="team_bench",
        team_limits=LIMITS,
        org_limits=LIMITS,
        team_name="bench",
        org_name="bench",
    )


async def memory_us(n: int = 50_000, rounds: int = 5, *, levels: bool = False) -> float:
    """Admit + settle per request, minus the same loop for a principal without limits (the request and
    exchange objects the harness builds are not the limiter's cost)."""
    quota = _stage("memory", None)
    limited = _principal("bench", "k1", levels=levels)
    unlimited = Principal(user="bench", tier="unlimited", scopes=frozenset(), key_id="k2")
    samples = []
    for _ in range(rounds):
        per = []
        for principal in (limited, unlimited):
            t = time.perf_counter()
            for _ in range(n):
                await _one(quota, principal)
            per.append((time.perf_counter() - t) / n * 1e6)
        samples.append(per[0] - per[1])
    return statistics.median(samples)


async def redis_costs(url: str, n: int = 20_000, rounds: int = 5, *, levels: bool = False) -> tuple[float, float]:
    quota = _stage("redis", url)
    quota.start()
    principal = _principal(f"bench-{os.getpid()}", "k1", levels=levels)
    await _one(quota, principal)  # connect, load the scripts
    cpu = []
    for _ in range(rounds):

        async def worker(count: int) -> None:
            for _ in range(count):
                await _one(quota, principal)

        c = time.process_time()
        await asyncio.gather(*(worker(n // 32) for _ in range(32)))
        if quota.store.settling:  # the last settlements are still on the wire: their CPU counts too
            await asyncio.wait(list(quota.store.settling))
        cpu.append((time.process_time() - c) / n * 1e6)
    alone = []
    for _ in range(2000):
        t = time.perf_counter()
        await _one(quota, principal)
        alone.append((time.perf_counter() - t) * 1e6)
    await quota.stop()
    return statistics.median(cpu), statistics.median(alone)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default=os.environ.get("PORTCULLIS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        out = {"memory_us_per_request": runner.run(memory_us())}
        cpu, alone = runner.run(redis_costs(args.redis))
        out["redis_cpu_us_per_request_32_in_flight"] = cpu
        out["redis_admit_round_trip_us"] = alone
        out["levels_memory_us_per_request"] = runner.run(memory_us(levels=True))
        cpu, alone = runner.run(redis_costs(args.redis, levels=True))
        out["levels_redis_cpu_us_per_request_32_in_flight"] = cpu
        out["levels_redis_admit_round_trip_us"] = alone
    print(json.dumps(out))


if __name__ == "__main__":
    main()
