"""The quota stage: admit a request against its principal's limits and budgets, settle it when it ends.

    admit    after validation, before the upstream: reserve 1 request, the estimated tokens (prompt
             estimate + max_tokens or the default), a concurrency slot and the estimated cost on
             every budget, in one atomic step; set the x-ratelimit-* headers; or refuse with 429
             (Retry-After = when this request would really be admitted), or 400 when the request is
             larger than a whole window.
    guard    a stream whose tokens outgrow the reservation reserves more budget as it goes; when a
             budget has no more room the stream ends with a `budget_exceeded` error event.
    settle   when the response is over (any way it ends): real tokens and cost replace the
             reservation and the slot is freed. Off the request path: the client never waits for it.

Counters live in Redis (shared, one script per step) or in this process. When Redis fails,
`quota.on_store_error` decides: fail_open falls back to in-process counters holding this process's
`fallback_share` of each limit; fail_closed answers 503. A probe brings Redis back automatically.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from datetime import UTC, datetime
from typing import Any

from portcullis.config import Config
from portcullis.errors import InvalidRequest, ServiceUnavailable, TooManyRequests, retry_after_headers
from portcullis.exchange import Exchange, Filter
from portcullis.http import Request
from portcullis.identity.principal import Principal
from portcullis.obs.metrics import Metrics
from portcullis.quota import estimate
from portcullis.quota.alerts import BudgetAlerts
from portcullis.quota.failover import STORE_ERRORS, FailoverStore, StoreDown
from portcullis.quota.plan import MICRO, Plan, build_plan, period_bounds
from portcullis.quota.redis_store import RedisQuotaStore
from portcullis.quota.store import BUDGET, CONCURRENCY, TOO_LARGE, Alert, Ask, MemoryQuotaStore, Verdict
from portcullis.routing.catalog import Catalog

_PLAN_CACHE = 50_000
# (the windows of one kind, then the names of its limit, remaining and reset headers)
_HeaderSpec = tuple[tuple[int, ...], bytes, bytes, bytes]


class Meter(Filter):
    """What a request holds until it is settled, and the quota stage's response half: a stream under a
    budget asks for more each time it passes what its reservation covers (and is ended when the budget is
    spent); when the request is over, its real tokens and cost replace the reservation."""

    __slots__ = ("ask", "closing", "completion_price", "covered_tokens", "quota", "streams")

    def __init__(self, quota: Quota, ask: Ask, completion_price: float, covered_tokens: int) -> None:
        self.quota = quota
        self.ask = ask
        self.completion_price = completion_price  # per 1k, the most expensive deployment's (for top-ups)
        self.covered_tokens = covered_tokens  # completion tokens the budget reservation covers so far
        self.streams = bool(ask.plan.budgets)  # only a budget needs to watch a stream
        self.closing: bytes | None = None

    async def event(self, ex: Exchange, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if ex.streamed_tokens > self.covered_tokens and not await self.quota.top_up(ex, self):
            ex.streamed_tokens -= 1  # this token is not delivered, so not charged
            ex.error_code = "budget_exceeded"
            self.closing = ex.error_event(
                "The budget was spent during this response; it was ended after the tokens already paid for.",
                type="rate_limit_error",
                code=ex.error_code,
            )
            return []
        return [chunk]

    def done(self, ex: Exchange, status: int) -> None:
        self.quota.settle(ex, self)


def duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms" if seconds > 0 else "0s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _periods(now: datetime) -> tuple[dict[str, str], dict[str, float]]:
    """Each calendar budget period's id (its counters' name) and the seconds until it ends."""
    iso = now.isocalendar()
    ids = {"day": now.strftime("d%Y%m%d"), "week": f"w{iso.year}{iso.week:02d}", "month": now.strftime("m%Y%m")}
    ends = {period: (end - now).total_seconds() for period, (_, end) in period_bounds(now).items()}
    return ids, ends


class Quota:
    def __init__(self, config: Config, metrics: Metrics, log: Any, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.q = config.quota
        self.metrics = metrics
        self.log = log
        backend = self.q.backend
        if backend == "auto":
            backend = "redis" if config.store.redis_url else "memory"
        memory = MemoryQuotaStore()
        self.redis: RedisQuotaStore | None = None
        if backend == "redis":
            assert config.store.redis_url is not None
            self.redis = RedisQuotaStore(
                config.store.redis_url,
                timeout_s=self.q.store_timeout_s,
                lease_s=self.q.concurrency_lease_s,
                cluster=self.q.redis_cluster,
            )
            memory = MemoryQuotaStore(share=self.q.fallback_share)
        # Redis, with its fallback (on_store_error) and its recovery: one store (quota/failover.py).
        self.store = FailoverStore(self.redis, memory, self.q, metrics, log)
        self.alerts = BudgetAlerts(self.q, metrics, log)
        self.thresholds = tuple(self.q.alert_thresholds)
        # principal -> (its plan, how its x-ratelimit-* headers are made)
        self._plans: dict[tuple[str, str | None, str, str], tuple[Plan, list[_HeaderSpec]]] = {}
        # (id of a plan, its range budgets out of their span) -> (that plan: alive while cached, the plan without them)
        self._variants: dict[tuple[int, tuple[int, ...]], tuple[Plan, Plan]] = {}
        # Lease ids unique across processes: this process's prefix and a counter.
        self._lease_prefix = f"{os.getpid():x}.{os.urandom(3).hex()}."
        self._lease_count = itertools.count()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.alerts.start()
        self.store.start()

    async def stop(self) -> None:
        await self.store.stop(timeout_s=self.q.store_timeout_s * 2)
        await self.alerts.stop()

    @property
    def degraded(self) -> bool:
        """Redis is away and quota.on_store_error applies (/readyz says so)."""
        return self.store.degraded

    # -- admission ------------------------------------------------------------------------------

    def plan_for(self, principal: Principal) -> tuple[Plan, list[_HeaderSpec]]:
        cache_key = (principal.tier, principal.key_id, principal.user, principal.levels_key)
        entry = self._plans.get(cache_key)
        if entry is None:
            if len(self._plans) >= _PLAN_CACHE:
                self._plans.clear()
            plan = build_plan(self.config, principal)
            entry = self._plans[cache_key] = (plan, _header_spec(plan))
        return entry

    def concurrency_of(self, principal: Principal) -> int | None:
        """How many requests `principal` may have in flight (None: no limit)."""
        limits = [limit for limit in self.plan_for(principal)[0].concurrencies if limit is not None]
        return min(limits) if limits else None  # (its team's or organisation's may be the tightest)

    async def admit(self, req: Request, ex: Exchange, request: Any) -> None:
        """`request`: the validated chat, completion or embedding request (sizes the reservation)."""
        if ex.trace is not None:
            ex.trace.stage("quota")
        principal = ex.principal
        if principal is None:
            return
        plan, header_spec = self.plan_for(principal)
        if plan.empty:
            return
        prompt_tokens, completion_tokens = estimate.reservation(request, self.q)
        tokens = prompt_tokens + completion_tokens
        # The dearest replica's price: the reservation must cover wherever the request lands.
        prompt_price, completion_price = self.catalog.max_price(ex.model or "")
        cost = math.ceil((prompt_tokens * prompt_price + completion_tokens * completion_price) * 1000)
        if plan.budgets:
            now = datetime.now(UTC)
            if plan.has_spans:
                plan = self._in_span(plan, now.timestamp())
            ids, ends = _periods(now)
            periods = tuple(b.span_id or ids[b.period] for b in plan.budgets)
            period_ends = tuple(b.span[1] - now.timestamp() if b.span_id else ends[b.period] for b in plan.budgets)
        else:
            periods = period_ends = ()
        lease = f"{self._lease_prefix}{next(self._lease_count):x}"
        ask = Ask(plan, tokens, cost, lease, periods, period_ends)
        store = self.store
        if store.local:  # (every request: no coroutine when nothing can wait)
            verdict = store.admit_local(ask)
        else:
            try:
                verdict = await store.admit(ask)
            except StoreDown:
                raise self._store_down() from None
        if plan.windows:
            req.response_headers += _headers(plan, verdict, header_spec)
        if not verdict.admitted:
            raise self._refusal(plan, ask, verdict, prompt_tokens, completion_tokens)
        ex.prompt_estimate = prompt_tokens
        ex.filters.append(Meter(self, ask, completion_price, completion_tokens))

    def _refusal(self, plan: Plan, ask: Ask, verdict: Verdict, prompt: int, completion: int) -> Exception:
        """The refusal names the level that refused (the key's own limit, its user's, its team's, its organisation's),
        in the message and in `x-portcullis-limit-scope`; Retry-After is the wait at that level."""
        retry = verdict.retry_after_s
        if verdict.failed == TOO_LARGE:
            w = plan.windows[verdict.index]
            scope, name = plan.scope_of(w.level)
            whose = "your" if w.level == 0 else _level(scope, name) + "'s"
            self.metrics.quota_refusals.labels("too_large").inc()
            return InvalidRequest(
                f"This request reserves {ask.tokens} tokens (about {prompt} for the prompt and {completion} "
                f"for the completion), more than {whose} limit of {w.limit} {w.label}. "
                "Lower max_tokens or shorten the prompt.",
                param="max_tokens",
                code="tokens_exceed_limit",
                headers={"x-portcullis-limit-scope": scope},
            )
        headers = retry_after_headers(retry)
        if verdict.failed == BUDGET:
            budget = plan.budgets[verdict.index]
            self.metrics.quota_refusals.labels("budget").inc()
            whose = {"key": "this key", "user": "your user"}.get(budget.subject) or _level(budget.subject, budget.name)
            if budget.span_id:
                since, until = (datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") for t in budget.span)
                what, renews = f"budget of {whose} from {since} to {until}", f"it ends in {duration(retry)}"
            else:
                what, renews = f"{_PERIOD_WORD[budget.period]} budget of {whose}", f"it renews in {duration(retry)}"
            return TooManyRequests(
                f"The {what} ({budget.limit_display:g} {self.q.currency}) is spent; {renews}.",
                code="budget_exceeded",
                headers={**headers, "x-portcullis-limit-scope": budget.subject},
            )
        if verdict.failed == CONCURRENCY:
            scope, name = plan.scope_of(verdict.index)
            self.metrics.quota_refusals.labels("concurrency").inc()
            at = "" if verdict.index == 0 else f" of {_level(scope, name)}"
            return TooManyRequests(
                f"Rate limit reached for concurrent requests{at}: limit {plan.concurrencies[verdict.index]} in "
                f"flight. Please try again in {duration(retry)}.",
                code="rate_limit_exceeded",
                headers={**headers, "x-portcullis-limit-scope": scope},
            )
        w = plan.windows[verdict.index]
        scope, name = plan.scope_of(w.level)
        self.metrics.quota_refusals.labels(w.kind).inc()
        cost = ask.tokens if w.kind == "tokens" else 1
        at = "" if w.level == 0 else f" of {_level(scope, name)}"
        return TooManyRequests(
            f"Rate limit reached for {w.label}{at}: limit {w.limit}, remaining {verdict.remaining[verdict.index]}, "
            f"requested {cost}. Please try again in {retry:.3f}s.",
            code="rate_limit_exceeded",
            headers={**headers, "x-portcullis-limit-scope": scope},
        )

    def _in_span(self, plan: Plan, now: float) -> Plan:
        """The plan with only the range budgets whose span `now` is in (the others do not apply): a variant plan,
        made once per combination."""
        out = tuple(i for i, b in enumerate(plan.budgets) if b.span_id and not b.span[0] <= now < b.span[1])
        if not out:
            return plan
        key = (id(plan), out)
        found = self._variants.get(key)
        if found is None or found[0] is not plan:
            if len(self._variants) >= _PLAN_CACHE:
                self._variants.clear()
            found = self._variants[key] = (plan, plan.without(out))
        return found[1]

    def forget_plans(self) -> None:
        """A team's or an organisation's limits changed: every principal's plan is made again when next used (the
        cache key names the levels' settings too, so this frees memory; correctness does not wait for it)."""
        self._plans.clear()
        self._variants.clear()
        if self.redis is not None:
            self.redis.flush_soon()

    # -- streams that outgrow their reservation -------------------------------------------------

    async def top_up(self, ex: Exchange, held: Meter) -> bool:
        """More budget for a stream past its covered tokens; False: a budget is spent, end the stream."""
        step = max(16, held.covered_tokens // 4)
        per_token = held.completion_price * 1000  # micro-units
        if per_token <= 0:
            held.covered_tokens += step
            return True
        # (Redis failing now: fail_open grants the whole step uncharged, fail_closed nothing: the stream ends)
        granted = await self.store.extend(held.ask, math.ceil(step * per_token))
        held.covered_tokens += int(granted // per_token)
        return ex.streamed_tokens <= held.covered_tokens

    # -- settlement -----------------------------------------------------------------------------

    def settle(self, ex: Exchange, held: Meter) -> None:
        """The request is over (`ex.account` has run): real tokens and cost replace the reservation. Never waits."""
        cost = math.ceil(ex.cost * MICRO)
        ask = held.ask
        spent = (ex.prompt_tokens or 0) + (ex.completion_tokens or 0)
        settled = self.store.settle_soon(ask, spent, cost, self.thresholds)
        if isinstance(settled, list):  # in process: at once
            self._alert(ask, settled)
        elif settled is not None:  # (None: carried along with this principal's next admission)
            settled.add_done_callback(lambda f: self._settled(f, ask))

    def _settled(self, future: asyncio.Future[list[Alert]], ask: Ask) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._alert(ask, future.result())
            return
        if isinstance(exc, STORE_ERRORS):
            self.store.failed(exc)
        # The reservation stays until its window rolls over and the lease expires: conservative.
        self.log.warning("quota_settle_failed", error=str(exc), lease=ask.lease)

    def _alert(self, ask: Ask, alerts: list[Alert]) -> None:
        plan = ask.plan
        for alert in alerts:
            budget = plan.budgets[alert.budget]
            self.alerts.fire(
                {
                    "subject": budget.subject,
                    "key_id": plan.key_id if budget.subject == "key" else None,
                    "level": budget.name or None,  # a team's or an organisation's name
                    "user_tag": plan.tag,
                    "period": budget.period,
                    "period_id": ask.periods[alert.budget],
                    "threshold": alert.threshold,
                    "spent": alert.spent / MICRO,
                    "budget": budget.limit_display,
                    "currency": self.q.currency,
                }
            )

    # -- refusals the store causes -------------------------------------------------------------

    def _store_down(self) -> ServiceUnavailable:
        self.metrics.quota_refusals.labels("store_unavailable").inc()
        return ServiceUnavailable(
            "Rate limits cannot be checked right now (the quota store is unavailable); try again shortly.",
            code="quota_store_unavailable",
            headers={"Retry-After": "1"},
        )


_PERIOD_WORD = {"day": "daily", "week": "weekly", "month": "monthly"}


def _level(scope: str, name: str) -> str:
    """ "your team 'search'", "your organisation 'acme'"."""
    return f"your {'organisation' if scope == 'organization' else scope} '{name}'"


def _header_spec(plan: Plan) -> list[_HeaderSpec]:
    """Per kind (requests, tokens): its windows, and the header names, encoded once per plan."""
    spec = []
    for kind in ("requests", "tokens"):
        idx = tuple(i for i, w in enumerate(plan.windows) if w.kind == kind)
        if idx:
            k = kind.encode()
            spec.append((idx, b"x-ratelimit-limit-" + k, b"x-ratelimit-remaining-" + k, b"x-ratelimit-reset-" + k))
    return spec


def _headers(plan: Plan, verdict: Verdict, spec: list[_HeaderSpec]) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-*: for requests and for tokens, the window with the least room left."""
    out = []
    remaining = verdict.remaining
    for idx, limit_name, remaining_name, reset_name in spec:
        best = idx[0]
        for i in idx[1:]:
            if remaining[i] < remaining[best]:
                best = i
        out.append((limit_name, b"%d" % plan.windows[best].limit))
        out.append((remaining_name, b"%d" % remaining[best]))
        out.append((reset_name, duration(verdict.reset_s[best]).encode()))
    return out
