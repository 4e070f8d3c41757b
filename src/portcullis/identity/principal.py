"""Who is calling: the result of authentication, read by every later stage."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import orjson

# One namespace per identity source: the user of a JWT is "jwt:<sub>" (unless auth.jwt.users maps the subject),
# and an API key's user may not start with this, so a token's subject never names a key user's data.
JWT_USER_PREFIX = "jwt:"
# The default organisation and its default team (migration 0009; identity/tenancy.py): where a key made without a
# team goes, and every key made before there were teams. They carry no limits.
DEFAULT_ORG, DEFAULT_TEAM = "org_default", "team_default"

# A user is stored as it is: usage.user, files.owner, batches.owner, api_keys.user are String(256)
# (store/schema.py). One that does not fit, or holds a character PostgreSQL refuses in text (NUL) or cannot
# encode (a lone surrogate), failed every write naming it: the usage writer retried its batch for ever and
# no tenant's usage was written again, and the principal's file uploads were 500s. So a user is checked where
# it enters (a token's subject, a key's user), never truncated: two long names would become one user.
USER_MAX_CHARS = 256
# C0 and C1 controls (NUL among them, DEL too) and surrogates. Nothing printable is refused: e-mail addresses,
# URLs and non-Latin names are subjects identity providers issue.
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def unstorable(text: str, max_chars: int = USER_MAX_CHARS) -> str | None:
    """Why `text` cannot be stored as a user (or another identifier of that column width), or None."""
    if len(text) > max_chars:
        return f"it is longer than {max_chars} characters"
    if _UNSTORABLE.search(text) is not None:
        return "it contains a control character or an unpaired surrogate"
    return None


def narrow(*grants: tuple[str, ...] | frozenset[str] | None) -> tuple[str, ...] | None:
    """The models every level allows (None: a level that allows every model)."""
    allowed: tuple[str, ...] | None = None
    for grant in grants:
        if grant is not None:
            allowed = tuple(sorted(grant)) if allowed is None else tuple(m for m in allowed if m in grant)
    return allowed


def levels_key(org: str | None, team: str | None, *settings: Any) -> str:
    """A principal's levels and their settings as one string (Principal.levels_key); "" for none."""
    if org is None or org == DEFAULT_ORG:
        return ""
    return orjson.dumps([org, team, *settings], option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    tier: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None  # None: every model
    key_id: str | None = None  # for API keys; None for JWT and anonymous
    via: str = "api_key"  # "api_key" | "jwt" | "anonymous"
    limits: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    org: str | None = None  # its key's organisation and team (identity/tenancy.py); None for JWT and anonymous
    team: str | None = None
    # The limits and budgets of its team and organisation (quota/plan.py), and their names for messages.
    team_limits: dict[str, Any] | None = None
    team_budget: dict[str, Any] | None = None
    org_limits: dict[str, Any] | None = None
    org_budget: dict[str, Any] | None = None
    team_name: str = ""
    org_name: str = ""
    # Its team's and organisation's moderation (ModerationPolicy's shape; safety/moderation.py).
    team_moderation: dict[str, Any] | None = None
    org_moderation: dict[str, Any] | None = None
    # All of the above about its levels, as one string (the quota stage's plans are cached under it: a change to a
    # team's limits makes a new plan even for a request authenticated before the change). "" for no levels.
    levels_key: str = ""
    # A token's team claim, as it came (auth.jwt.team_claim): identity/auth.py places the principal in that team.
    claimed_teams: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Placement:
    """A team and its organisation, as the principals in it take them: a key's team (identity/keys.py), or the team
    a token's claim names (identity/auth.py). Read from the columns keys.LEVEL_COLUMNS selects."""

    team_id: str = DEFAULT_TEAM
    org_id: str = DEFAULT_ORG
    team_name: str = ""
    org_name: str = ""
    team_models: tuple[str, ...] | None = None
    org_models: tuple[str, ...] | None = None
    team_limits: dict[str, Any] | None = None
    team_budget: dict[str, Any] | None = None
    org_limits: dict[str, Any] | None = None
    org_budget: dict[str, Any] | None = None
    team_moderation: dict[str, Any] | None = None
    org_moderation: dict[str, Any] | None = None
    levels: str = ""  # Principal.levels_key, worked out once (a token's principal is placed on every request)

    def __post_init__(self) -> None:
        settings = (
            self.team_limits,
            self.team_budget,
            self.org_limits,
            self.org_budget,
            self.team_name,
            self.org_name,
            self.team_moderation,
            self.org_moderation,
        )
        object.__setattr__(self, "levels", levels_key(self.org_id, self.team_id, *settings))

    @classmethod
    def from_mapping(cls, m: Any, team_id: str) -> Placement:
        team_models, org_models = m.get("team_models"), m.get("org_models")
        return cls(
            team_id=team_id,
            org_id=m.get("org_id") or DEFAULT_ORG,
            team_name=m.get("team_name") or "",
            org_name=m.get("org_name") or "",
            team_models=tuple(team_models) if team_models is not None else None,
            org_models=tuple(org_models) if org_models is not None else None,
            team_limits=m.get("team_limits"),
            team_budget=m.get("team_budget"),
            org_limits=m.get("org_limits"),
            org_budget=m.get("org_budget"),
            team_moderation=m.get("team_moderation"),
            org_moderation=m.get("org_moderation"),
        )

    def apply(self, principal: Principal) -> Principal:
        """`principal` in this team: a model is its to use only if the organisation, the team and the principal
        itself all allow it; the levels' limits and budgets go with it (quota/plan.py)."""
        models = narrow(self.org_models, self.team_models, principal.models)
        return replace(
            principal,
            models=frozenset(models) if models is not None else None,
            org=self.org_id,
            team=self.team_id,
            team_limits=self.team_limits,
            team_budget=self.team_budget,
            org_limits=self.org_limits,
            org_budget=self.org_budget,
            team_name=self.team_name,
            org_name=self.org_name,
            team_moderation=self.team_moderation,
            org_moderation=self.org_moderation,
            levels_key=self.levels,
            claimed_teams=(),
        )
