"""Quota counters in Redis, shared by every gateway process: each operation is one Lua script, one round trip.

The scripts (admit.lua, settle.lua, extend.lua) are loaded on every new connection and called by
hash. All keys one script touches share the user's hash tag (plan.py), so Redis Cluster runs them
on one node. On a single node the calls go through `RespClient` (resp.py, why: its docstring); on a
cluster through redis-py's cluster client, which knows the slot map.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from importlib import resources
from typing import Any

from portcullis.quota.plan import Plan
from portcullis.quota.resp import RedisReplyError, RedisUnavailable, RespClient
from portcullis.quota.store import Alert, Ask, Verdict, budget_key


class _Script:
    def __init__(self, name: str) -> None:
        self.body = resources.files("portcullis.quota").joinpath(name).read_text()
        self.sha = hashlib.sha1(self.body.encode()).hexdigest()


ADMIT = _Script("admit.lua")
SETTLE = _Script("settle.lua")
EXTEND = _Script("extend.lua")
_SCRIPTS = (ADMIT, SETTLE, EXTEND)


def _windows_key(plan: Plan) -> str:
    return f"{plan.tag}:w:{plan.subject}"


def _leases_key(plan: Plan) -> str:
    return f"{plan.tag}:c:{plan.subject}"


def _budget_keys(ask: Ask) -> list[str]:
    return [budget_key(ask.plan, i, period) for i, period in enumerate(ask.periods)]


def admit_args(ask: Ask, lease_s: float) -> tuple[list[str], list[Any]]:
    plan = ask.plan
    args: list[Any] = ["" if ask.now is None else repr(ask.now)]
    args.append(2 * max((w.seconds for w in plan.windows), default=60))
    args.append(len(plan.windows))
    for w in plan.windows:
        args += [w.field, w.seconds, w.limit, ask.tokens if w.kind == "tokens" else 1]
    args += [plan.concurrency or 0, ask.lease, lease_s]
    args.append(len(plan.budgets))
    for budget, ends in zip(plan.budgets, ask.period_ends_s, strict=True):
        args += [budget.limit, ask.cost, round(ends, 3)]
    return [_windows_key(plan), _leases_key(plan), *_budget_keys(ask)], args


def verdict_from(reply: list[Any], ask: Ask) -> Verdict:
    failed, index, retry_ms = reply[0], reply[1], reply[2]
    ask.buckets = reply[3::3]
    return Verdict(failed, index, retry_ms / 1000.0, list(reply[4::3]), [ms / 1000.0 for ms in reply[5::3]])


def settle_args(ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> tuple[list[str], list[Any]]:
    plan = ask.plan
    delta = tokens - ask.tokens
    fix = [(w.field, b) for w, b in zip(plan.windows, ask.buckets, strict=True) if w.kind == "tokens"] if delta else []
    args: list[Any] = [len(fix)]
    for field, bucket in fix:
        args += [field, bucket, delta]
    args.append(ask.lease if plan.concurrency is not None else "")
    args.append(len(plan.budgets))
    for budget in plan.budgets:
        args += [ask.cost + ask.extra_cost, cost, budget.limit]
    args.append(len(thresholds))
    args += [round(t * 1000) for t in thresholds]
    budgets = _budget_keys(ask)
    alerts = [k.replace(":b:", ":a:", 1) for k in budgets]
    return [_windows_key(plan), _leases_key(plan), *budgets, *alerts], args


def alerts_from(reply: list[Any]) -> list[Alert]:
    return [Alert(reply[i], reply[i + 1] / 1000.0, reply[i + 2]) for i in range(0, len(reply), 3)]


class RedisQuotaStore:
    def __init__(self, url: str, *, timeout_s: float, lease_s: float, cluster: bool = False) -> None:
        self.lease_s = lease_s
        self.cluster = None
        self.client: RespClient | None = None
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            self.cluster = RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        else:
            self.client = RespClient(
                url, timeout_s=timeout_s, on_connect=[("SCRIPT", "LOAD", s.body) for s in _SCRIPTS]
            )

    def _run(self, script: _Script, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        if self.client is not None:
            return self.client.call("EVALSHA", script.sha, len(keys), *keys, *args)
        return asyncio.ensure_future(self._run_cluster(script, keys, args))

    async def _run_cluster(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeout

        assert self.cluster is not None
        try:
            return await self.cluster.eval(script.body, len(keys), *keys, *args)
        except (RedisConnectionError, RedisTimeout, OSError) as exc:
            raise RedisUnavailable(str(exc)) from exc
        except RedisError as exc:
            raise RedisReplyError(str(exc)) from exc

    async def _call(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._run(script, keys, args)
        except RedisReplyError as exc:
            if self.client is None or not str(exc).startswith("NOSCRIPT"):
                raise
            # Someone flushed the script cache: send the body once; it is cached again.
            return await self.client.call("EVAL", script.body, len(keys), *keys, *args)

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
        keys, args = admit_args(ask, self.lease_s)
        return verdict_from(await self._call(ADMIT, keys, args), ask)

    async def settle(self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> list[Alert]:
        keys, args = settle_args(ask, tokens, cost, thresholds)
        return alerts_from(await self._call(SETTLE, keys, args))

    def settle_soon(self, ask: Ask, tokens: int, cost: int, thresholds: tuple[float, ...]) -> asyncio.Future[Any]:
        """Send the settlement without a task of its own (the hot path does not wait for it). The
        future's result is the raw reply: `alerts_from()` reads it."""
        keys, args = settle_args(ask, tokens, cost, thresholds)
        return self._run(SETTLE, keys, args)

    async def extend(self, ask: Ask, more: int) -> int:
        keys = _budget_keys(ask)
        grant = int(await self._call(EXTEND, keys, [more, *(b.limit for b in ask.plan.budgets)]))
        ask.extra_cost += grant
        return grant

    async def renew(self, asks: list[Ask]) -> None:
        """Push out the expiry of the concurrency leases of requests still running."""
        until = time.time() + self.lease_s
        futures = []
        for ask in asks:
            if self.client is not None:
                futures.append(self.client.call("ZADD", _leases_key(ask.plan), "XX", until, ask.lease))
            else:
                assert self.cluster is not None
                futures.append(self.cluster.zadd(_leases_key(ask.plan), {ask.lease: until}, xx=True))
        if futures:
            await asyncio.gather(*futures)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.cluster is not None:
            await self.cluster.aclose()
