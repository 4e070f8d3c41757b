"""Organisation → team → user → key: the levels a key belongs to, what each grants, and who has which role.

Every key belongs to a team, every team to an organisation. Migration 0009 made a default organisation with a
default team and put every existing key in it; a key made without a team goes there too. A level's `models`
(None: every model) narrows what the levels below it may use: a key may use a model only if its organisation,
its team and the key itself all allow it (KeyRecord.principal). A level's `default_tier` is the tier of a key made in it
without one (the team's, else the organisation's).

Roles (a membership row): `org_admin` of an organisation; `team_admin`, `member` or `viewer` of a team.

Every change writes its audit entry (store/audit.py) in its own transaction. A change to what a level grants is
announced to every process (`{"type": "tenancy"}`), which drops its cached keys: the next request of each key
reads the levels again.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from portcullis.errors import Conflict, InvalidRequest, NotFound
from portcullis.identity.keys import LEVEL_COLUMNS, aware, now
from portcullis.identity.principal import DEFAULT_ORG, Placement, unstorable
from portcullis.store import audit
from portcullis.store.schema import memberships, organizations, teams

ORG_ROLES = ("org_admin",)
TEAM_ROLES = ("team_admin", "member", "viewer")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,127}\Z")


@dataclass(frozen=True, slots=True)
class Level:
    """An organisation or a team."""

    kind: str  # "organization" | "team"
    id: str
    name: str
    models: tuple[str, ...] | None
    default_tier: str | None
    created_at: datetime
    updated_at: datetime
    org_id: str | None = None  # a team's organisation
    limits: dict[str, Any] | None = None  # LimitsConfig's shape: the whole level's windows and concurrency
    budget: dict[str, Any] | None = None  # BudgetConfig's shape
    moderation: dict[str, Any] | None = None  # ModerationPolicy's shape

    @classmethod
    def from_row(cls, kind: str, row: Any) -> Level:
        m = row._mapping
        return cls(
            kind=kind,
            id=m["id"],
            name=m["name"],
            models=tuple(m["models"]) if m["models"] is not None else None,
            default_tier=m["default_tier"],
            created_at=aware(m["created_at"]),
            updated_at=aware(m["updated_at"]),
            org_id=m.get("org_id"),
            limits=m.get("limits"),
            budget=m.get("budget"),
            moderation=m.get("moderation"),
        )

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": self.kind,
            "name": self.name,
            "models": list(self.models) if self.models is not None else None,
            "default_tier": self.default_tier,
            "limits": self.limits,
            "budget": self.budget,
            "moderation": self.moderation,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }
        if self.kind == "team":
            out["org_id"] = self.org_id
        return out


def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequest(
            "A name is 1 to 128 letters, digits, spaces, dots, dashes or underscores, starting with a letter or digit.",
            param="name",
            code="invalid_value",
        )
    return name


class TenancyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- organisations --------------------------------------------------------------------------------

    async def create_org(
        self,
        name: str,
        *,
        models: list[str] | None,
        default_tier: str | None,
        actor: audit.Actor,
        limits: dict[str, Any] | None = None,
        budget: dict[str, Any] | None = None,
        moderation: dict[str, Any] | None = None,
    ) -> Level:
        org = _new("organization", name, models, default_tier, limits, budget, moderation=moderation)
        return await self._create(organizations, org, actor, f"An organisation named '{name}' exists.")

    async def _create(self, table: Any, level: Level, actor: audit.Actor, taken: str) -> Level:
        """Write a new level and its audit entry (a team: once its organisation is found)."""
        try:
            async with self.engine.begin() as conn:
                values = _level_row(level)
                if level.org_id is not None:
                    where = organizations.c.id == level.org_id
                    if (await conn.execute(select(organizations.c.id).where(where))).first() is None:
                        raise NotFound(
                            f"No organisation '{level.org_id}'.", param="org_id", code="organization_not_found"
                        )
                    values["org_id"] = level.org_id
                await conn.execute(insert(table).values(**values))
                await audit.record(conn, audit.Change(actor, f"{level.kind}.create", level.id, None, level.public()))
        except IntegrityError:
            raise Conflict(taken, param="name", code="name_taken") from None
        return level

    async def org(self, org_id: str) -> Level | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(organizations).where(organizations.c.id == org_id))).first()
        return Level.from_row("organization", row) if row is not None else None

    async def orgs(self) -> list[Level]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(organizations).order_by(organizations.c.created_at))).all()
        return [Level.from_row("organization", r) for r in rows]

    async def update_org(self, org_id: str, changes: dict[str, Any], *, actor: audit.Actor) -> Level:
        return await self._update("organization", organizations, org_id, changes, actor)

    # -- teams --------------------------------------------------------------------------------------

    async def create_team(
        self,
        org_id: str,
        name: str,
        *,
        models: list[str] | None,
        default_tier: str | None,
        actor: audit.Actor,
        limits: dict[str, Any] | None = None,
        budget: dict[str, Any] | None = None,
        moderation: dict[str, Any] | None = None,
    ) -> Level:
        if (limits or budget or moderation) and org_id == DEFAULT_ORG:
            raise InvalidRequest(_DEFAULT_FREE, param="limits" if limits else "budget", code="invalid_value")
        team = _new("team", name, models, default_tier, limits, budget, org_id, moderation)
        return await self._create(teams, team, actor, f"The organisation has a team named '{name}'.")

    async def team(self, team_id: str) -> Level | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(teams).where(teams.c.id == team_id))).first()
        return Level.from_row("team", row) if row is not None else None

    async def teams(self, org_id: str | None = None) -> list[Level]:
        query = select(teams).order_by(teams.c.created_at)
        if org_id is not None:
            query = query.where(teams.c.org_id == org_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Level.from_row("team", r) for r in rows]

    async def update_team(self, team_id: str, changes: dict[str, Any], *, actor: audit.Actor) -> Level:
        return await self._update("team", teams, team_id, changes, actor)

    async def _update(self, kind: str, table: Any, level_id: str, changes: dict[str, Any], actor: audit.Actor) -> Level:
        values = dict(changes)
        if "name" in values:
            _checked_name(values["name"])
        if values.get("limits") or values.get("budget") or values.get("moderation"):
            org_id = level_id if kind == "organization" else await self._org_of(level_id)
            if org_id == DEFAULT_ORG:
                raise InvalidRequest(_DEFAULT_FREE, param="limits" if values.get("limits") else "budget")
        values["updated_at"] = now()
        try:
            async with self.engine.begin() as conn:
                row = (await conn.execute(select(table).where(table.c.id == level_id).with_for_update())).first()
                if row is None:
                    raise NotFound(f"No {kind} '{level_id}'.", code=f"{kind}_not_found")
                before = Level.from_row(kind, row)
                await conn.execute(update(table).where(table.c.id == level_id).values(**values))
                row = (await conn.execute(select(table).where(table.c.id == level_id))).first()
                after = Level.from_row(kind, row)
                await audit.record(
                    conn, audit.Change(actor, f"{kind}.update", level_id, before.public(), after.public())
                )
        except IntegrityError:
            raise Conflict(f"The name '{values.get('name')}' is taken.", param="name", code="name_taken") from None
        return after

    async def _org_of(self, team_id: str) -> str | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(teams.c.org_id).where(teams.c.id == team_id))).scalar()

    async def placement(self, ref: str) -> Placement | None:
        """The team a reference names: its id (team_...), or "<organisation name>/<team name>"; None: no such team."""
        query = select(teams.c.id, *LEVEL_COLUMNS).select_from(
            teams.join(organizations, organizations.c.id == teams.c.org_id)
        )
        if ref.startswith("team_"):
            query = query.where(teams.c.id == ref)
        elif "/" in ref:
            org_name, team_name = ref.split("/", 1)
            query = query.where(organizations.c.name == org_name, teams.c.name == team_name)
        else:
            return None
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return Placement.from_mapping(row._mapping, row.id) if row is not None else None

    # -- members ------------------------------------------------------------------------------------

    async def set_member(
        self, team: Level | None, org_id: str, user: str, role: str, *, actor: audit.Actor, source: str = "admin"
    ) -> dict[str, Any]:
        """`user` gets `role` in the team (or, team None, in the organisation); replaces the role it had there.
        `source`: "sso" when the identity provider's claim gave it (api/console.py)."""
        problem = unstorable(user)
        if problem is not None or not user:
            raise InvalidRequest(f"The user cannot be stored: {problem or 'it is empty'}.", param="user")
        allowed = TEAM_ROLES if team is not None else ORG_ROLES
        if role not in allowed:
            raise InvalidRequest(f"'role' must be one of {', '.join(allowed)}.", param="role", code="invalid_value")
        team_id = team.id if team is not None else ""
        target = f"{team_id or org_id}:{user}"
        where = (memberships.c.org_id == org_id, memberships.c.team_id == team_id, memberships.c.user == user)
        async with self.engine.begin() as conn:
            had = (await conn.execute(select(memberships.c.role).where(*where))).scalar()
            if had == role:
                await conn.execute(update(memberships).where(*where).values(source=source))
                return _member(org_id, team_id, user, role)
            if had is None:
                row = {"org_id": org_id, "team_id": team_id, "user": user, "role": role, "source": source}
                await conn.execute(insert(memberships).values(**row, created_at=now()))
            else:
                await conn.execute(update(memberships).where(*where).values(role=role, source=source))
            before = _member(org_id, team_id, user, had) if had is not None else None
            after = _member(org_id, team_id, user, role)
            await audit.record(conn, audit.Change(actor, "member.set", target, before, after))
        return after

    async def remove_member(self, org_id: str, team_id: str, user: str, *, actor: audit.Actor) -> bool:
        where = (memberships.c.org_id == org_id, memberships.c.team_id == team_id, memberships.c.user == user)
        async with self.engine.begin() as conn:
            had = (await conn.execute(select(memberships.c.role).where(*where))).scalar()
            if had is None:
                return False
            await conn.execute(delete(memberships).where(*where))
            before = _member(org_id, team_id, user, had)
            await audit.record(conn, audit.Change(actor, "member.remove", f"{team_id or org_id}:{user}", before, None))
        return True

    async def drop_sso_roles(self, user: str, keep: tuple[str, str], *, actor: audit.Actor) -> None:
        """The roles the identity provider gave `user` earlier, but `keep` (org id, team id): it took them back."""
        async with self.engine.connect() as conn:
            query = select(memberships).where(memberships.c.user == user, memberships.c.source == "sso")
            stale = [(r.org_id, r.team_id) for r in (await conn.execute(query)).all() if (r.org_id, r.team_id) != keep]
        for org_id, team_id in stale:
            await self.remove_member(org_id, team_id, user, actor=actor)

    async def members(self, org_id: str, team_id: str | None = None) -> list[dict[str, Any]]:
        query = select(memberships).where(memberships.c.org_id == org_id).order_by(memberships.c.created_at)
        if team_id is not None:
            query = query.where(memberships.c.team_id == team_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_member(r.org_id, r.team_id, r.user, r.role) for r in rows]

    async def roles_of(self, user: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(memberships).where(memberships.c.user == user))).all()
        return [_member(r.org_id, r.team_id, r.user, r.role) for r in rows]


