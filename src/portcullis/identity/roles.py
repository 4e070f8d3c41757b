"""Acting by one's roles: what an organisation admin, a team admin, a member or a viewer may see and do.

The scopes stay what they were: `keys:admin`, `orgs:admin`, `usage:read` and `admin:read` reach everything. The scope
`roles:act` lets a credential do, without them, what its user's roles allow (identity/tenancy.py keeps the roles):

    role          on                    keys                                   members               usage
    org_admin     its organisation      every key of its teams: all            its teams' and its    its teams'
                                                                                organisation's
    team_admin    its team              every key of the team: all             the team's            the team's
    member        its team              its own keys in the team: all          -                     its own keys'
    viewer        its team              the team's keys: read                  -                     the team's

Nobody changes a level's own settings (grants, limits, budgets) by a role: raising one's own limits is for the
holders of `orgs:admin`. A key made by a role gets at most the scopes of an ordinary key (scopes.DEFAULT, and
`roles:act`), and its team's default tier: a role cannot mint more than it has. What a role cannot reach reads as
absent (404), as a key id that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from portcullis.errors import Forbidden
from portcullis.identity import scopes
from portcullis.identity.principal import DEFAULT_ORG, Principal
from portcullis.identity.tenancy import TenancyStore

ADMIN_ROLES = frozenset({"org_admin", "team_admin"})


@dataclass(frozen=True, slots=True)
class Access:
    """A principal's reach by its roles: its organisations (org_admin) and its role in each team it reaches."""

    user: str
    orgs: frozenset[str]
    teams: dict[str, str]  # team id -> "org_admin" (a team of its organisation), "team_admin", "member", "viewer"

    def role(self, team_id: str) -> str | None:
        return self.teams.get(team_id)

    def sees_key(self, team_id: str, owner: str) -> bool:
        role = self.teams.get(team_id)
        return role is not None and (role != "member" or owner == self.user)

    def manages_key(self, team_id: str, owner: str) -> bool:
        role = self.teams.get(team_id)
        return role in ADMIN_ROLES or (role == "member" and owner == self.user)

    def manages_members(self, team_id: str) -> bool:
        return self.teams.get(team_id) in ADMIN_ROLES

    def visible_teams(self) -> Iterable[str]:
        return self.teams.keys()


async def access(tenancy: TenancyStore, principal: Principal, scope: str) -> Access | None:
    """None: the principal holds `scope` and reaches everything. Else what its roles reach (roles:act); 403 when it
    holds neither (a route that allows acting by roles let it through the dispatcher's check)."""
    if scope in principal.scopes:
        return None
    if scopes.ROLES not in principal.scopes:
        raise Forbidden(
            f"Your credentials lack the scope '{scope}' needed for this request.", code="missing_scope", param=scope
        )
    orgs: set[str] = set()
    teams: dict[str, str] = {}
    # A key reaches only within its own organisation, whatever roles its user holds elsewhere (a console session
    # or a token, placed in no organisation, reaches all of its user's).
    within = principal.org if principal.org not in (None, DEFAULT_ORG) else None
    for held in await tenancy.roles_of(principal.user):
        if within is not None and held["org_id"] != within:
            continue
        if held["team_id"] is None:
            orgs.add(held["org_id"])
        else:
            teams[held["team_id"]] = held["role"]
    for org_id in orgs:
        for team in await tenancy.teams(org_id):
            teams[team.id] = "org_admin"  # (above any role it also has in the team)
    return Access(principal.user, frozenset(orgs), teams)
