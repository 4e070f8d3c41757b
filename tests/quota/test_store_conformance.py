"""One suite, both stores: the in-process counters and the Redis scripts must decide identically.

The clock is driven by the test (`Ask.now`), so windows, rolls and waits are checked exactly.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator

import pytest

from portcullis.config import QuotaConfig
from portcullis.obs.logging import get_logger
from portcullis.obs.metrics import Metrics
from portcullis.quota import window
from portcullis.quota.failover import FailoverStore
from portcullis.quota.plan import Budget, Level, Plan, Window, org_tag, user_tag
from portcullis.quota.redis_store import RedisQuotaStore
from portcullis.quota.store import BUDGET, CONCURRENCY, OK, TOO_LARGE, WINDOW, Ask, MemoryQuotaStore
from portcullis.routing.catalog import Catalog

T0 = 1_800_000_000.0 + 12.5  # 12.5 s into a minute bucket


@pytest.fixture(params=["memory", "redis", "redis-cluster", "failover"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    if request.param == "memory":
        yield MemoryQuotaStore()
        return
    if request.param == "failover":  # what the quota stage talks to: Redis (answering), with its fallback
        redis = RedisQuotaStore(request.getfixturevalue("redis_url"), timeout_s=2.0, lease_s=60.0)
        failover = FailoverStore(redis, MemoryQuotaStore(), QuotaConfig(), Metrics(Catalog({})), get_logger("t"))
        yield failover
        await failover.stop(timeout_s=2.0)
        return
    if request.param == "redis":
        redis_store = RedisQuotaStore(request.getfixturevalue("redis_url"), timeout_s=2.0, lease_s=60.0)
    else:
        url = request.getfixturevalue("redis_cluster_url")
        redis_store = RedisQuotaStore(url, timeout_s=2.0, lease_s=60.0, cluster=True)
    yield redis_store
    await redis_store.close()


def plan(*, windows: tuple[Window, ...] = (), concurrency: int | None = None, budgets: tuple[Budget, ...] = ()) -> Plan:
    return Plan(
        tag=user_tag(f"conformance-{secrets.token_hex(6)}"),
        subject="k:abc",
        key_id="abc",
        windows=windows,
        concurrency=concurrency,
        budgets=budgets,
    )


def ask(p: Plan, now: float, *, tokens: int = 0, cost: int = 0, periods: tuple[str, ...] = ()) -> Ask:
    return Ask(
        plan=p,
        tokens=tokens,
        cost=cost,
        lease=secrets.token_hex(6),
        periods=periods or tuple("d20270115" for _ in p.budgets),
        period_ends_s=tuple(3600.0 for _ in p.budgets),
        now=now,
    )


RPM5 = Window("requests", "minute", 60, 5, "r60")


async def test_requests_window_admits_exactly_the_limit_then_says_how_long(store) -> None:
    p = plan(windows=(RPM5,))
    verdicts = [await store.admit(ask(p, T0 + i * 0.01)) for i in range(8)]
    assert [v.failed for v in verdicts] == [OK] * 5 + [WINDOW] * 3
    assert [v.remaining[0] for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    refused = verdicts[5]
    # Five in this bucket: admitted again once 1/5 of the next bucket has passed.
    expected = (60 - 12.55) + 60 / 5
    assert refused.retry_after_s == pytest.approx(expected, abs=0.01)
    assert refused.reset_s[0] == pytest.approx((60 - 12.55) + 60, abs=0.01)


async def test_retry_after_is_the_real_wait(store) -> None:
    p = plan(windows=(RPM5,))
    for i in range(5):
        assert (await store.admit(ask(p, T0 + i))).admitted
    refused = await store.admit(ask(p, T0 + 5))
    at = T0 + 5 + refused.retry_after_s
    assert (await store.admit(ask(p, at - 0.05))).failed == WINDOW
    assert (await store.admit(ask(p, at))).admitted


async def test_the_previous_bucket_decays(store) -> None:
    p = plan(windows=(RPM5,))
    for i in range(5):
        assert (await store.admit(ask(p, T0 + i))).admitted
    next_bucket = (math.floor(T0 / 60) + 1) * 60
    # 30 s into the next bucket half of the previous five still count: 2.5 + 1 + 1 fits, a third does not.
    results = [(await store.admit(ask(p, next_bucket + 30 + i * 0.001))).failed for i in range(3)]
    assert results == [OK, OK, WINDOW]


async def test_tokens_are_reserved_and_the_unused_part_released(store) -> None:
    tpm = Window("tokens", "minute", 60, 1000, "t60")
    p = plan(windows=(tpm,))
    first, second = ask(p, T0, tokens=400), ask(p, T0 + 1, tokens=400)
    assert (await store.admit(first)).admitted
    assert (await store.admit(second)).admitted
    assert (await store.admit(ask(p, T0 + 2, tokens=400))).failed == WINDOW
    await store.settle(first, 100, 0, ())  # used 100 of its 400
    verdict = await store.admit(ask(p, T0 + 3, tokens=400))
    assert verdict.admitted and verdict.remaining[0] == 100
    assert (await store.admit(ask(p, T0 + 4, tokens=1001))).failed == TOO_LARGE


async def test_concurrency_slots(store) -> None:
    p = plan(concurrency=2)
    a, b = ask(p, T0), ask(p, T0)
    assert (await store.admit(a)).admitted and (await store.admit(b)).admitted
    refused = await store.admit(ask(p, T0))
    assert refused.failed == CONCURRENCY and refused.retry_after_s == 1.0
    await store.settle(a, 0, 0, ())
    assert (await store.admit(ask(p, T0))).admitted


async def test_all_or_nothing(store) -> None:
    """A refusal by one limit takes nothing from the others."""
    tpm = Window("tokens", "minute", 60, 100, "t60")
    p = plan(windows=(RPM5, tpm), concurrency=10)
    assert (await store.admit(ask(p, T0, tokens=90))).admitted
    for _ in range(3):
        assert (await store.admit(ask(p, T0, tokens=50))).failed == WINDOW  # tokens refuse
    verdict = await store.admit(ask(p, T0, tokens=10))
    assert verdict.admitted
    assert verdict.remaining == [3, 0]  # the three refusals took no request


async def test_budget_reserve_settle_and_alerts_once(store) -> None:
    day = Budget("key", "day", 1_000_000, 1.0)
    user_month = Budget("user", "month", 5_000_000, 5.0)
    p = plan(budgets=(day, user_month))
    periods = ("d20270115", "m202701")
    a = ask(p, T0, cost=400_000, periods=periods)
    b = ask(p, T0, cost=400_000, periods=periods)
    assert (await store.admit(a)).admitted and (await store.admit(b)).admitted
    refused = await store.admit(ask(p, T0, cost=400_000, periods=periods))
    assert refused.failed == BUDGET and refused.index == 0 and refused.retry_after_s == 3600.0
    alerts = await store.settle(a, 0, 550_000, (0.5, 0.8, 1.0))
    assert [(x.budget, x.threshold) for x in alerts] == [(0, 0.5)]
    alerts = await store.settle(b, 0, 300_000, (0.5, 0.8, 1.0))
    assert [(x.budget, x.threshold, x.spent) for x in alerts] == [(0, 0.8, 850_000)]
    c = ask(p, T0, cost=100_000, periods=periods)
    assert (await store.admit(c)).admitted
    assert await store.extend(c, 20_000) == 20_000
    assert await store.extend(c, 100_000) == 30_000  # 850k spent + 120k reserved: room for 30k more
    assert await store.extend(c, 1) == 0
    alerts = await store.settle(c, 0, 150_000, (0.5, 0.8, 1.0))
    assert [(x.budget, x.threshold) for x in alerts] == [(0, 1.0)]
    assert await store.settle(ask(p, T0, periods=periods), 0, 0, (0.5, 0.8, 1.0)) == []
    assert (await store.admit(ask(p, T0, cost=1, periods=periods))).failed == BUDGET


# -- levels: a team and an organisation whose counters the keys of the organisation share ---------------------


def member(org: str, key: str, *, team: Level, org_level: Level | None = None, **spec: object) -> Plan:
    """The plan of one key of `org`'s team: its own windows (none here) and the levels' (`spec`)."""
    levels = (team,) if org_level is None else (team, org_level)
    return Plan(tag=org_tag(org), subject=f"k:{key}", key_id=key, concurrency=None, **spec, levels=levels)  # type: ignore[arg-type]


async def test_a_teams_window_is_shared_by_its_keys(store) -> None:
    org, team = f"org_{secrets.token_hex(4)}", Level("team", "t:search", "search")
    rpm3 = Window("requests", "minute", 60, 3, "r60", level=1)
    a = member(org, "a", team=team, windows=(rpm3,), budgets=())
    b = member(org, "b", team=team, windows=(rpm3,), budgets=())
    assert [(await store.admit(ask(x, T0))).failed for x in (a, b, a)] == [OK, OK, OK]
    refused = await store.admit(ask(b, T0 + 1))
    assert refused.failed == WINDOW and refused.index == 0 and refused.retry_after_s > 0
    # Another organisation's team of the same name counts apart.
    other = member(f"org_{secrets.token_hex(4)}", "a", team=team, windows=(rpm3,), budgets=())
    assert (await store.admit(ask(other, T0 + 1))).admitted


async def test_levels_count_tokens_and_give_the_unused_part_back(store) -> None:
    org = f"org_{secrets.token_hex(4)}"
    team, whole = Level("team", "t:x", "x"), Level("organization", "o", "acme")
    own = Window("tokens", "minute", 60, 10_000, "t60")
    team_tpm, org_tpm = (
        Window("tokens", "minute", 60, 1000, "t60", level=1),
        Window("tokens", "minute", 60, 1500, "t60", level=2),
    )
    a = member(org, "a", team=team, org_level=whole, windows=(own, team_tpm, org_tpm), budgets=())
    b = member(org, "b", team=team, org_level=whole, windows=(own, team_tpm, org_tpm), budgets=())
    first = ask(a, T0, tokens=600)
    assert (await store.admit(first)).admitted
    refused = await store.admit(ask(b, T0 + 1, tokens=600))
    assert refused.failed == WINDOW and refused.index == 1  # the team's window (the org's has room for 1200)
    await store.settle(first, 100, 0, ())  # used 100 of its 600: given back at every level
    if isinstance(store, FailoverStore) and store.redis is not None:
        # What the quota stage talks to carries a settlement along with the same key's next admission (within
        # RedisQuotaStore.CARRY_S): until then another key sees the reservation whole, which only refuses more.
        await store.redis.flush()
    verdict = await store.admit(ask(b, T0 + 2, tokens=600))
    assert verdict.admitted and verdict.remaining == [9400, 300, 800]


async def test_a_levels_concurrency_and_budget(store) -> None:
    org = f"org_{secrets.token_hex(4)}"
    team = Level("team", "t:y", "y", concurrency=2)
    budget = (Budget("team", "day", 1_000_000, 1.0, "t:y", "y"),)
    periods = ("d20270115",)
    a = member(org, "a", team=team, windows=(), budgets=budget)
    b = member(org, "b", team=team, windows=(), budgets=budget)
    first, second = ask(a, T0, cost=400_000, periods=periods), ask(b, T0, cost=400_000, periods=periods)
    assert (await store.admit(first)).admitted and (await store.admit(second)).admitted
    refused = await store.admit(ask(a, T0, cost=1, periods=periods))
    assert refused.failed == CONCURRENCY and refused.index == 1  # the team's (level 1)
    await store.settle(first, 0, 100_000, ())  # its slot freed everywhere, 100k of the team's budget spent
    third = ask(a, T0, cost=500_000, periods=periods)
    assert (await store.admit(third)).admitted  # 100k spent + 400k + 500k reserved: the whole budget
    await store.settle(second, 0, 400_000, ())  # 500k spent, 500k reserved (third): not one more unit
    refused = await store.admit(ask(b, T0, cost=1, periods=periods))
    assert refused.failed == BUDGET and refused.index == 0


def test_wait_matches_the_estimate() -> None:
    """The closed form agrees with stepping the estimate forward."""
    for c, p, frac, cost, limit in [(3, 5, 0.2, 1, 6), (6, 0, 0.5, 1, 6), (4, 6, 0.9, 2, 6), (2, 6, 0.1, 3, 6)]:
        wait = window.wait(c, p, frac, cost, limit, 60)
        t = frac * 60 + wait + 1e-6
        if t < 60:
            est = window.estimate(c, p, t / 60)
        else:
            est = window.estimate(0, c, t / 60 - 1)
        assert est + cost <= limit + 1e-9
        t -= 0.01
        est_before = window.estimate(c, p, t / 60) if t < 60 else window.estimate(0, c, t / 60 - 1)
        assert est_before + cost > limit


async def test_redis_carries_settlements_with_the_next_admission(redis_url: str) -> None:
    """Without a budget, a settlement rides along with the principal's next admission (one round trip),
    or goes by itself within CARRY_S when none comes."""
    import asyncio

    store = RedisQuotaStore(redis_url, timeout_s=2.0, lease_s=60.0)
    try:
        tpm = Window("tokens", "minute", 60, 1000, "t60")
        p = plan(windows=(tpm,), concurrency=1)
        first = ask(p, T0, tokens=600)
        assert (await store.admit(first)).admitted
        assert (await store.admit(ask(p, T0, tokens=100))).failed == CONCURRENCY
        assert store.settle_soon(first, 200, 0, ()) is None  # carried, not sent
        second = ask(p, T0 + 1, tokens=700)
        verdict = await store.admit(second)  # sees the slot freed and 400 tokens given back
        assert verdict.admitted and verdict.remaining == [100]
        store.settle_soon(second, 100, 0, ())
        await asyncio.sleep(RedisQuotaStore.CARRY_S * 4)  # no admission came: it went by itself
        assert not store._carried
        verdict = await store.admit(ask(p, T0 + 2, tokens=700))
        assert verdict.admitted and verdict.remaining == [0]  # 200 + 100 used, 700 now
    finally:
        await store.close()


async def test_redis_carried_settlements_keep_the_plan_they_were_made_by(redis_url: str) -> None:
    """A key's plan is made again when its team's limits change; the settlements carried for the old plan are laid
    out for it (a bucket per token window), and are sent with it: not merged into the new plan's call (where they
    were read with the wrong layout: a slot never freed, or a script error that took the store down)."""
    import asyncio

    org = f"org_{secrets.token_hex(4)}"
    team = Level("team", "t:x", "x", concurrency=1)
    own = Window("tokens", "minute", 60, 100_000, "t60")
    team_tpm = Window("tokens", "minute", 60, 100_000, "t60", level=1)
    before = Plan(
        tag=org_tag(org), subject="k:a", key_id="a", windows=(own,), concurrency=None, budgets=(), levels=(team,)
    )
    after = Plan(
        tag=org_tag(org),
        subject="k:a",
        key_id="a",
        windows=(own, team_tpm),
        concurrency=None,
        budgets=(),
        levels=(team,),
    )
    other = Plan(
        tag=org_tag(org),
        subject="k:b",
        key_id="b",
        windows=(own, team_tpm),
        concurrency=None,
        budgets=(),
        levels=(team,),
    )
    store = RedisQuotaStore(redis_url, timeout_s=2.0, lease_s=60.0)
    try:
        first = ask(before, T0, tokens=10)
        assert (await store.admit(first)).admitted
        store.settle_soon(first, 5, 0, ())  # carried: its delta, its one bucket, its lease
        store.flush_soon()  # what forget_plans does when limits change
        await asyncio.sleep(RedisQuotaStore.CARRY_S)
        assert not store._carried
        second = ask(after, T0 + 1, tokens=10)
        assert (await store.admit(second)).admitted  # the team's one slot was freed
        store.settle_soon(second, 5, 0, ())
        assert (await store.admit(ask(other, T0 + 2, tokens=10))).failed == CONCURRENCY  # until it is sent
        third = ask(after, T0 + 3, tokens=10)
        assert (await store.admit(third)).admitted  # rode along with the same plan's next admission
        # Old-plan settlements left carried when the new plan's admission comes: no error, sent on their own.
        olds = [ask(before, T0 + 4, tokens=10) for _ in range(3)]
        store.settle_soon(third, 5, 0, ())
        await store.flush()
        for old in olds:
            old.buckets = [math.floor((T0 + 4) / 60)]
            store.settle_soon(old, 5, 0, ())
        assert (await store.admit(ask(after, T0 + 5, tokens=10))).admitted
        await store.flush()
        assert not store._carried
    finally:
        await store.close()


async def test_redis_carried_settlement_corrects_the_previous_bucket(redis_url: str) -> None:
    """A reservation taken in one bucket and settled (carried) after the bucket rolled lands in `p`."""
    store = RedisQuotaStore(redis_url, timeout_s=2.0, lease_s=60.0)
    try:
        p = plan(windows=(Window("tokens", "minute", 60, 1000, "t60"),))
        first = ask(p, T0, tokens=800)
        assert (await store.admit(first)).admitted
        next_bucket = (math.floor(T0 / 60) + 1) * 60
        assert (await store.admit(ask(p, next_bucket + 1, tokens=1))).admitted  # rolls: p = 800
        store.settle_soon(first, 100, 0, ())  # carried: 700 of the previous bucket given back
        verdict = await store.admit(ask(p, next_bucket + 30, tokens=1))
        # Half the previous bucket still counts: 100 * 0.5 + 1 + 1 = 52 used.
        assert verdict.admitted and verdict.remaining == [948]
        verdict = await store.admit(ask(p, next_bucket + 30, tokens=1))
        assert verdict.remaining == [947]  # the correction was written, not only used once
    finally:
        await store.close()
