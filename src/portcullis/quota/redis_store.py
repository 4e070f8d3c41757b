"""Quota counters in Redis, shared by every gateway process: each operation is one Lua script, one round trip.

The scripts (admit.lua, settle.lua, extend.lua; authfail.lua counts failed authentications) are loaded
on every new connection and called by hash. All keys one script touches share the user's hash tag
(plan.py), so Redis Cluster runs them on one node (authfail.lua touches one key). On a single node the
calls go through `RespClient` (resp.py, why: its docstring); on a cluster through redis-py's cluster
client, which knows the slot map.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import Awaitable
from importlib import resources
from typing import Any

from portcullis.quota.plan import Plan
from portcullis.quota.resp import RedisReplyError, RedisUnavailable, RespClient, array_header, encode_args
from portcullis.quota.store import Alert, Ask, Verdict, budget_key


class _Script:
    def __init__(self, name: str) -> None:
        self.body = resources.files("portcullis.quota").joinpath(name).read_text()
        self.sha = hashlib.sha1(self.body.encode()).hexdigest()


ADMIT = _Script("admit.lua")
SETTLE = _Script("settle.lua")
EXTEND = _Script("extend.lua")
AUTHFAIL = _Script("authfail.lua")
_SCRIPTS = (ADMIT, SETTLE, EXTEND, AUTHFAIL)
_HEAD_CACHE = 50_000
_RETRY_FLUSH_S = 1.0


def _windows_keys(plan: Plan) -> list[str]:
    """Each level's windows hash: the principal's, then its team's and its organisation's (when they have limits)."""
    return [f"{plan.tag}:w:{plan.subject}", *(f"{plan.tag}:w:{level.subject}" for level in plan.levels)]


def _leases_keys(plan: Plan) -> list[str]:
    return [f"{plan.tag}:c:{plan.subject}", *(f"{plan.tag}:c:{level.subject}" for level in plan.levels)]


def _held(plan: Plan) -> list[str]:
    """The leases sets an admitted request of this plan is in (the levels with a concurrency limit)."""
    return [key for key, limit in zip(_leases_keys(plan), plan.concurrencies, strict=True) if limit is not None]


def _budget_keys(ask: Ask) -> list[str]:
    return [budget_key(ask.plan, i, period) for i, period in enumerate(ask.periods)]


# Each script call is (keys, the plan's constant arguments, this request's arguments): the first two
# are encoded once per plan and budget period and cached; only the last is encoded per request.


def admit_head(ask: Ask, lease_s: float) -> list[Any]:
    plan = ask.plan
    head: list[Any] = [*_windows_keys(plan), *_leases_keys(plan), *_budget_keys(ask)]
    head += [2 * max((w.seconds for w in plan.windows), default=60), 1 + len(plan.levels), len(plan.windows)]
    for w in plan.windows:
        head += [w.level + 1, w.field, w.seconds, w.limit]
    head += [*(limit or 0 for limit in plan.concurrencies), lease_s, len(plan.budgets)]
    head += [b.limit for b in plan.budgets]
    return head


def admit_tail(ask: Ask, carried: list[Any], *, admit: bool = True) -> list[Any]:
    """This request's arguments; `carried` is a flat list of earlier settlements (see carry())."""
    now = "" if ask.now is None else repr(ask.now)
    ends = (round(e, 3) for e in ask.period_ends_s)
    return [now, ask.tokens, ask.cost, ask.lease, *ends, 1 if admit else 0, _count(ask.plan, carried), *carried]


def carry(ask: Ask, tokens: int) -> list[Any]:
    """A settlement to ride along with the principal's next admission: {delta, token buckets, lease}."""
    plan = ask.plan
    buckets = [b for w, b in zip(plan.windows, ask.buckets, strict=True) if w.kind == "tokens"]
    return [tokens - ask.tokens, *buckets, ask.lease if plan.holds_leases else ""]


def _count(plan: Plan, carried: list[Any]) -> int:
    return len(carried) // (2 + sum(1 for w in plan.windows if w.kind == "tokens"))


def verdict_from(reply: list[Any], ask: Ask) -> Verdict:
    failed, index, retry_ms = reply[0], reply[1], reply[2]
    ask.buckets = reply[3::3]
    return Verdict(failed, index, retry_ms / 1000.0, list(reply[4::3]), [ms / 1000.0 for ms in reply[5::3]])


def settle_head(ask: Ask, thresholds: tuple[float, ...]) -> list[Any]:
    plan = ask.plan
    budgets = _budget_keys(ask)
    alerts = [k.replace(":b:", ":a:", 1) for k in budgets]
    fields: list[Any] = []
    for w in plan.windows:
        if w.kind == "tokens":
            fields += [w.level + 1, w.field]
    return [
        *_windows_keys(plan),
        *_leases_keys(plan),
        *budgets,
        *alerts,
        1 + len(plan.levels),
        *(1 if limit is not None else 0 for limit in plan.concurrencies),
        len(fields) // 2,
        *fields,
        len(plan.budgets),
        *(b.limit for b in plan.budgets),
        len(thresholds),
        *(round(t * 1000) for t in thresholds),
    ]


