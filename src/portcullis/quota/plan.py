"""What a principal may use: its windows, its concurrency, its budgets, resolved once and cached.

Limits come from the principal's tier (`tiers.<name>.limits`), overridden field by field by an API
key's own `limits`. Budgets are per key (the key's `budget`) and per user (`quota.users.<user>.budget`,
else the tier's `user_budget`).

Every Redis key of one user shares one hash tag, `{pc:<hash of the user>}`: a key's windows, its
leases, its budget and the user's budget all live in one hash slot, so a single script can check and
take them together even on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from portcullis.config import BudgetConfig, Config, LimitsConfig, TierConfig
from portcullis.identity.principal import Principal

MICRO = 1_000_000  # budgets and costs are kept as integer millionths of the currency unit

_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True, slots=True)
class Window:
    kind: Literal["requests", "tokens"]
    period: str  # "minute" | "hour" | "day"
    seconds: int
    limit: int
    field: str  # its name inside the principal's Redis hash, e.g. "r60"

    @property
    def label(self) -> str:
        return f"{self.kind} per {self.period}"


@dataclass(frozen=True, slots=True)
class Budget:
    subject: Literal["key", "user"]
    period: Literal["day", "month"]
    limit: int  # micro-units
    limit_display: float


@dataclass(frozen=True, slots=True)
class Plan:
    tag: str  # the Redis hash tag, "{pc:<hex>}"
    subject: str  # whose windows: "k:<key id>" or "u" (the user, for JWT and anonymous principals)
    key_id: str | None
    windows: tuple[Window, ...]
    concurrency: int | None
    budgets: tuple[Budget, ...]
    owner: str = ""  # "<tag>:<subject>": whose counters, as one string

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner", f"{self.tag}:{self.subject}")

    @property
    def empty(self) -> bool:
        return not self.windows and self.concurrency is None and not self.budgets


def user_tag(user: str) -> str:
    return "{pc:" + hashlib.blake2b(user.encode(), digest_size=8).hexdigest() + "}"


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
    windows: list[Window] = []
    kind: Literal["requests", "tokens"]  # (declared so that the loop's strings are read as these literals)
    for kind, spec, prefix in (("requests", limits.requests, "r"), ("tokens", limits.tokens, "t")):
        for period, limit in spec.model_dump().items():
            if limit is not None:
                seconds = _SECONDS[period]
                windows.append(Window(kind, period, seconds, limit, f"{prefix}{seconds}"))
    budgets: list[Budget] = []
    key_budget = (
        BudgetConfig.model_validate(principal.budget) if principal.key_id and principal.budget is not None else None
    )
    user_budget = user_budget_of(config, principal.user, tier)
    subject: Literal["key", "user"]
    budget_period: Literal["day", "month"]
    for subject, budget in (("key", key_budget), ("user", user_budget)):
        if budget is None:
            continue
        for budget_period in ("day", "month"):
            amount = getattr(budget, budget_period)
            if amount is not None:
                budgets.append(Budget(subject, budget_period, round(amount * MICRO), amount))
    return Plan(
        tag=user_tag(principal.user),
        subject=f"k:{principal.key_id}" if principal.key_id else "u",
        key_id=principal.key_id,
        windows=tuple(windows),
        concurrency=limits.concurrency,
        budgets=tuple(budgets),
    )


def user_budget_of(config: Config, user: str, tier: TierConfig | None) -> BudgetConfig:
    """A user's budget: `quota.users.<user>` when set, else the tier's `user_budget`."""
    override = config.quota.users.get(user)
    if override is not None:
        return override.budget
    return tier.user_budget if tier is not None else BudgetConfig()
