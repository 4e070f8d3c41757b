"""Organisations, teams and members, on SQLite and PostgreSQL: the admin API, the model grants narrowing from the
organisation down to the key (applied at once on every process), default tiers, the audit entries, and migration
0009 carrying existing keys into the default organisation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import sqlalchemy as sa
from alembic import command
from procs import ADMIN_KEY, Proc, create_key, gateway_config, http_get, http_post, openai_client, start_gateway

from portcullis.store import db

MSG = [{"role": "user", "content": "hi"}]
ADMIN_ID = ADMIN_KEY.split("-")[1]


@pytest.fixture(scope="module")
def gw(sim: Proc, database_url: str, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config({"tiny": [sim.url], "other": [sim.url]}, store={"database_url": database_url})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def post(gw: Proc, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, raw = http_post(gw.url + path, body)
    return status, orjson.loads(raw)


def get(gw: Proc, path: str) -> Any:
    status, raw = http_get(gw.url + path)
    assert status == 200, raw
    return orjson.loads(raw)


def delete(gw: Proc, path: str) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(gw.url + path, method="DELETE", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def usable(gw: Proc, key: str, model: str) -> bool:
    try:
        openai_client(gw, key).chat.completions.create(model=model, messages=MSG, max_tokens=2)
        return True
    except openai.PermissionDeniedError:
        return False


def test_every_key_is_in_the_default_organisation(gw: Proc) -> None:
    admin = get(gw, f"/admin/keys/{ADMIN_ID}")
    assert (admin["team_id"], admin["org_id"]) == ("team_default", "org_default")
    assert "default" in [o["name"] for o in get(gw, "/admin/organizations")["data"]]
    shown = get(gw, "/admin/organizations/org_default")
    assert shown["models"] is None and [t["id"] for t in shown["teams"]] == ["team_default"]


def test_grants_narrow_from_the_organisation_to_the_key(gw: Proc) -> None:
    status, org = post(
        gw, "/admin/organizations", {"name": "acme", "models": ["tiny", "other"], "default_tier": "free"}
    )
    assert status == 201 and org["id"].startswith("org_")
    status, team = post(gw, "/admin/teams", {"org_id": org["id"], "name": "search", "models": ["tiny"]})
    assert status == 201 and team["org_id"] == org["id"]
    made = create_key(gw, user="ada", team_id=team["id"], tier=None)
    assert (made["team_id"], made["org_id"], made["tier"]) == (team["id"], org["id"], "free")  # the org's default tier
    key = made["key"]
    assert usable(gw, key, "tiny") and not usable(gw, key, "other")
    assert [m.id for m in openai_client(gw, key).models.list()] == ["tiny"]
    # The team's grant widens: at once (every process drops its cached keys).
    status, _ = post(gw, f"/admin/teams/{team['id']}", {"models": ["tiny", "other"]})
    assert status == 200 and usable(gw, key, "other")
    # The organisation narrows it again; the key's own list narrows too.
    status, changed = post(gw, f"/admin/organizations/{org['id']}", {"models": ["other"]})
    assert status == 200 and changed["models"] == ["other"]
    assert usable(gw, key, "other") and not usable(gw, key, "tiny")
    own = create_key(gw, user="ada", team_id=team["id"], tier="free", models=["tiny"])["key"]
    assert not usable(gw, own, "tiny") and not usable(gw, own, "other")
    status, _ = post(gw, f"/admin/organizations/{org['id']}", {"models": None})  # every model again
    assert status == 200 and usable(gw, own, "tiny") and not usable(gw, own, "other")
    assert made["id"] in [k["id"] for k in get(gw, f"/admin/keys?team_id={team['id']}")["data"]]
    entries = get(gw, f"/admin/audit?target={team['id']}")["data"]
    assert [e["action"] for e in entries] == ["team.update", "team.create"]
    assert entries[0]["before"]["models"] == ["tiny"] and entries[0]["after"]["models"] == ["tiny", "other"]


def test_refusals(gw: Proc) -> None:
    status, org = post(gw, "/admin/organizations", {"name": "globex"})
    assert status == 201
    cases = [
        ("/admin/organizations", {"name": "globex"}, 409, "name_taken"),
        ("/admin/organizations", {"name": "bad/name"}, 400, "invalid_value"),
        ("/admin/organizations", {"name": "x", "default_tier": "gold-plated"}, 400, "invalid_value"),
        ("/admin/organizations", {"name": "x", "limits": {"requests": {"fortnight": 3}}}, 400, None),
        ("/admin/teams/team_default", {"budget": {"day": 1}}, 400, None),  # the default levels carry no limits
        ("/admin/organizations/org_default", {"limits": {"concurrency": 2}}, 400, None),
        ("/admin/teams", {"org_id": "org_default", "name": "capped", "limits": {"concurrency": 2}}, 400, None),
        ("/admin/teams", {"org_id": "org_nope", "name": "t"}, 404, "organization_not_found"),
        ("/admin/organizations/org_nope", {"name": "y"}, 404, "organization_not_found"),
        (f"/admin/organizations/{org['id']}", {}, 400, "invalid_value"),
        (f"/admin/organizations/{org['id']}", {"name": None}, 400, "invalid_value"),
        ("/admin/keys", {"user": "u", "team_id": "team_nope", "tier": "free"}, 400, "invalid_value"),
        ("/admin/keys", {"user": "u"}, 400, "invalid_value"),  # no tier, and no default in the default levels
    ]
    status, _ = post(gw, "/admin/teams", {"org_id": org["id"], "name": "ops"})
    assert status == 201
    cases.append(("/admin/teams", {"org_id": org["id"], "name": "ops"}, 409, "name_taken"))
    for path, body, want, code in cases:
        status, answer = post(gw, path, body)
        assert status == want, (path, body, answer)
        if code is not None:
            assert answer["error"]["code"] == code, (path, body, answer)
    assert http_get(gw.url + "/admin/teams/team_nope")[0] == 404
    user_key = create_key(gw, user="bob", tier="free")["key"]
    status, _ = http_post(
        gw.url + "/admin/organizations", {"name": "z"}, headers={"authorization": f"Bearer {user_key}"}
    )
    assert status == 403


def test_members_and_roles(gw: Proc) -> None:
    _, org = post(gw, "/admin/organizations", {"name": "initech"})
    _, team = post(gw, "/admin/teams", {"org_id": org["id"], "name": "tps"})
    status, member = post(gw, f"/admin/teams/{team['id']}/members", {"user": "peter@initech.example", "role": "member"})
    assert status == 200 and member == {
        "object": "member",
        "org_id": org["id"],
        "team_id": team["id"],
        "user": "peter@initech.example",
        "role": "member",
    }
    status, _ = post(gw, f"/admin/teams/{team['id']}/members", {"user": "peter@initech.example", "role": "team_admin"})
    assert status == 200
    status, _ = post(gw, f"/admin/organizations/{org['id']}/members", {"user": "bill", "role": "org_admin"})
    assert status == 200
    for path, body in (
        (f"/admin/teams/{team['id']}/members", {"user": "x", "role": "org_admin"}),
        (f"/admin/organizations/{org['id']}/members", {"user": "x", "role": "member"}),
        (f"/admin/teams/{team['id']}/members", {"user": "x", "role": "overlord"}),
    ):
        status, answer = post(gw, path, body)
        assert status == 400 and answer["error"]["param"] == "role"
    assert [(m["user"], m["role"]) for m in get(gw, f"/admin/teams/{team['id']}/members")["data"]] == [
        ("peter@initech.example", "team_admin")
    ]
    everyone = get(gw, f"/admin/organizations/{org['id']}/members")["data"]
    assert {(m["user"], m["role"], m["team_id"]) for m in everyone} == {
        ("peter@initech.example", "team_admin", team["id"]),
        ("bill", "org_admin", None),
    }
    assert delete(gw, f"/admin/teams/{team['id']}/members/peter%40initech.example") == 200
    assert delete(gw, f"/admin/teams/{team['id']}/members/peter%40initech.example") == 404
    assert delete(gw, f"/admin/organizations/{org['id']}/members/bill") == 200
    actions = [e["action"] for e in get(gw, "/admin/audit?action=member&limit=10")["data"]]
    assert actions[:5] == ["member.remove", "member.remove", "member.set", "member.set", "member.set"]


async def _migrate(url: str) -> tuple[str, str]:
    """A key written at revision 0008, then the upgrade: it is in the default team of the default organisation."""
    engine = db.make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(db._alembic(c), "0008"))
            await conn.execute(
                sa.text(
                    'INSERT INTO api_keys (id, key_hash, "user", tier, scopes, created_at) '
                    "VALUES ('00000000000000aa', 'h', 'old', 'free', '[]', :at)"
                ),
                {"at": datetime.now(UTC)},
            )
        await db.upgrade(engine)
        async with engine.connect() as conn:
            team = (await conn.execute(sa.text("SELECT team_id FROM api_keys"))).scalar_one()
            org = (await conn.execute(sa.text(f"SELECT org_id FROM teams WHERE id = '{team}'"))).scalar_one()
        return team, org
    finally:
        await engine.dispose()


def test_migration_carries_existing_keys_into_the_default_organisation(database_url: str, module_tmp: Path) -> None:
    fresh = database_url.replace("identity-", "migrating-") if database_url.startswith("sqlite") else None
    if fresh is None:
        from conftest import scratch_postgres

        with scratch_postgres() as url:
            assert asyncio.run(_migrate(url)) == ("team_default", "org_default")
        return
    assert asyncio.run(_migrate(fresh)) == ("team_default", "org_default")


def test_the_command_line_manages_organisations_and_teams(
    gw: Proc, database_url: str, sim: Proc, module_tmp: Path
) -> None:
    import subprocess
    import sys
    import time

    import yaml
    from procs import KEY_SECRET

    cfg_path = module_tmp / f"cli-tenancy-{time.monotonic_ns()}.yaml"
    cfg_path.write_text(yaml.safe_dump(gateway_config({"tiny": [sim.url]}, store={"database_url": database_url})))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PORTCULLIS_KEY_SECRET": KEY_SECRET, "PATH": "/usr/bin:/bin", "USER": "ops"}
        run = [sys.executable, "-m", "portcullis", *args, "--config", str(cfg_path)]
        return subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)

    made = cli("orgs", "create", "umbrella", "--models", "tiny", "--default-tier", "free", "--json")
    assert made.returncode == 0, made.stderr
    org = orjson.loads(made.stdout)
    assert org["models"] == ["tiny"] and org["default_tier"] == "free"
    made = cli("teams", "create", "labs", "--org", org["id"], "--json")
    assert made.returncode == 0, made.stderr
    team = orjson.loads(made.stdout)
    assert cli("teams", "member", team["id"], "alice", "--role", "viewer").returncode == 0
    assert "alice" in cli("teams", "remove-member", team["id"], "alice").stdout
    bad = cli("teams", "member", team["id"], "alice", "--role", "boss")
    assert bad.returncode == 1 and "role" in bad.stderr
    assert cli("orgs", "create", "umbrella").returncode == 1  # the name is taken
    key = cli("keys", "create", "--user", "wesker", "--team", team["id"], "--json")
    assert key.returncode == 0, key.stderr
    record = orjson.loads(key.stdout)
    assert (record["team_id"], record["org_id"], record["tier"]) == (team["id"], org["id"], "free")
    assert usable(gw, record["key"], "tiny") and not usable(gw, record["key"], "other")
    assert record["id"] in cli("keys", "list", "--team", team["id"]).stdout
    assert team["id"] in cli("teams", "list", "--org", org["id"]).stdout
    assert "umbrella" in cli("orgs", "list").stdout
    actions = [e["action"] for e in get(gw, "/admin/audit?actor=cli:ops&limit=10")["data"]]
    assert actions == ["key.create", "member.remove", "member.set", "team.create", "organization.create"]


def test_a_tokens_team_claim_places_it_in_that_team(sim: Proc, tmp_path: Path) -> None:
    """auth.jwt.team_claim: a token naming a team ("<organisation>/<team>" or its id) gets the team's and the
    organisation's grants and limits; one naming no team is refused when team_required."""
    import time

    import jwt as pyjwt

    secret = "jwt-team-secret-0123456789abcdef0123456789abcdef"
    jwt_cfg = {"enabled": True, "team_claim": "groups", "team_required": True, "default_tier": "enterprise"}
    cfg = gateway_config({"tiny": [sim.url], "other": [sim.url]}, auth={"jwt": jwt_cfg})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz", env={"PORTCULLIS_JWT_SECRET": secret})
    try:
        _, org = post(gw, "/admin/organizations", {"name": "hooli", "models": ["tiny"]})
        _, team = post(
            gw, "/admin/teams", {"org_id": org["id"], "name": "nucleus", "limits": {"requests": {"minute": 3}}}
        )

        def token(sub: str, groups: Any) -> str:
            claims = {"sub": sub, "exp": int(time.time()) + 300, "scope": "chat:write models:read", "groups": groups}
            return pyjwt.encode(claims, secret, algorithm="HS256")

        placed = token("gavin", ["everyone", "hooli/nucleus"])  # the first group that names a team counts
        assert usable(gw, placed, "tiny") and not usable(gw, placed, "other")  # the organisation's grant
        by_id = token("jared", team["id"])
        assert usable(gw, by_id, "tiny") and usable(gw, by_id, "tiny")  # the team's third request this minute
        with pytest.raises(openai.RateLimitError) as limited:
            openai_client(gw, placed).chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert limited.value.response.headers["x-portcullis-limit-scope"] == "team"
        for groups in (["everyone"], "hooli/nobody", []):
            with pytest.raises(openai.AuthenticationError):
                openai_client(gw, token("dinesh", groups)).models.list()
    finally:
        gw.stop()