def settle_tail(ask: Ask, tokens: int, cost: int) -> list[Any]:
    plan = ask.plan
    buckets = [b for w, b in zip(plan.windows, ask.buckets, strict=True) if w.kind == "tokens"]
    lease = ask.lease if plan.holds_leases else ""
    return [tokens - ask.tokens, *buckets, lease, ask.cost + ask.extra_cost, cost]


def alerts_from(reply: list[Any]) -> list[Alert]:
    return [Alert(reply[i], reply[i + 1] / 1000.0, reply[i + 2]) for i in range(0, len(reply), 3)]


def _nkeys(plan: Plan) -> tuple[int, int]:
    """How many of the leading arguments are keys: (admit, settle)."""
    levels = 1 + len(plan.levels)
    return 2 * levels + len(plan.budgets), 2 * levels + 2 * len(plan.budgets)


class RedisQuotaStore:
    """Admission and settlement in Redis. Settlements of plans without budgets are not sent on their
    own: they wait (at most `CARRY_S`) to ride along with the same principal's next admission, in the
    same script call; under load that halves the round trips and the work Redis does per request.
    Budget settlements go at once (they may cross an alert threshold)."""

    CARRY_S = 0.005

    def __init__(self, url: str, *, timeout_s: float, lease_s: float, cluster: bool = False) -> None:
        self.lease_s = lease_s
        self._heads: dict[tuple[str, int, tuple[str, ...]], tuple[Plan, list[Any], bytes]] = {}
        # (owner, id of its plan) -> (an ask of that plan, flat carried settlements). By plan, not by owner alone: a
        # settlement's layout is its plan's (a bucket per token window, at every level), and a principal's plan is
        # made again when its team's or organisation's limits change; each list is sent with the plan it was made
        # by. (The ask in the entry keeps that plan alive, so its id names no other plan meanwhile.)
        self._carried: dict[tuple[str, int], tuple[Ask, list[Any]]] = {}
        self._flush_at: asyncio.TimerHandle | None = None
        self.cluster = None
        self.client: RespClient | None = None
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            self.cluster = RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        else:
            self.client = RespClient(
                url, timeout_s=timeout_s, on_connect=[("SCRIPT", "LOAD", s.body) for s in _SCRIPTS]
            )

    def _run(self, script: _Script, nkeys: int, head: list[Any], tail: list[Any], cached: bytes | None) -> Any:
        """EVALSHA; `cached` is the encoded command head (EVALSHA, sha, nkeys, keys, constants)."""
        if self.client is not None:
            if cached is None:
                cached = encode_args(["EVALSHA", script.sha, nkeys, *head])
            return self.client.send(array_header(3 + len(head) + len(tail)) + cached + encode_args(tail))
        return asyncio.ensure_future(self._run_cluster(script, nkeys, [*head, *tail]))

    async def _run_cluster(self, script: _Script, nkeys: int, args: list[Any]) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeout

        assert self.cluster is not None
        try:
            return await self.cluster.eval(script.body, nkeys, *args)
        except (RedisConnectionError, RedisTimeout, OSError) as exc:
            raise RedisUnavailable(str(exc)) from exc
        except RedisError as exc:
            raise RedisReplyError(str(exc)) from exc

    async def _call(self, script: _Script, nkeys: int, head: list[Any], tail: list[Any], cached: bytes | None) -> Any:
        try:
            return await self._run(script, nkeys, head, tail, cached)
        except RedisReplyError as exc:
            if self.client is None or not str(exc).startswith("NOSCRIPT"):
                raise
            # Someone flushed the script cache: send the body once; it is cached again.
            return await self.client.call("EVAL", script.body, nkeys, *head, *tail)

    def _head(self, kind: str, ask: Ask, build: Any) -> tuple[list[Any], bytes]:
        """The plan's constant arguments and their encoding, cached per plan and budget period."""
        key = (kind, id(ask.plan), ask.periods)
        entry = self._heads.get(key)
        if entry is None or entry[0] is not ask.plan:
            if len(self._heads) > _HEAD_CACHE:
                self._heads.clear()
            head = build()
            nkeys = _nkeys(ask.plan)[0 if kind == "admit" else 1]
            script = ADMIT if kind == "admit" else SETTLE
            entry = self._heads[key] = (ask.plan, head, encode_args(["EVALSHA", script.sha, nkeys, *head]))
        return entry[1], entry[2]

    async def ping(self) -> None:
        if self.client is not None:
            await self.client.call("PING")
        else:
            assert self.cluster is not None
            try:
                await self.cluster.ping()
            except Exception as exc:
                raise RedisUnavailable(str(exc)) from exc

    async def admit(self, ask: Ask) -> Verdict:
        head, cached = self._head("admit", ask, lambda: admit_head(ask, self.lease_s))
        pending = self._carried.pop((ask.plan.owner, id(ask.plan)), None)
        carried = pending[1] if pending is not None else []
        try:
            reply = await self._call(ADMIT, _nkeys(ask.plan)[0], head, admit_tail(ask, carried), cached)
        except BaseException:
            if pending is not None:  # not applied: they go with the next call
                self._carry(pending[0], pending[1])
            raise
        return verdict_from(reply, ask)

    def _carry(self, ask: Ask, settlement: list[Any], *, delay_s: float | None = None) -> None:
        key = (ask.plan.owner, id(ask.plan))
        entry = self._carried.get(key)
        if entry is None:
            self._carried[key] = (ask, list(settlement))
        else:
            entry[1].extend(settlement)
        if self._flush_at is None:
            delay = self.CARRY_S if delay_s is None else delay_s
            self._flush_at = asyncio.get_running_loop().call_later(delay, self._flush_soon)

    def flush_soon(self) -> None:
        """Send the carried settlements now, without waiting (plans were made again: a settlement carried for an old
        plan would otherwise wait for CARRY_S, holding its slot and tokens at the shared levels meanwhile)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
        self._flush_soon()

    def _flush_soon(self) -> None:
        self._flush_at = None
        if self._carried:
            future = asyncio.ensure_future(self.flush())
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def flush(self) -> None:
        """Send every carried settlement now (no principal admitted anything since)."""
        carried, self._carried = self._carried, {}
        calls = []
        for ask, settlement in carried.values():
            head, cached = self._head("admit", ask, lambda a=ask: admit_head(a, self.lease_s))
            tail = admit_tail(ask, settlement, admit=False)
            calls.append(self._call(ADMIT, _nkeys(ask.plan)[0], head, tail, cached))
        results = await asyncio.gather(*calls, return_exceptions=True)
        failure = None
        for (ask, settlement), result in zip(carried.values(), results, strict=True):
            if isinstance(result, BaseException):
                # Redis is away: keep them for when it is back, trying again in a second, not 5 ms.
                self._carry(ask, settlement, delay_s=_RETRY_FLUSH_S)
                failure = result
        if failure is not None:
            raise failure

    async def settle(self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> list[Alert]:
        head, cached = self._head("settle", ask, lambda: settle_head(ask, thresholds))
        reply = await self._call(SETTLE, _nkeys(ask.plan)[1], head, settle_tail(ask, tokens, cost), cached)
        return alerts_from(reply)

    def settle_soon(
        self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]
    ) -> asyncio.Future[list[Alert]] | None:
        """Settle without waiting: carried along with the next admission (None), or, under a budget,
        sent now; the future's result is the alerts the settlement crossed."""
        if not ask.plan.budgets:
            self._carry(ask, carry(ask, tokens))
            return None
        return asyncio.ensure_future(self.settle(ask, tokens, cost, thresholds))

    async def extend(self, ask: Ask, more: int) -> int:
        keys = _budget_keys(ask)
        grant = int(await self._call(EXTEND, len(keys), keys, [more, *(b.limit for b in ask.plan.budgets)], None))
        ask.extra_cost += grant
        return grant

    async def count_failure(self, key: str, window_s: float) -> tuple[int, float]:
        """One failed authentication counted under `key` (identity/throttle.py), in one atomic step shared
        by every process: the failures in its window so far and the seconds until that window ends."""
        reply = await self._call(AUTHFAIL, 1, [key, math.ceil(window_s * 1000)], [], None)
        return int(reply[0]), int(reply[1]) / 1000.0

    async def renew(self, asks: list[Ask]) -> None:
        """Push out the expiry of the concurrency leases of requests still running, and of their sets."""
        until = time.time() + self.lease_s
        ttl = math.ceil(self.lease_s * 2)
        futures: list[Awaitable[Any]] = []  # the RESP client's futures, or redis-py cluster coroutines
        held = [(ask, _held(ask.plan)) for ask in asks]
        for key in {key for _, keys in held for key in keys}:
            if self.client is not None:
                futures.append(self.client.call("EXPIRE", key, ttl))
            else:
                assert self.cluster is not None
                futures.append(self.cluster.expire(key, ttl))
        for ask, keys in held:
            for key in keys:
                if self.client is not None:
                    futures.append(self.client.call("ZADD", key, "XX", until, ask.lease))
                else:
                    assert self.cluster is not None
                    futures.append(self.cluster.zadd(key, {ask.lease: until}, xx=True))
        if futures:
            await asyncio.gather(*futures)

    async def close(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._carried:
            with contextlib.suppress(RedisUnavailable, RedisReplyError):
                await self.flush()
        if self.client is not None:
            await self.client.close()
        if self.cluster is not None:
            await self.cluster.aclose()