def _member(org_id: str, team_id: str, user: str, role: str) -> dict[str, Any]:
    return {"object": "member", "org_id": org_id, "team_id": team_id or None, "user": user, "role": role}


_DEFAULT_FREE = (
    "The default organisation and its teams carry no limits, budgets or moderation of their own (they hold the keys "
    "made before there were organisations): create an organisation for the keys to limit."
)


def _new(
    kind: str,
    name: str,
    models: list[str] | None,
    default_tier: str | None,
    limits: dict[str, Any] | None,
    budget: dict[str, Any] | None,
    org_id: str | None = None,
    moderation: dict[str, Any] | None = None,
) -> Level:
    at = now()
    prefix = "org_" if kind == "organization" else "team_"
    grant = tuple(models) if models is not None else None
    level_id = prefix + secrets.token_hex(8)
    return Level(kind, level_id, _checked_name(name), grant, default_tier, at, at, org_id, limits, budget, moderation)


def _level_row(level: Level) -> dict[str, Any]:
    return {
        "limits": level.limits,
        "budget": level.budget,
        "moderation": level.moderation,
        "id": level.id,
        "name": level.name,
        "models": list(level.models) if level.models is not None else None,
        "default_tier": level.default_tier,
        "created_at": level.created_at,
        "updated_at": level.updated_at,
    }
