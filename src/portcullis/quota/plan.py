"""What a principal may use: its windows, its concurrency, its budgets, at every level, resolved once and cached.

The levels, from the bottom: the principal itself (an API key, or the user of a JWT), then its team and its
organisation (identity/tenancy.py), each with windows of requests and tokens, a concurrency limit and budgets.
The principal's limits come from its tier (`tiers.<name>.limits`), overridden field by field by an API key's own
`limits`; its budgets are the key's (`budget`) and its user's (`quota.users.<user>.budget`, else the tier's
`user_budget`). A team's and an organisation's limits and budget are their own (set with the admin API). A
request is admitted only if every level admits it, all in one atomic step.

Every Redis key a principal's admission touches shares one hash tag, so a single script can check and take
them together even on Redis Cluster: the organisation's, `{pc:o:<org id>}`, for the keys of an organisation
that was created (its team's and its own counters are shared by all its keys); the user's,
`{pc:<hash of the user>}`, for everyone else (JWT principals, the keys of the default organisation, whose
levels carry no limits), so those spread over a cluster by user as before organisations existed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from portcullis.config import BudgetConfig, Config, LimitsConfig, TierConfig
from portcullis.identity.principal import DEFAULT_ORG, Principal

MICRO = 1_000_000  # budgets and costs are kept as integer millionths of the currency unit

_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
PERIODS: tuple[Literal["day", "week", "month"], ...] = ("day", "week", "month")
Scope = Literal["key", "user", "team", "organization"]


@dataclass(frozen=True, slots=True)
class Window:
    kind: Literal["requests", "tokens"]
    period: str  # "minute" | "hour" | "day"
    seconds: int
    limit: int
    field: str  # its name inside its level's Redis hash, e.g. "r60"
    level: int = 0  # whose: an index into Plan.levels (0: the principal)

    @property
    def label(self) -> str:
        return f"{self.kind} per {self.period}"


@dataclass(frozen=True, slots=True)
class Level:
    """One level above the principal whose counters the principal's requests also take."""

    scope: Scope  # "team" or "organization"
    subject: str  # its counters' name under the plan's tag: "t:<team id>", "o"
    name: str  # for people: the team's or the organisation's name
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    subject: Scope
    period: Literal["day", "week", "month", "range"]
    limit: int  # micro-units
    limit_display: float
    who: str = ""  # its counters' name under the plan's tag ("k:<id>", "u", "t:<team id>", "o")
    name: str = ""  # for people: the team's or the organisation's name
    tag: str = ""  # the hash tag it lives under when not the plan's (a user's budget, which spans organisations)
    # A "range" budget's span: POSIX start and end (it applies only between them), and its period id.
    span: tuple[float, float] = (0.0, 0.0)
    span_id: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    tag: str  # the Redis hash tag: "{pc:<hex>}" (a user) or "{pc:o:<org id>}" (an organisation)
    subject: str  # whose windows: "k:<key id>" or "u" (the user, for JWT and anonymous principals)
    key_id: str | None
    windows: tuple[Window, ...]
    concurrency: int | None  # the principal's own
    budgets: tuple[Budget, ...]
    # The levels above the principal with limits of their own (team, organisation); window.level 1 is levels[0].
    levels: tuple[Level, ...] = ()
    owner: str = ""  # "<tag>:<subject>": whose counters, as one string
    # Worked out once (the stores read them on every request):
    # every level's "<tag>:<subject>", the principal's first (the counters' owners, in window.level order);
    owners: tuple[str, ...] = ()
    # each level's concurrency limit, in the same order; and whether any level has one (a request holds a slot).
    concurrencies: tuple[int | None, ...] = ()
    holds_leases: bool = False
    has_spans: bool = False  # a range budget among its budgets (applies only within its span)

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner", f"{self.tag}:{self.subject}")
        object.__setattr__(self, "owners", (self.owner, *(f"{self.tag}:{level.subject}" for level in self.levels)))
        limits = (self.concurrency, *(level.concurrency for level in self.levels))
        object.__setattr__(self, "concurrencies", limits)
        object.__setattr__(self, "holds_leases", any(limit is not None for limit in limits))
        object.__setattr__(self, "has_spans", any(b.period == "range" for b in self.budgets))

    @property
    def empty(self) -> bool:
        return not self.windows and self.concurrency is None and not self.budgets and not self.levels

    def without(self, budgets: tuple[int, ...]) -> Plan:
        """The same plan without these budgets (range budgets out of their span)."""
        kept = tuple(b for i, b in enumerate(self.budgets) if i not in budgets)
        return replace(self, budgets=kept, owner="", owners=())

    def scope_of(self, level: int) -> tuple[Scope, str]:
        """Whose a level is, for a refusal: ("key", id), ("user", name), ("team", name), ("organization", name)."""
        if level == 0:
            return ("key", self.key_id) if self.key_id else ("user", "")
        found = self.levels[level - 1]
        return found.scope, found.name


def user_tag(user: str) -> str:
    return "{pc:" + hashlib.blake2b(user.encode(), digest_size=8).hexdigest() + "}"


