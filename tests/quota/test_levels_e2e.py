"""Limits and budgets of teams and organisations end to end: two gateway processes on one Redis, many keys of one
team (or of one organisation's teams), hundreds of requests at once over both processes. Every level is exact
across processes: exactly the level's limit is admitted, a budget is never overspent by more than one request's
reservation, and each refusal names its level."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from procs import (
    Proc,
    create_key,
    gateway_config,
    http_get,
    http_post,
    sim_control,
    start_gateway,
    start_sim,
    wait_until,
)
from quota_helpers import away_from_minute_edge, chat_body

PRICE = {"prompt_per_1k": 0.0, "completion_per_1k": 1.0}  # a request of max_tokens=10 reserves 0.01


@pytest.fixture(scope="module")
def wide_sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "64", "--n-ctx", "4096", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pair(wide_sim: Proc, redis_url: str, module_tmp: Path) -> Iterator[tuple[Proc, Proc]]:
    db = f"sqlite+aiosqlite:///{module_tmp}/levels.db"
    cfg = gateway_config(
        {"tiny": [{"url": wide_sim.url, "cost": PRICE}]},
        store={"database_url": db, "redis_url": redis_url},
        quota={"backend": "redis", "usage": {"flush_interval_s": 0.1}},
    )
    first = start_gateway(cfg, module_tmp, ready_path="/readyz")
    second = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield first, second
    first.stop()
    second.stop()


def made(gw: Proc, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, raw = http_post(gw.url + path, body)
    assert status == 201, raw
    return orjson.loads(raw)


def team_with_keys(gw: Proc, org: dict[str, Any], n: int, **team: Any) -> list[dict[str, Any]]:
    found = made(gw, "/admin/teams", {"org_id": org["id"], "name": f"team-{time.monotonic_ns()}", **team})
    return [create_key(gw, tier="enterprise", team_id=found["id"]) for _ in range(n)]


async def spread(urls: list[str], keys: list[str], n: int, body: dict[str, Any]) -> list[tuple[int, dict[str, str]]]:
    """n requests at once, over every process and every key in turn; (status, headers) each."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        start = asyncio.Event()

        async def one(i: int) -> tuple[int, dict[str, str]]:
            await start.wait()
            headers = {"authorization": f"Bearer {keys[i % len(keys)]}", "content-type": "application/json"}
            async with s.post(
                urls[i % len(urls)] + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
            ) as r:
                await r.read()
                return r.status, dict(r.headers)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def outcome(results: list[tuple[int, dict[str, str]]]) -> tuple[dict[int, int], set[str | None]]:
    counts: dict[int, int] = {}
    for status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    return counts, {headers.get("x-portcullis-limit-scope") for status, headers in results if status == 429}


def test_a_team_request_limit_shared_by_five_keys_is_exact_across_processes(pair: tuple[Proc, Proc]) -> None:
    org = made(pair[0], "/admin/organizations", {"name": f"acme-{time.monotonic_ns()}"})
    keys = team_with_keys(pair[0], org, 5, limits={"requests": {"minute": 50}})
    away_from_minute_edge()
    results = asyncio.run(spread([p.url for p in pair], [k["key"] for k in keys], 300, chat_body()))
    assert outcome(results) == ({200: 50, 429: 250}, {"team"})
    status, body = http_post(pair[1].url + "/v1/chat/completions", chat_body(), headers=_bearer(keys[0]["key"]))
    error = orjson.loads(body)["error"]
    assert status == 429 and error["code"] == "rate_limit_exceeded"
    assert "requests per minute of your team 'team-" in error["message"] and "limit 50" in error["message"]


def test_an_organisation_request_limit_over_two_teams_is_exact(pair: tuple[Proc, Proc]) -> None:
    org = made(
        pair[0],
        "/admin/organizations",
        {"name": f"globex-{time.monotonic_ns()}", "limits": {"requests": {"minute": 60}}},
    )
    keys = team_with_keys(pair[0], org, 3) + team_with_keys(pair[0], org, 3, limits={"requests": {"minute": 1000}})
    away_from_minute_edge()
    results = asyncio.run(spread([p.url for p in pair], [k["key"] for k in keys], 300, chat_body()))
    assert outcome(results) == ({200: 60, 429: 240}, {"organization"})


def spent(gw: Proc, key_ids: list[str], answered: int) -> float:
    """The usage table's cost of these keys, once the records of `answered` requests that succeeded are written
    (refusals and requests cut short have records too, at no cost)."""
    total: dict[str, float] = {}

    def written() -> bool:
        status, body = http_get(gw.url + "/admin/usage?group_by=key")
        rows = [r for r in orjson.loads(body)["data"] if r["key"] in key_ids] if status == 200 else []
        total["cost"] = sum(r["cost"] for r in rows)
        return sum(r["requests"] - r["errors"] for r in rows) >= answered

    wait_until(written, timeout=20, what="the usage records")
    return total["cost"]


