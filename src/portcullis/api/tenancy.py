"""The admin API of organisations, teams and their members (identity/tenancy.py).

    POST /admin/organizations                      create            orgs:admin
    GET  /admin/organizations[/{org_id}]           list / show       admin:read
    POST /admin/organizations/{org_id}             change (name, models, default_tier)   orgs:admin
    POST /admin/organizations/{org_id}/members     {user, role: org_admin}               orgs:admin
    DELETE /admin/organizations/{org_id}/members/{user}                                  orgs:admin
    POST /admin/teams                              create ({org_id, name, ...})          orgs:admin
    GET  /admin/teams[?org_id=] , /admin/teams/{team_id}                                 admin:read
    POST /admin/teams/{team_id}                    change                                orgs:admin
    GET  /admin/teams/{team_id}/members , POST (set a role) , DELETE .../members/{user}  orgs:admin / admin:read

Changes are made with OpenAI's convention for modifying an object (POST to it), as the key routes do. A change to
what a level grants is announced to every process, which forget their cached keys (the bus event "tenancy").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from portcullis.api.admin import AdminDeps
from portcullis.api.common import actor, query_params, read_model
from portcullis.config import BudgetConfig, LimitsConfig, ModerationPolicy
from portcullis.errors import Forbidden, InvalidRequest, NotFound
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity import roles, scopes
from portcullis.identity.tenancy import Level, TenancyStore


class NewOrganization(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    models: list[str] | None = None  # None: every model
    default_tier: str | None = None
    # The whole level's windows and concurrency, and its budget: shared by every key under it.
    limits: LimitsConfig | None = None
    budget: BudgetConfig | None = None
    # Which moderators check its keys' requests (over their tier's; a model's own setting still wins).
    moderation: ModerationPolicy | None = None


class OrganizationChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=128)
    models: list[str] | None = None  # (sent as null: every model again)
    default_tier: str | None = None
    limits: LimitsConfig | None = None  # (sent as null: no limit of its own)
    budget: BudgetConfig | None = None
    moderation: ModerationPolicy | None = None


class NewTeam(NewOrganization):
    org_id: str = Field(min_length=1, max_length=32)


class Membership(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=256)
    role: str


def _store(api: AdminDeps) -> TenancyStore:
    return TenancyStore(api.engine)


def _tier(api: AdminDeps, tier: str | None) -> str | None:
    if tier is not None and tier not in api.config.tiers:
        raise InvalidRequest(f"Unknown tier '{tier}'.", param="default_tier", code="invalid_value")
    return tier


def _quota(spec: NewOrganization | OrganizationChange) -> dict[str, Any]:
    """The limits and budget as stored: only what was given (as a key's own), None for none."""
    out: dict[str, Any] = {}
    if "limits" in spec.model_fields_set:
        out["limits"] = spec.limits.model_dump(exclude_unset=True) if spec.limits is not None else None
    if "budget" in spec.model_fields_set:
        out["budget"] = spec.budget.model_dump(mode="json", exclude_none=True) if spec.budget is not None else None
    if "moderation" in spec.model_fields_set:
        out["moderation"] = spec.moderation.model_dump(exclude_none=True) if spec.moderation is not None else None
    return out


def _moderators(api: AdminDeps, spec: NewOrganization | OrganizationChange) -> None:
    """A level's moderation names configured moderators only."""
    policy = spec.moderation
    if policy is None:
        return
    known = set(api.config.moderation.moderators)
    for field in ("input", "output"):
        unknown = sorted(set(getattr(policy, field) or ()) - known)
        if unknown:
            raise InvalidRequest(
                f"No moderator {', '.join(map(repr, unknown))} is configured (moderation.moderators).",
                param=f"moderation.{field}",
                code="invalid_value",
            )


def _changes(api: AdminDeps, spec: OrganizationChange) -> dict[str, Any]:
    _moderators(api, spec)
    changes = spec.model_dump(exclude_unset=True) | _quota(spec)
    if "name" in changes and changes["name"] is None:
        raise InvalidRequest("'name' cannot be null.", param="name", code="invalid_value")
    _tier(api, changes.get("default_tier"))
    if not changes:
        raise InvalidRequest(
            "Nothing to change: give name, models, default_tier, limits, budget or moderation.", code="invalid_value"
        )
    return changes


async def _announce(api: AdminDeps, changes: dict[str, Any]) -> None:
    # What its keys may use, or what their refusals call it, changed: every process reads them again.
    if {"models", "limits", "budget", "moderation", "name"} & changes.keys():
        await api.publish({"type": "tenancy"})


async def _org(api: AdminDeps, org_id: str) -> Level:
    org = await _store(api).org(org_id)
    if org is None:
        raise NotFound(f"No organisation '{org_id}'.", code="organization_not_found")
    return org


async def _team(api: AdminDeps, team_id: str) -> Level:
    team = await _store(api).team(team_id)
    if team is None:
        raise NotFound(f"No team '{team_id}'.", code="team_not_found")
    return team


async def _reach(api: AdminDeps, ex: Exchange, scope: str) -> roles.Access | None:
    assert ex.principal is not None
    return await roles.access(_store(api), ex.principal, scope)


def _orgs_reached(access: roles.Access, teams: list[Level]) -> set[str]:
    """The organisations a role reaches: those it administers and those of the teams it has a role in."""
    return set(access.orgs) | {t.org_id for t in teams if t.org_id is not None and access.role(t.id) is not None}


def _list(levels: list[Level]) -> dict[str, Any]:
    return {"object": "list", "data": [level.public() for level in levels]}


# -- organisations ---------------------------------------------------------------------------------------


async def create_org(api: AdminDeps, req: Request, ex: Exchange) -> None:
    spec: NewOrganization = await read_model(api.config, req, NewOrganization)
    _moderators(api, spec)
    org = await _store(api).create_org(
        spec.name,
        models=spec.models,
        default_tier=_tier(api, spec.default_tier),
        actor=actor(api.config, req, ex),
        **_quota(spec),
    )
    await req.respond_json(201, org.public())


async def list_orgs(api: AdminDeps, req: Request, ex: Exchange) -> None:
    access = await _reach(api, ex, scopes.ADMIN_READ)
    orgs = await _store(api).orgs()
    if access is not None:
        reached = _orgs_reached(access, await _store(api).teams())
        orgs = [o for o in orgs if o.id in reached]
    await req.respond_json(200, _list(orgs))


async def show_org(api: AdminDeps, req: Request, ex: Exchange, org_id: str) -> None:
    access = await _reach(api, ex, scopes.ADMIN_READ)
    teams = await _store(api).teams(org_id)
    if access is not None:
        if org_id not in _orgs_reached(access, teams):
            raise NotFound(f"No organisation '{org_id}'.", code="organization_not_found")
        teams = [t for t in teams if access.role(t.id) is not None]
    org = await _org(api, org_id)
    await req.respond_json(200, {**org.public(), "teams": _list(teams)["data"]})


async def change_org(api: AdminDeps, req: Request, ex: Exchange, org_id: str) -> None:
    changes = _changes(api, await read_model(api.config, req, OrganizationChange))
    org = await _store(api).update_org(org_id, changes, actor=actor(api.config, req, ex))
    await _announce(api, changes)
    await req.respond_json(200, org.public())


async def _org_admin(api: AdminDeps, ex: Exchange, scope: str, org_id: str) -> None:
    """The organisation must exist and the principal hold `scope` or administer it (404 otherwise)."""
    access = await _reach(api, ex, scope)
    if access is not None and org_id not in access.orgs:
        raise NotFound(f"No organisation '{org_id}'.", code="organization_not_found")
    await _org(api, org_id)


async def org_members(api: AdminDeps, req: Request, ex: Exchange, org_id: str) -> None:
    await _org_admin(api, ex, scopes.ADMIN_READ, org_id)
    await req.respond_json(200, {"object": "list", "data": await _store(api).members(org_id)})


async def set_org_member(api: AdminDeps, req: Request, ex: Exchange, org_id: str) -> None:
    spec: Membership = await read_model(api.config, req, Membership)
    await _org_admin(api, ex, scopes.ORGS_ADMIN, org_id)
    member = await _store(api).set_member(None, org_id, spec.user, spec.role, actor=actor(api.config, req, ex))
    await req.respond_json(200, member)


async def remove_org_member(api: AdminDeps, req: Request, ex: Exchange, org_id: str, user: str) -> None:
    await _org_admin(api, ex, scopes.ORGS_ADMIN, org_id)
    if not await _store(api).remove_member(org_id, "", user, actor=actor(api.config, req, ex)):
        raise NotFound(f"'{user}' has no role in the organisation.", code="member_not_found")
    await req.respond_json(200, {"object": "member", "org_id": org_id, "user": user, "deleted": True})


# -- teams -------------------------------------------------------------------------------------------------


async def create_team(api: AdminDeps, req: Request, ex: Exchange) -> None:
    spec: NewTeam = await read_model(api.config, req, NewTeam)
    await _org_admin(api, ex, scopes.ORGS_ADMIN, spec.org_id)
    _moderators(api, spec)
    settings = {"default_tier", "limits", "budget", "models", "moderation"} & spec.model_fields_set
    if settings and scopes.ORGS_ADMIN not in (ex.principal.scopes if ex.principal else ()):
        # A team's settings are its organisation's to give: by a role, a new team takes the organisation's.
        raise Forbidden(
            f"A team made by a role takes its organisation's settings: {', '.join(sorted(settings))} need orgs:admin.",
            code="role_forbids",
        )
    team = await _store(api).create_team(
        spec.org_id,
        spec.name,
        models=spec.models,
        default_tier=_tier(api, spec.default_tier),
        actor=actor(api.config, req, ex),
        **_quota(spec),
    )
    await req.respond_json(201, team.public())


async def list_teams(api: AdminDeps, req: Request, ex: Exchange) -> None:
    access = await _reach(api, ex, scopes.ADMIN_READ)
    teams = await _store(api).teams(query_params(req).get("org_id"))
    if access is not None:
        teams = [t for t in teams if access.role(t.id) is not None]
    await req.respond_json(200, _list(teams))


async def _reached_team(api: AdminDeps, ex: Exchange, scope: str, team_id: str, *, manage: bool) -> Level:
    """The team, if the principal holds `scope` or its roles reach it (to see it, or to manage its members)."""
    access = await _reach(api, ex, scope)
    if access is not None and access.role(team_id) is None:
        raise NotFound(f"No team '{team_id}'.", code="team_not_found")
    if manage and access is not None and not access.manages_members(team_id):
        raise Forbidden("Your role in the team lets you see its members, not change them.", code="role_forbids")
    return await _team(api, team_id)


async def show_team(api: AdminDeps, req: Request, ex: Exchange, team_id: str) -> None:
    team = await _reached_team(api, ex, scopes.ADMIN_READ, team_id, manage=False)
    await req.respond_json(200, team.public())


async def change_team(api: AdminDeps, req: Request, ex: Exchange, team_id: str) -> None:
    changes = _changes(api, await read_model(api.config, req, OrganizationChange))
    team = await _store(api).update_team(team_id, changes, actor=actor(api.config, req, ex))
    await _announce(api, changes)
    await req.respond_json(200, team.public())


async def team_members(api: AdminDeps, req: Request, ex: Exchange, team_id: str) -> None:
    team = await _reached_team(api, ex, scopes.ADMIN_READ, team_id, manage=False)
    assert team.org_id is not None
    await req.respond_json(200, {"object": "list", "data": await _store(api).members(team.org_id, team_id)})


async def set_team_member(api: AdminDeps, req: Request, ex: Exchange, team_id: str) -> None:
    spec: Membership = await read_model(api.config, req, Membership)
    team = await _reached_team(api, ex, scopes.ORGS_ADMIN, team_id, manage=True)
    assert team.org_id is not None
    member = await _store(api).set_member(team, team.org_id, spec.user, spec.role, actor=actor(api.config, req, ex))
    await req.respond_json(200, member)


async def remove_team_member(api: AdminDeps, req: Request, ex: Exchange, team_id: str, user: str) -> None:
    team = await _reached_team(api, ex, scopes.ORGS_ADMIN, team_id, manage=True)
    assert team.org_id is not None
    if not await _store(api).remove_member(team.org_id, team_id, user, actor=actor(api.config, req, ex)):
        raise NotFound(f"'{user}' is not a member of the team.", code="member_not_found")
    await req.respond_json(200, {"object": "member", "team_id": team_id, "user": user, "deleted": True})