def org_tag(org_id: str) -> str:
    return "{pc:o:" + org_id + "}"


def _windows(limits: LimitsConfig, level: int) -> list[Window]:
    windows: list[Window] = []
    kind: Literal["requests", "tokens"]  # (declared so that the loop's strings are read as these literals)
    for kind, spec, prefix in (("requests", limits.requests, "r"), ("tokens", limits.tokens, "t")):
        for period, limit in spec.model_dump().items():
            if limit is not None:
                seconds = _SECONDS[period]
                windows.append(Window(kind, period, seconds, limit, f"{prefix}{seconds}", level))
    return windows


def _budgets(budget: BudgetConfig | None, subject: Scope, who: str, name: str = "", tag: str = "") -> list[Budget]:
    if budget is None:
        return []
    out = []
    for period in PERIODS:
        amount = getattr(budget, period)
        if amount is not None:
            out.append(Budget(subject, period, round(amount * MICRO), amount, who, name, tag))
    span = budget.range
    if span is not None:
        start, end = (t.timestamp() for t in span.bounds())
        span_id = f"r{span.start:%Y%m%d}-{span.end:%Y%m%d}"
        limit = round(span.amount * MICRO)
        out.append(Budget(subject, "range", limit, span.amount, who, name, tag, (start, end), span_id))
    return out


def period_bounds(now: datetime) -> dict[str, tuple[datetime, datetime]]:
    """Each calendar budget period's start and end (UTC) around `now`: the day, the ISO week, the month."""
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    week = day - timedelta(days=now.weekday())
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    next_month = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return {
        "day": (day, day + timedelta(days=1)),
        "week": (week, week + timedelta(days=7)),
        "month": (month, next_month),
    }


def _merged(tier: LimitsConfig, key: LimitsConfig | None) -> LimitsConfig:
    if key is None:
        return tier
    return LimitsConfig(
        requests=tier.requests.model_copy(update=key.requests.model_dump(exclude_unset=True)),
        tokens=tier.tokens.model_copy(update=key.tokens.model_dump(exclude_unset=True)),
        concurrency=key.concurrency if "concurrency" in key.model_fields_set else tier.concurrency,
    )


def build_plan(config: Config, principal: Principal) -> Plan:
    tier = config.tiers.get(principal.tier)
    tier_limits = tier.limits if tier is not None else LimitsConfig()
    # A key's limits and budget were validated against these models when it was created.
    key_limits = LimitsConfig.model_validate(principal.limits) if principal.limits is not None else None
    limits = _merged(tier_limits, key_limits)
    windows = _windows(limits, 0)
    key_budget = (
        BudgetConfig.model_validate(principal.budget) if principal.key_id and principal.budget is not None else None
    )
    subject = f"k:{principal.key_id}" if principal.key_id else "u"
    # The levels above: only an organisation that was created has them (the default one carries no limits).
    shared = principal.org is not None and principal.org != DEFAULT_ORG
    tag = org_tag(principal.org) if shared and principal.org else user_tag(principal.user)
    # A user's budget spans all their keys, in every organisation: it stays under the user's own tag, the script
    # taking it beside the organisation's counters. Redis Cluster cannot (one script, one slot): there it is
    # counted per organisation, under the organisation's tag, with the user in its name (docs/quotas.md).
    user_budget = user_budget_of(config, principal.user, tier)
    budgets = _budgets(key_budget, "key", subject)
    if shared and config.quota.redis_cluster:
        user_who = "u:" + hashlib.blake2b(principal.user.encode(), digest_size=8).hexdigest()
        budgets += _budgets(user_budget, "user", user_who)
    else:
        budgets += _budgets(user_budget, "user", "u", tag=user_tag(principal.user) if shared else "")
    levels: list[Level] = []
    if shared:
        for scope, who, name, level_limits, level_budget in (
            ("team", f"t:{principal.team}", principal.team_name, principal.team_limits, principal.team_budget),
            ("organization", "o", principal.org_name, principal.org_limits, principal.org_budget),
        ):
            parsed = LimitsConfig.model_validate(level_limits) if level_limits else LimitsConfig()
            found = _windows(parsed, len(levels) + 1)
            if found or parsed.concurrency is not None:
                levels.append(Level(scope, who, name, parsed.concurrency))  # type: ignore[arg-type]
                windows += found
            if level_budget:
                budgets += _budgets(BudgetConfig.model_validate(level_budget), scope, who, name)  # type: ignore[arg-type]
    return Plan(
        tag=tag,
        subject=subject,
        key_id=principal.key_id,
        windows=tuple(windows),
        concurrency=limits.concurrency,
        budgets=tuple(budgets),
        levels=tuple(levels),
    )


def user_budget_of(config: Config, user: str, tier: TierConfig | None) -> BudgetConfig:
    """A user's budget: `quota.users.<user>` when set, else the tier's `user_budget`."""
    override = config.quota.users.get(user)
    if override is not None:
        return override.budget
    return tier.user_budget if tier is not None else BudgetConfig()
