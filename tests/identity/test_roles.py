"""Acting by roles (identity/roles.py) through the admin API: an organisation admin, a team admin, a member and a
viewer, each with a key holding the ordinary scopes and roles:act: what each may see and change, and that none can
see another team's keys, reach another organisation, or mint a key with more than it has."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from procs import Proc, create_key, gateway_config, http_get, http_post, openai_client, start_gateway, wait_until

from portcullis.identity import scopes

ROLE_SCOPES = [*scopes.DEFAULT, scopes.ROLES]


@pytest.fixture(scope="module")
def world(sim: Proc, module_tmp: Path) -> Iterator[dict[str, Any]]:
    gw = start_gateway(gateway_config({"tiny": [sim.url]}), module_tmp, ready_path="/readyz")

    def made(path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
        got, raw = http_post(gw.url + path, body)
        assert got == status, raw
        return orjson.loads(raw)

    acme = made("/admin/organizations", {"name": "acme", "default_tier": "free"})
    globex = made("/admin/organizations", {"name": "globex", "default_tier": "free"})
    search = made("/admin/teams", {"org_id": acme["id"], "name": "search"})
    ads = made("/admin/teams", {"org_id": acme["id"], "name": "ads"})
    labs = made("/admin/teams", {"org_id": globex["id"], "name": "labs"})
    made(f"/admin/organizations/{acme['id']}/members", {"user": "olga", "role": "org_admin"}, 200)
    for user, role in (("tom", "team_admin"), ("mia", "member"), ("max", "member"), ("vic", "viewer")):
        made(f"/admin/teams/{search['id']}/members", {"user": user, "role": role}, 200)
    made(f"/admin/teams/{labs['id']}/members", {"user": "otto", "role": "member"}, 200)
    keys = {
        user: create_key(gw, user=user, tier="free", team_id=team["id"], scopes=ROLE_SCOPES)
        for user, team in (("olga", search), ("tom", search), ("mia", search), ("vic", search), ("otto", labs))
    }
    keys["max"] = create_key(gw, user="max", tier="free", team_id=search["id"])
    keys["ads"] = create_key(gw, user="ada", tier="free", team_id=ads["id"])
    keys["labs"] = create_key(gw, user="lin", tier="free", team_id=labs["id"])
    yield {"gw": gw, "keys": keys, "acme": acme, "globex": globex, "search": search, "ads": ads, "labs": labs}
    gw.stop()


def call(world: dict[str, Any], who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {world['keys'][who]['key']}"}
    if method == "GET":
        status, raw = http_get(world["gw"].url + path, headers=headers)
    elif method == "POST":
        status, raw = http_post(world["gw"].url + path, body or {}, headers=headers)
    else:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(world["gw"].url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
    return status, orjson.loads(raw) if raw else None


def ids(answer: Any) -> set[str]:
    return {item["id"] for item in answer["data"]}


def test_a_member_manages_only_their_own_keys(world: dict[str, Any]) -> None:
    search, keys = world["search"], world["keys"]
    status, own = call(world, "mia", "POST", "/admin/keys", {"user": "mia", "team_id": search["id"]})
    assert status == 201 and own["tier"] == "free" and own["team_id"] == search["id"]
    assert openai_client(world["gw"], own["key"]).models.list().data  # a working key
    refusals = [
        ({"user": "max", "team_id": search["id"]}, 403),  # for someone else
        ({"user": "mia", "team_id": world["ads"]["id"]}, 400),  # in a team the member is not in
        ({"user": "mia", "team_id": search["id"], "scopes": ["keys:admin"]}, 403),  # more than an ordinary key
        ({"user": "mia", "team_id": search["id"], "tier": "enterprise"}, 403),  # a better tier
        ({"user": "mia"}, 400),  # no team
    ]
    # And no loosening of the tier's limits by a key's own (tightening is fine).
    loose = {"requests": {"minute": 10**9}, "concurrency": 10**5}
    refusals.append(({"user": "mia", "team_id": search["id"], "limits": loose}, 403))
    for body, want in refusals:
        status, answer = call(world, "mia", "POST", "/admin/keys", body)
        assert status == want, (body, answer)
    tight = {"user": "mia", "team_id": search["id"], "limits": {"requests": {"minute": 5}}}
    status, tightened = call(world, "mia", "POST", "/admin/keys", tight)
    assert status == 201
    status, listed = call(world, "mia", "GET", "/admin/keys")
    assert status == 200 and ids(listed) == {keys["mia"]["id"], own["id"], tightened["id"]}
    for method, path in (("GET", ""), ("POST", "/revoke")):
        status, answer = call(world, "mia", method, f"/admin/keys/{keys['max']['id']}{path}")
        assert status == 404 and answer["error"]["code"] == "key_not_found"
    assert call(world, "mia", "POST", f"/admin/keys/{own['id']}/rotate", {"grace_s": 0})[0] == 201
    assert call(world, "mia", "POST", f"/admin/keys/{own['id']}/revoke")[0] == 200
    # The usage it sees is its own keys': another member's requests are in the table, not in its report.
    for who in ("max", "mia"):
        openai_client(world["gw"], keys[who]["key"]).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

    def recorded() -> bool:
        rows = orjson.loads(http_get(world["gw"].url + "/admin/usage?group_by=key")[1])["data"]
        return {keys["max"]["id"], keys["mia"]["id"]} <= {row["key"] for row in rows}

    wait_until(recorded, what="both members' usage records")
    status, used = call(world, "mia", "GET", "/admin/usage?group_by=key")
    seen = {row["key"] for row in used["data"]}
    assert status == 200 and keys["mia"]["id"] in seen and keys["max"]["id"] not in seen
    assert seen <= ids(call(world, "mia", "GET", "/admin/keys")[1])  # her keys only (all of them: revoked too)
    # Its team's members it may see, not change; the other organisation not at all.
    assert call(world, "mia", "GET", f"/admin/teams/{search['id']}/members")[0] == 200
    assert call(world, "mia", "POST", f"/admin/teams/{search['id']}/members", {"user": "x", "role": "member"})[0] == 403
    status, answer = call(world, "mia", "GET", f"/admin/teams/{world['labs']['id']}")
    assert status == 404 and answer["error"]["code"] == "team_not_found"


def test_a_viewer_sees_the_teams_keys_and_changes_nothing(world: dict[str, Any]) -> None:
    keys, search = world["keys"], world["search"]
    status, listed = call(world, "vic", "GET", "/admin/keys")
    assert status == 200 and keys["max"]["id"] in ids(listed) and keys["tom"]["id"] in ids(listed)
    assert keys["ads"]["id"] not in ids(listed) and keys["labs"]["id"] not in ids(listed)
    assert call(world, "vic", "POST", f"/admin/keys/{keys['max']['id']}/revoke")[0] == 403
    assert call(world, "vic", "POST", "/admin/keys", {"user": "vic", "team_id": search["id"]})[0] == 403


def test_a_team_admin_manages_the_teams_keys_and_members(world: dict[str, Any]) -> None:
    keys, search, ads = world["keys"], world["search"], world["ads"]
    status, made = call(world, "tom", "POST", "/admin/keys", {"user": "max", "team_id": search["id"]})
    assert status == 201 and made["user"] == "max"
    assert call(world, "tom", "POST", f"/admin/keys/{made['id']}/revoke")[0] == 200
    assert (
        call(world, "tom", "POST", f"/admin/teams/{search['id']}/members", {"user": "nia", "role": "viewer"})[0] == 200
    )
    assert call(world, "tom", "POST", f"/admin/teams/{ads['id']}/members", {"user": "nia", "role": "viewer"})[0] == 404
    assert call(world, "tom", "POST", "/admin/teams", {"org_id": world["acme"]["id"], "name": "new"})[0] == 404
    assert call(world, "tom", "GET", f"/admin/keys/{keys['ads']['id']}")[0] == 404
    # Keys for users with no role in the team, or acting by roles for someone else, are not a team admin's to make:
    # such a key would wield that user's roles (in another organisation, say) and budget.
    for body in (
        {"user": "gina", "team_id": search["id"]},
        {"user": "max", "team_id": search["id"], "scopes": [*scopes.DEFAULT, scopes.ROLES]},
    ):
        status, answer = call(world, "tom", "POST", "/admin/keys", body)
        assert status == 403 and answer["error"]["code"] == "role_forbids", body
    # An operator's key in the team (more scopes than a role may give) is not the role's to rotate or revoke.
    ci = create_key(world["gw"], user="max", tier="free", team_id=search["id"], scopes=["keys:admin", "admin:read"])
    for action in ("rotate", "revoke"):
        status, answer = call(world, "tom", "POST", f"/admin/keys/{ci['id']}/{action}")
        assert status == 403 and answer["error"]["code"] == "role_forbids"
    # A team's own settings are for orgs:admin: no role raises its own limits.
    status, refused = call(world, "tom", "POST", f"/admin/teams/{search['id']}", {"limits": {"concurrency": 99}})
    assert status == 403 and refused["error"]["code"] == "missing_scope"


def test_an_organisation_admin_reaches_its_teams_and_no_other_organisation(world: dict[str, Any]) -> None:
    keys, acme, globex = world["keys"], world["acme"], world["globex"]
    status, listed = call(world, "olga", "GET", "/admin/keys")
    assert status == 200 and {keys["ads"]["id"], keys["max"]["id"]} <= ids(listed)
    assert keys["labs"]["id"] not in ids(listed)
    assert ids(call(world, "olga", "GET", "/admin/organizations")[1]) == {acme["id"]}
    status, team = call(world, "olga", "POST", "/admin/teams", {"org_id": acme["id"], "name": "growth"})
    assert status == 201
    # A team made by a role takes its organisation's settings: no better tier or looser limits for its keys.
    vip = {"org_id": acme["id"], "name": "vip", "default_tier": "enterprise", "limits": {"concurrency": 1000}}
    status, answer = call(world, "olga", "POST", "/admin/teams", vip)
    assert status == 403 and answer["error"]["code"] == "role_forbids"
    assert call(world, "olga", "POST", "/admin/teams", {"org_id": globex["id"], "name": "growth"})[0] == 404
    assert call(world, "olga", "GET", f"/admin/organizations/{globex['id']}")[0] == 404
    assert call(world, "olga", "POST", f"/admin/keys/{keys['ads']['id']}/rotate")[0] == 201
    status, audit = http_get(world["gw"].url + f"/admin/audit?target={team['id']}")
    entry = orjson.loads(audit)["data"][0]
    assert entry["action"] == "team.create" and entry["actor"]["user"] == "olga"


def test_another_organisations_member_sees_only_its_own(world: dict[str, Any]) -> None:
    assert ids(call(world, "otto", "GET", "/admin/organizations")[1]) == {world["globex"]["id"]}
    assert ids(call(world, "otto", "GET", "/admin/teams")[1]) == {world["labs"]["id"]}
    assert call(world, "otto", "GET", f"/admin/organizations/{world['acme']['id']}/members")[0] == 404


def test_a_key_reaches_only_within_its_own_organisation(world: dict[str, Any]) -> None:
    """otto has roles in two organisations; his key in globex acts by globex's roles only."""
    gw, acme = world["gw"], world["acme"]
    status, _ = http_post(gw.url + f"/admin/organizations/{acme['id']}/members", {"user": "otto", "role": "org_admin"})
    assert status == 200
    status, listed = call(world, "otto", "GET", "/admin/keys")
    assert status == 200 and world["keys"]["ads"]["id"] not in ids(listed)
    assert ids(call(world, "otto", "GET", "/admin/organizations")[1]) == {world["globex"]["id"]}


def test_without_roles_act_a_key_has_only_its_scopes(world: dict[str, Any]) -> None:
    status, answer = call(world, "max", "GET", "/admin/keys")  # max's key has the ordinary scopes only
    assert status == 403 and answer["error"]["code"] == "missing_scope"
    status, answer = call(world, "mia", "GET", "/admin/audit")  # and roles:act opens no route outside the roles'
    assert status == 403 and answer["error"]["code"] == "missing_scope"