@pytest.mark.parametrize("level", ["team", "organization"])
def test_a_budget_is_never_overspent_by_more_than_one_reservation(
    pair: tuple[Proc, Proc], wide_sim: Proc, level: str
) -> None:
    budget = {"budget": {"day": 0.5}}  # 50 reservations of 0.01
    org = made(
        pair[0],
        "/admin/organizations",
        {"name": f"{level}-{time.monotonic_ns()}", **(budget if level == "organization" else {})},
    )
    keys = team_with_keys(pair[0], org, 5, **(budget if level == "team" else {}))
    urls, secrets = [p.url for p in pair], [k["key"] for k in keys]
    # Every admitted request hangs upstream, so no reservation is settled during the burst: exactly 50 fit.
    sim_control(wide_sim, hang_rate=1.0)
    try:
        burst = asyncio.run(asyncio.wait_for(_admitted_while_hanging(urls, secrets, wide_sim, 300), 60))
    finally:
        sim_control(wide_sim, hang_rate=0.0)
    assert burst == 50
    # Then requests that finish: each settles at its real cost (at most its reservation), and the level's spend
    # never goes past the budget by more than one reservation, over both processes.
    results = asyncio.run(spread(urls, secrets, 300, chat_body(max_tokens=10)))
    counts, scopes = outcome(results)
    assert counts.get(429, 0) > 0 and scopes == {level}
    cost = spent(pair[0], [k["id"] for k in keys], counts[200])
    assert 0 < cost <= 0.5 + 0.01 + 1e-9


async def _admitted_while_hanging(urls: list[str], keys: list[str], sim: Proc, n: int) -> int:
    """Fire n requests whose admitted part hangs at the upstream; once each is refused or at the upstream, the
    number that reached it."""
    from procs import sim_stats

    before = sim_stats(sim)["requests"]
    task = asyncio.create_task(spread(urls, keys, n, chat_body(max_tokens=10)))
    refused_before = sum(_refusals(u) for u in urls)
    while True:
        await asyncio.sleep(0.1)
        arrived = sim_stats(sim)["requests"] - before
        refused = sum(_refusals(u) for u in urls) - refused_before
        if arrived + refused >= n:
            break
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return arrived


def _refusals(url: str) -> int:
    text = http_get(url + "/metrics")[1].decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("portcullis_quota_refusals_total{")
    )


def test_a_budget_over_a_span_of_days_applies_only_within_it(pair: tuple[Proc, Proc]) -> None:
    """A team's budget for a fixed span (a grant for an event): counted from its first day until its end, across
    processes; a span that is over (or not begun) does not apply at all."""
    import datetime as dt

    today = dt.datetime.now(dt.UTC).date()
    org = made(pair[0], "/admin/organizations", {"name": f"events-{time.monotonic_ns()}"})
    running = {"range": {"start": str(today), "end": str(today + dt.timedelta(days=7)), "amount": 0.05}}
    over = {"range": {"start": "2020-01-01", "end": "2020-01-02", "amount": 0.000001}}
    live = team_with_keys(pair[0], org, 2, budget=running)
    past = team_with_keys(pair[0], org, 1, budget=over)
    urls = [p.url for p in pair]
    # 0.05 is five requests' reservations of 0.01: the first burst can take no more than that at once.
    results = asyncio.run(spread(urls, [k["key"] for k in live], 20, chat_body(max_tokens=10)))
    counts, scopes = outcome(results)
    assert 0 < counts.get(200, 0) <= 20 and scopes <= {"team"}
    for _ in range(20):  # spend it all: the real costs settle below the reservations
        status, body = http_post(
            pair[0].url + "/v1/chat/completions", chat_body(max_tokens=10), headers=_bearer(live[0]["key"])
        )
        if status == 429:
            break
    error = orjson.loads(body)["error"]
    assert status == 429 and error["code"] == "budget_exceeded"
    assert f"from {today} to {today + dt.timedelta(days=7)}" in error["message"]
    status, _ = http_post(
        pair[1].url + "/v1/chat/completions", chat_body(max_tokens=10), headers=_bearer(past[0]["key"])
    )
    assert status == 200  # the other team's span ended in 2020: no budget
    status, bad = http_post(
        pair[0].url + "/admin/teams",
        {
            "org_id": org["id"],
            "name": "bad",
            "budget": {"range": {"start": "2027-01-02", "end": "2027-01-01", "amount": 1}},
        },
    )
    assert status == 400 and "end must be after start" in orjson.loads(bad)["error"]["message"]
