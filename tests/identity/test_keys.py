"""API keys end to end, on SQLite and PostgreSQL: lifecycle, scopes, models, revocation across processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest
import yaml
from procs import (
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

MSG = [{"role": "user", "content": "hi"}]
ALICE = {"user": "alice", "tier": "free"}  # whose keys these tests make


@pytest.fixture(scope="module")
def gw(sim: Proc, database_url: str, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config({"tiny": [sim.url], "other": [sim.url]}, store={"database_url": database_url})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def chat_ok(gw: Proc, key: str) -> bool:
    try:
        openai_client(gw, key).chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        return True
    except openai.AuthenticationError:
        return False


def test_created_key_works_and_is_shown_once(gw: Proc) -> None:
    made = create_key(gw, **ALICE, label="laptop")
    assert made["key"].startswith("pc-" + made["id"] + "-")
    assert chat_ok(gw, made["key"])
    status, body = http_get(gw.url + f"/admin/keys/{made['id']}")
    shown = orjson.loads(body)
    assert status == 200 and "key" not in shown and "key_hash" not in shown
    assert shown["label"] == "laptop" and shown["status"] == "active"
    listed = orjson.loads(http_get(gw.url + "/admin/keys?user=alice")[1])["data"]
    assert made["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)


def test_last_used_is_recorded_off_the_hot_path(gw: Proc) -> None:
    made = create_key(gw, **ALICE)
    assert orjson.loads(http_get(gw.url + f"/admin/keys/{made['id']}")[1])["last_used_at"] is None
    assert chat_ok(gw, made["key"])

    def last_used() -> str | None:
        return orjson.loads(http_get(gw.url + f"/admin/keys/{made['id']}")[1])["last_used_at"]

    wait_until(lambda: last_used() is not None, timeout=10, interval=0.25, what="last_used_at written")


def test_key_headers_accepted_and_query_string_refused(gw: Proc) -> None:
    key = create_key(gw, **ALICE)["key"]
    for header in ("api-key", "x-api-key"):
        status, _ = http_get(gw.url + "/v1/models", headers={"authorization": None, header: key})
        assert status == 200, header
    status, body = http_get(gw.url + f"/v1/models?api_key={key}", headers={"authorization": None})
    assert status == 401 and orjson.loads(body)["error"]["code"] == "invalid_api_key"


def test_401_looks_the_same_for_unknown_id_and_wrong_secret(gw: Proc) -> None:
    real = create_key(gw, **ALICE)
    wrong_secret = real["key"][:-4] + "AAAA"
    unknown_id = "pc-" + "f" * 16 + real["key"][19:]
    answers = []
    for key in (wrong_secret, unknown_id):
        with pytest.raises(openai.AuthenticationError) as info:
            openai_client(gw, key).models.list()
        assert info.value.response.headers["www-authenticate"].startswith("Bearer")
        answers.append(info.value.body)
    assert answers[0] == answers[1]
    assert answers[0]["code"] == "invalid_api_key"


def test_revocation_is_immediate(gw: Proc) -> None:
    made = create_key(gw, **ALICE)
    assert chat_ok(gw, made["key"])  # now cached
    status, body = http_post(gw.url + f"/admin/keys/{made['id']}/revoke", {})
    assert status == 200 and orjson.loads(body)["status"] == "revoked"
    assert not chat_ok(gw, made["key"])


def test_rotation_grace_then_stop(gw: Proc) -> None:
    old = create_key(gw, **ALICE, scopes=["chat:write", "models:read"], models=["tiny"])
    status, body = http_post(gw.url + f"/admin/keys/{old['id']}/rotate", {"grace_s": 2})
    assert status == 201
    new = orjson.loads(body)
    assert new["scopes"] == old["scopes"] and new["models"] == ["tiny"] and new["user"] == "alice"
    assert new["replaces"]["id"] == old["id"] and new["replaces"]["rotated_to"] == new["id"]
    assert chat_ok(gw, new["key"])
    assert chat_ok(gw, old["key"])  # within the grace
    started = time.monotonic()
    wait_until(lambda: not chat_ok(gw, old["key"]), timeout=6, interval=0.2, what="old key retired")
    assert time.monotonic() - started >= 1.0  # not before the grace ran out
    assert chat_ok(gw, new["key"])


def test_expiry(gw: Proc) -> None:
    made = create_key(gw, **ALICE, expires_in_s=1.5)
    assert chat_ok(gw, made["key"])
    wait_until(lambda: not chat_ok(gw, made["key"]), timeout=6, interval=0.2, what="key expired")
    assert orjson.loads(http_get(gw.url + f"/admin/keys/{made['id']}")[1])["status"] == "expired"


def test_scope_and_model_checks(gw: Proc) -> None:
    embed_only = create_key(gw, **ALICE, scopes=["embeddings:write"])["key"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        openai_client(gw, embed_only).chat.completions.create(model="tiny", messages=MSG)
    assert info.value.code == "missing_scope" and "chat:write" in info.value.message
    status, body = http_post(
        gw.url + "/admin/keys", {"user": "x", "tier": "free"}, headers={"authorization": f"Bearer {embed_only}"}
    )
    assert status == 403 and orjson.loads(body)["error"]["param"] == "keys:admin"  # not an admin

    tiny_only = create_key(gw, **ALICE, models=["tiny"])["key"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        openai_client(gw, tiny_only).chat.completions.create(model="other", messages=MSG)
    assert info.value.code == "model_not_allowed" and "other" in info.value.message
    assert [m.id for m in openai_client(gw, tiny_only).models.list()] == ["tiny"]


def test_admin_routes_need_keys_admin_and_unknown_ids_are_404(gw: Proc) -> None:
    user_key = create_key(gw, **ALICE)["key"]
    status, body = http_get(gw.url + "/admin/keys", headers={"authorization": f"Bearer {user_key}"})
    assert status == 403 and orjson.loads(body)["error"]["code"] == "missing_scope"
    status, _ = http_get(gw.url + "/admin/keys/0123456789abcdef")
    assert status == 404
    status, body = http_post(gw.url + "/admin/keys", {"user": "bob", "tier": "gold"})
    assert status == 400 and orjson.loads(body)["error"]["param"] == "tier"


def test_disable_and_enable_a_model(gw: Proc) -> None:
    c = openai_client(gw)
    deleted = c.models.delete("other")
    assert deleted.deleted is True
    assert "other" not in [m.id for m in c.models.list()]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=MSG)
    status, _ = http_post(gw.url + "/admin/models/other/enable", {})
    assert status == 200
    assert c.chat.completions.create(model="other", messages=MSG, max_tokens=2).model == "other"


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PORTCULLIS_KEY_SECRET": KEY_SECRET, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "portcullis", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli_manages_keys_on_the_same_database(gw: Proc, database_url: str, sim: Proc, module_tmp: Path) -> None:
    cfg_path = module_tmp / f"cli-{time.monotonic_ns()}.yaml"
    cfg_path.write_text(yaml.safe_dump(gateway_config({"tiny": [sim.url]}, store={"database_url": database_url})))
    made = _cli(
        cfg_path,
        "keys",
        "create",
        "--user",
        "carol",
        "--tier",
        "premium",
        "--scopes",
        "chat:write",
        "--expires",
        "30d",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    record = orjson.loads(made.stdout)
    assert record["tier"] == "premium" and record["scopes"] == ["chat:write"] and record["expires_at"]
    assert chat_ok(gw, record["key"])  # the running gateway accepts a key the CLI wrote

    shown = orjson.loads(_cli(cfg_path, "keys", "show", record["id"], "--json").stdout)
    assert "key" not in shown and shown["user"] == "carol"
    listed = _cli(cfg_path, "keys", "list")
    assert record["id"] in listed.stdout and record["key"] not in listed.stdout

    rotated = orjson.loads(_cli(cfg_path, "keys", "rotate", record["id"], "--grace", "0s", "--json").stdout)
    assert chat_ok(gw, rotated["key"])
    # Without Redis the gateway trusts its cache at most 1 s: the CLI's change bites within that.
    started = time.monotonic()
    wait_until(lambda: not chat_ok(gw, record["key"]), timeout=5, interval=0.1, what="rotated key refused")
    assert time.monotonic() - started < 2.0

    revoked = _cli(cfg_path, "keys", "revoke", rotated["id"])
    assert revoked.returncode == 0 and "Revoked" in revoked.stdout
    wait_until(lambda: not chat_ok(gw, rotated["key"]), timeout=5, interval=0.1, what="revoked key refused")
    bad = _cli(cfg_path, "keys", "create", "--user", "x", "--tier", "nope")
    assert bad.returncode == 1 and "unknown tier" in bad.stderr


def test_revocation_reaches_a_second_process_within_1s_with_redis(
    sim: Proc, database_url: str, redis_url: str, module_tmp: Path
) -> None:
    cfg = gateway_config({"tiny": [sim.url]}, store={"database_url": database_url, "redis_url": redis_url})
    a = start_gateway(dict(cfg), module_tmp, ready_path="/readyz")
    b = start_gateway(dict(cfg, store=dict(cfg["store"])), module_tmp, ready_path="/readyz")
    try:
        made = create_key(a, **ALICE)
        assert chat_ok(b, made["key"])  # b has it cached now (30 s with Redis)
        status, _ = http_post(a.url + f"/admin/keys/{made['id']}/revoke", {})
        assert status == 200
        revoked_at = time.monotonic()
        wait_until(lambda: not chat_ok(b, made["key"]), timeout=3, interval=0.02, what="b refuses the key")
        assert time.monotonic() - revoked_at < 1.0
        # and a model switched off on a is off on b
        assert openai_client(a).models.delete("tiny").deleted
        wait_until(
            lambda: "tiny" not in [m.id for m in openai_client(b).models.list()],
            timeout=3,
            what="b sees the model disabled",
        )
        http_post(a.url + "/admin/models/tiny/enable", {})
    finally:
        a.stop()
        b.stop()


def test_serve_refuses_an_unmigrated_database(sim: Proc, module_tmp: Path) -> None:
    db = module_tmp / f"fresh-{time.monotonic_ns()}.db"
    cfg_path = module_tmp / f"unmigrated-{time.monotonic_ns()}.yaml"
    cfg = gateway_config(
        {"tiny": [sim.url]}, store={"database_url": f"sqlite+aiosqlite:///{db}", "auto_migrate": False}
    )
    cfg_path.write_text(yaml.safe_dump(cfg))
    refused = _cli(cfg_path, "serve")
    assert refused.returncode == 1 and "portcullis db upgrade" in refused.stderr
    upgraded = _cli(cfg_path, "db", "upgrade")
    assert upgraded.returncode == 0 and "schema revision" in upgraded.stdout