def test_a_levels_moderation_checks_its_keys_requests(sim: Proc, tmp_path: Path) -> None:
    """A team's moderation applies to its keys' requests (over their tier's), not to another team's."""
    words = {"kind": "rules", "keywords": [{"name": "secret", "words": ["project nightshade"]}]}
    gw = start_gateway(
        gateway_config({"tiny": [sim.url]}, moderation={"moderators": {"words": words}}), tmp_path, ready_path="/readyz"
    )
    try:
        _, org = post(gw, "/admin/organizations", {"name": "wayne", "default_tier": "free"})
        status, guarded = post(
            gw, "/admin/teams", {"org_id": org["id"], "name": "rd", "moderation": {"input": ["words"]}}
        )
        assert status == 201 and guarded["moderation"] == {"input": ["words"]}
        _, open_team = post(gw, "/admin/teams", {"org_id": org["id"], "name": "pr"})
        status, refused = post(
            gw, "/admin/teams", {"org_id": org["id"], "name": "x", "moderation": {"input": ["nope"]}}
        )
        assert status == 400 and refused["error"]["param"] == "moderation.input"
        secret = [{"role": "user", "content": "tell me about project nightshade"}]
        checked = create_key(gw, user="lucius", team_id=guarded["id"], tier=None)["key"]
        free = create_key(gw, user="vicki", team_id=open_team["id"], tier=None)["key"]
        with pytest.raises(openai.BadRequestError):
            openai_client(gw, checked).chat.completions.create(model="tiny", messages=secret, max_tokens=2)
        assert openai_client(gw, free).chat.completions.create(model="tiny", messages=secret, max_tokens=2)
        # Taken off the team: its keys' next request is not checked (every process reads the levels again).
        status, _ = post(gw, f"/admin/teams/{guarded['id']}", {"moderation": None})
        assert status == 200
        assert openai_client(gw, checked).chat.completions.create(model="tiny", messages=secret, max_tokens=2)
    finally:
        gw.stop()
