"""The audit log, on SQLite and PostgreSQL: every administrative change (API, command line, startup) with who,
when, from where, before and after; GET /admin/audit and `portcullis audit`; append-only in the database itself."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from procs import (
    ADMIN_KEY,
    KEY_SECRET,
    Proc,
    create_key,
    gateway_config,
    http_get,
    http_post,
    openai_client,
    start_gateway,
    wait_until,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

ADMIN_ID = ADMIN_KEY.split("-")[1]


@pytest.fixture(scope="module")
def gw(sim: Proc, database_url: str, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config({"tiny": [sim.url], "other": [sim.url]}, store={"database_url": database_url})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def audit(gw: Proc, query: str = "") -> dict[str, Any]:
    status, body = http_get(gw.url + "/admin/audit" + query)
    assert status == 200, body
    return orjson.loads(body)


def test_the_bootstrap_admin_key_is_the_first_entry(gw: Proc) -> None:
    first = audit(gw, f"?target={ADMIN_ID}")["data"][-1]
    assert first["action"] == "key.create" and first["actor"] == {
        "user": "system",
        "key_id": None,
        "via": "system",
        "source": None,
    }
    assert first["before"] is None and first["after"]["label"] == "bootstrap admin key"


def test_key_changes_are_recorded_with_who_where_before_and_after(gw: Proc) -> None:
    made = create_key(gw, user="dora", tier="free", label="ci")
    status, body = http_post(gw.url + f"/admin/keys/{made['id']}/rotate", {"grace_s": 60})
    assert status == 201
    successor = orjson.loads(body)
    status, _ = http_post(gw.url + f"/admin/keys/{successor['id']}/revoke", {}, headers={"x-request-id": "rq-audit-1"})
    assert status == 200
    again, _ = http_post(gw.url + f"/admin/keys/{successor['id']}/revoke", {})
    assert again == 200  # revoking a revoked key changes nothing: no entry

    entries = audit(gw, "?action=key&limit=20")["data"]
    mine = [e for e in entries if e["target"] in (made["id"], successor["id"])]
    assert [(e["action"], e["target"]) for e in mine] == [
        ("key.revoke", successor["id"]),
        ("key.create", successor["id"]),
        ("key.rotate", made["id"]),
        ("key.create", made["id"]),
    ]
    revoke, created, rotate, first = mine
    for e in mine:
        assert e["actor"] == {"user": "admin", "key_id": ADMIN_ID, "via": "api_key", "source": "127.0.0.1"}
        assert "key" not in (e["after"] or {}) and "key_hash" not in (e["after"] or {})
        assert made["key"] not in orjson.dumps(e).decode()
    assert revoke["request_id"] == "rq-audit-1"
    assert (revoke["before"]["status"], revoke["after"]["status"]) == ("active", "revoked")
    assert rotate["before"]["rotated_to"] is None and rotate["after"]["rotated_to"] == successor["id"]
    assert first["before"] is None and first["after"]["user"] == "dora" and first["after"]["label"] == "ci"
    assert created["after"]["user"] == "dora"

    # Each is also a log line of its own, for whatever collects the gateway's log (written off the event loop).
    def logged() -> bool:
        lines = [orjson.loads(line) for line in gw.log().splitlines() if '"event":"audit"' in line]
        return any(line["action"] == "key.revoke" and line["target"] == successor["id"] for line in lines)

    wait_until(logged, timeout=10, what="the audit event in the log")


def test_switching_a_model_off_and_on(gw: Proc) -> None:
    assert openai_client(gw).models.delete("other").deleted
    status, _ = http_post(gw.url + "/admin/models/other/enable", {})
    assert status == 200
    on, off = audit(gw, "?action=model&target=other&limit=2")["data"]
    assert (off["action"], off["before"], off["after"]) == ("model.disable", {"enabled": True}, {"enabled": False})
    assert (on["action"], on["before"], on["after"]) == ("model.enable", {"enabled": False}, {"enabled": True})


def test_pages_and_filters(gw: Proc) -> None:
    for n in range(3):
        create_key(gw, user=f"pager-{n}", tier="free")
    since = time.time() - 600
    whole = audit(gw, f"?action=key.create&since={since:.3f}")["data"]
    assert len(whole) >= 3 and all(e["action"] == "key.create" for e in whole)
    page = audit(gw, "?action=key.create&limit=2")
    assert len(page["data"]) == 2 and page["has_more"] is True
    assert page["first_id"] == page["data"][0]["id"] > page["last_id"] == page["data"][1]["id"]
    after = audit(gw, f"?action=key.create&limit=2&after={page['last_id']}")["data"]
    assert after and after[0]["id"] < page["last_id"]
    assert audit(gw, "?since=2999-01-01")["data"] == []
    assert audit(gw, "?actor=nobody-at-all") == {"object": "list", "data": [], "has_more": False}
    for bad in ("?since=yesterday", "?action=Key!", "?limit=0", "?limit=5000", "?after=-1"):
        status, body = http_get(gw.url + "/admin/audit" + bad)
        assert status == 400 and orjson.loads(body)["error"]["type"] == "invalid_request_error", bad


def test_reading_it_needs_admin_read(gw: Proc) -> None:
    user_key = create_key(gw, user="erin", tier="free")["key"]
    status, _ = http_get(gw.url + "/admin/audit", headers={"authorization": f"Bearer {user_key}"})
    assert status == 403


def test_one_of_concurrent_rotations_wins(gw: Proc) -> None:
    made = create_key(gw, user="frank", tier="free")
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: http_post(gw.url + f"/admin/keys/{made['id']}/rotate", {})[0], range(8)))
    assert sorted(statuses) == [201] + [404] * 7
    rotations = audit(gw, f"?action=key.rotate&target={made['id']}")["data"]
    assert len(rotations) == 1


def test_the_table_refuses_updates_and_deletes(gw: Proc, database_url: str) -> None:
    async def tamper() -> list[str]:
        engine = create_async_engine(database_url)
        refused = []
        try:
            for sql in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
                try:
                    async with engine.begin() as conn:
                        await conn.execute(text(sql))
                except Exception as exc:
                    refused.append(str(exc))
            async with engine.connect() as conn:
                actors = (await conn.execute(text("SELECT DISTINCT actor FROM audit_log"))).scalars().all()
        finally:
            await engine.dispose()
        assert "mallory" not in actors and actors
        return refused

    refused = asyncio.run(tamper())
    assert len(refused) == 2 and all("append-only" in r for r in refused)


def test_command_line_changes_name_the_operator(gw: Proc, database_url: str, sim: Proc, module_tmp: Path) -> None:
    cfg_path = module_tmp / f"cli-audit-{time.monotonic_ns()}.yaml"
    cfg_path.write_text(yaml.safe_dump(gateway_config({"tiny": [sim.url]}, store={"database_url": database_url})))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PORTCULLIS_KEY_SECRET": KEY_SECRET, "PATH": "/usr/bin:/bin", "USER": "ops-oliver"}
        return subprocess.run(
            [sys.executable, "-m", "portcullis", *args, "--config", str(cfg_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    made = cli("keys", "create", "--user", "gina", "--tier", "free", "--json")
    assert made.returncode == 0, made.stderr
    key_id = orjson.loads(made.stdout)["id"]
    assert cli("keys", "revoke", key_id).returncode == 0
    listed = cli("audit", "--target", key_id, "--json")
    assert listed.returncode == 0, listed.stderr
    entries = orjson.loads(listed.stdout)["data"]
    assert [e["action"] for e in entries] == ["key.revoke", "key.create"]
    assert entries[0]["actor"] == {"user": "cli:ops-oliver", "key_id": None, "via": "cli", "source": "cli"}
    table = cli("audit", "--action", "key.revoke", "--limit", "5")
    assert table.returncode == 0 and key_id in table.stdout and "cli:ops-oliver" in table.stdout
    assert audit(gw, f"?target={key_id}")["data"] == entries  # the same log, through the API
    bad = cli("audit", "--since", "soon")
    assert bad.returncode == 1 and "--since" in bad.stderr
