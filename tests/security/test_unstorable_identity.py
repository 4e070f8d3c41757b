"""Review finding: a user (or another value of a usage record) that PostgreSQL cannot store stopped all usage.

A JWT's user is `jwt:<sub>`, stored in String(256) columns. A `sub` of 253+ characters, or one holding a NUL,
failed the usage writer's INSERT, which retried that batch for ever: no tenant's usage was written again, the
database was marked degraded, and the unauthenticated /readyz returned the raw SQL error (other tenants' users,
key ids, request ids). Now such a subject is a counted 401, a key user that cannot be stored a 400, a model name
too long for its column a 400, a spooled record the database refuses is dropped while the rest of its file is
written, and /readyz names the kind of failure only. Real gateway processes on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import orjson
import pytest
import yaml
from conftest import scratch_postgres
from procs import ADMIN_KEY, KEY_SECRET, Proc, gateway_config, http_get, http_post, start_gateway, wait_until

from portcullis.quota.usage import FIELDS

SECRET = "unstorable-test-secret-0123456789abcdef0123456789"
SCOPES = "chat:write batches:write models:read"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


def token(sub: str) -> str:
    now = int(time.time())
    return pyjwt.encode({"sub": sub, "exp": now + 300, "iat": now, "scope": SCOPES}, SECRET, algorithm="HS256")


def _pg(url: str, sql: str, *args: Any) -> Any:
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def _usage_rows(url: str, request_id: str) -> list[Any]:
    return _pg(url, 'SELECT "user", model FROM usage WHERE request_id = $1', request_id)


def _metric(gw: Proc, name: str) -> float:
    _, raw = http_get(gw.url + "/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _post(gw: Proc, path: str, body: Any, credential: str, request_id: str | None = None) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {credential}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    status, raw = http_post(gw.url + path, body, headers=headers)
    return status, orjson.loads(raw)


def _upload(gw: Proc, credential: str) -> tuple[int, Any]:
    boundary = "unstorable-boundary"
    line = orjson.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT})
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + line
        + f"\n\r\n--{boundary}--\r\n".encode()
    )
    status, raw = http_post(
        gw.url + "/v1/files",
        body,
        headers={"authorization": f"Bearer {credential}", "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    return status, orjson.loads(raw)


def assert_openai_error(body: Any, code: str, param: str | None = None) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body


def _gateway(sim: Proc, tmp: Path, database_url: str, failed_auth_per_minute: int = 1_000_000) -> Proc:
    cfg = gateway_config(
        {"tiny": [sim.url]},
        store={"database_url": database_url, "auto_migrate": True},
        auth={"failed_auth_per_minute": failed_auth_per_minute, "jwt": {"enabled": True}},
        quota={"usage": {"flush_interval_s": 0.1, "spool_dir": str(tmp / f"spool-{time.monotonic_ns()}")}},
    )
    return start_gateway(cfg, tmp, ready_path="/readyz", env={"PORTCULLIS_JWT_SECRET": SECRET})


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with scratch_postgres() as url:
        yield url


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path, pg_url: str) -> Iterator[Proc]:
    proc = _gateway(sim, module_tmp, pg_url)
    yield proc
    proc.stop()


UNSTORABLE_SUBJECTS = {
    "253 characters": "s" * 253,
    "255 characters (OIDC's limit)": "s" * 255,
    "an e-mail of 255 characters": "e" * 243 + "@example.org",
    "a NUL": "dana\x00admin",
    "an escape character": "dana\x1b[2J",
    "a C1 control": "dana\x85",
    "an unpaired surrogate": "dana\ud800",
}


@pytest.mark.parametrize("case", list(UNSTORABLE_SUBJECTS))
def test_a_subject_that_cannot_be_stored_is_a_401(gw: Proc, pg_url: str, case: str) -> None:
    refused = token(UNSTORABLE_SUBJECTS[case])
    for path, call in (
        ("/v1/chat/completions", lambda: _post(gw, "/v1/chat/completions", CHAT, refused)),
        ("/v1/files", lambda: _upload(gw, refused)),
    ):
        status, body = call()
        assert status == 401, (case, path, body)
        assert_openai_error(body, "invalid_token")
        assert "sub" in body["error"]["message"], body


def test_a_subject_that_fits_is_served_and_its_usage_written(gw: Proc, pg_url: str) -> None:
    """The control: 252 characters (+ `jwt:` = the column's 256), non-ASCII and an e-mail address are fine."""
    for sub in ("s" * 252, "dana@exämple.org"):
        request_id = f"fits-{uuid.uuid4().hex}"
        status, body = _post(gw, "/v1/chat/completions", CHAT, token(sub), request_id)
        assert status == 200, body
        status, body = _upload(gw, token(sub))
        assert status == 200, body
        wait_until(lambda rid=request_id: _usage_rows(pg_url, rid), timeout=10, what="the usage record")
        assert _usage_rows(pg_url, request_id)[0]["user"] == "jwt:" + sub


def test_refused_subjects_count_for_the_failed_auth_throttle(sim: Proc, tmp_path: Path, pg_url: str) -> None:
    limit = 2
    gw = _gateway(sim, tmp_path, pg_url, failed_auth_per_minute=limit)
    try:
        statuses = []
        for _ in range(limit + 2):
            status, body = _post(gw, "/v1/chat/completions", CHAT, token("s" * 255))
            statuses.append(status)
        assert set(statuses) <= {401, 429} and statuses[-1] == 429 and statuses.count(401) <= limit, statuses
        assert_openai_error(body, "too_many_failed_auth")
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user", "u" * 257),  # (refused before this change too, by the admin API's schema)
        ("user", "bob\x01"),
        ("user", "bob\x85"),
        ("label", "laptop\x1b[31m"),
    ],
)
def test_a_key_whose_user_or_label_cannot_be_stored_is_a_400(gw: Proc, field: str, value: str) -> None:
    spec = {"user": "bob", "tier": "free", field: value}
    status, body = _post(gw, "/admin/keys", spec, ADMIN_KEY)
    assert status == 400, body
    assert_openai_error(body, "invalid_value", field)


def test_a_key_user_of_the_column_width_is_created(gw: Proc) -> None:
    status, body = _post(gw, "/admin/keys", {"user": "u" * 256, "tier": "free", "label": "l" * 256}, ADMIN_KEY)
    assert status == 201, body


def test_the_cli_refuses_a_key_user_that_cannot_be_stored(gw: Proc, sim: Proc, pg_url: str, module_tmp: Path) -> None:
    cfg_path = module_tmp / f"cli-{time.monotonic_ns()}.yaml"
    cfg_path.write_text(yaml.safe_dump(gateway_config({"tiny": [sim.url]}, store={"database_url": pg_url})))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "portcullis",
            "keys",
            "create",
            "--user",
            "u" * 300,
            "--tier",
            "free",
            "--config",
            str(cfg_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PORTCULLIS_KEY_SECRET": KEY_SECRET, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1, done
    assert "cannot be stored" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_a_model_name_too_long_to_record_is_a_400_and_usage_goes_on(gw: Proc, pg_url: str, path: str) -> None:
    """The asked model is recorded with the usage of a refused request (a 404 names what was asked): a name
    over the column's 256 characters used to reach the usage writer from any key, and stop it."""
    shapes = {"/v1/chat/completions": CHAT, "/v1/completions": {"prompt": "x"}, "/v1/embeddings": {"input": "x"}}
    status, answer = _post(gw, path, {**shapes[path], "model": "m" * 300}, ADMIN_KEY)
    assert status == 400, answer
    assert_openai_error(answer, "invalid_value", "model")
    request_id = f"after-{uuid.uuid4().hex}"
    assert _post(gw, "/v1/chat/completions", CHAT, ADMIN_KEY, request_id)[0] == 200
    wait_until(lambda: _usage_rows(pg_url, request_id), timeout=10, what="usage written after the refused name")


def _orphan(spool_dir: Path, records: list[dict[str, Any]]) -> Path:
    """A spool file of a process that died (nobody holds its lock), as quota/spool.py writes them."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    path = spool_dir / f"usage-999999-dead-{uuid.uuid4().hex[:8]}-1.spool"
    path.write_bytes(b"".join(orjson.dumps([r[f] for f in FIELDS]) + b"\n" for r in records))
    return path


def _record(request_id: str, **over: Any) -> dict[str, Any]:
    base = {f: None for f in FIELDS}
    base |= {
        "at": time.time(),
        "request_id": request_id,
        "user": "spooled-user",
        "route": "/v1/chat/completions",
        "model": "tiny",
        "stream": False,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cost": 0.0,
        "latency_ms": 1.0,
        "status": 200,
        "cache_hit": False,
        "record_id": f"dead-{request_id}",
    }
    return base | over


def test_a_spooled_record_the_database_refuses_is_dropped_and_the_rest_replayed(
    sim: Proc, tmp_path: Path, postgres_url: str
) -> None:
    """A process died with a record PostgreSQL refuses in its spool (written by a build before the subject
    check). The next one replays the file: the good records are written, the bad one is dropped, logged and
    counted, and the file is gone (it used to be set aside whole, good records with it, after the refused
    INSERT had marked the database degraded)."""
    spool = tmp_path / "spool"
    good = [f"good-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)]
    bad = f"bad-{uuid.uuid4().hex[:8]}"
    orphan = _orphan(
        spool,
        [_record(good[0]), _record(bad, user="jwt:" + "s" * 255), _record(good[1]), _record(good[2])],
    )
    cfg = gateway_config(
        {"tiny": [sim.url]},
        store={"database_url": postgres_url, "auto_migrate": True},
        quota={"usage": {"flush_interval_s": 0.1, "spool_dir": str(spool)}},
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        wait_until(lambda: not orphan.exists(), timeout=15, what="the orphan replayed")
        assert not list(spool.glob("*.bad")), "the file was set aside"
        found = {r["request_id"] for r in _pg(postgres_url, "SELECT request_id FROM usage")}
        assert found >= set(good) and bad not in found, found
        assert _metric(gw, "portcullis_usage_records_rejected_total") == 1
        wait_until(lambda: bad in gw.log() and "usage_record_rejected" in gw.log(), timeout=5, what="the log line")
        status, raw = http_get(gw.url + "/readyz", headers={"authorization": None})
        assert status == 200 and orjson.loads(raw)["dependencies"]["database"] == {"state": "ok"}, raw
    finally:
        gw.stop()


def test_readyz_does_not_show_the_database_error(
    sim: Proc, tmp_path: Path, postgres_url: str, reaper: Callable[[Any], Any]
) -> None:
    """The usage table away (renamed): every usage INSERT fails, quoting its parameters, and the database is
    degraded. The unauthenticated /readyz says so and names the kind of failure, never the message (which held
    other tenants' users and request ids); the log has it. Back, the records queued meanwhile are written."""
    cfg = gateway_config(
        {"tiny": [sim.url]},
        store={"database_url": postgres_url, "auto_migrate": True, "timeout_s": 2},
        quota={"usage": {"flush_interval_s": 0.1, "spool_dir": str(tmp_path / "spool")}},
    )
    gw = reaper(start_gateway(cfg, tmp_path, ready_path="/readyz"))
    secret_user = f"tenant-{uuid.uuid4().hex[:8]}"
    status, raw = http_post(gw.url + "/admin/keys", {"user": secret_user, "tier": "free"})
    assert status == 201, raw
    key = orjson.loads(raw)["key"]
    assert _post(gw, "/v1/chat/completions", CHAT, key)[0] == 200  # the key verified (and cached)
    _pg(postgres_url, "ALTER TABLE usage RENAME TO usage_away")
    request_id = f"while-away-{uuid.uuid4().hex}"
    try:
        assert _post(gw, "/v1/chat/completions", CHAT, key, request_id)[0] == 200

        def readiness() -> dict[str, Any]:
            status, raw = http_get(gw.url + "/readyz", headers={"authorization": None})
            assert status == 200, raw
            text = raw.decode()
            for leaked in (secret_user, request_id, "INSERT", "usage", "parameters", "relation"):
                assert leaked not in text, (leaked, text)
            return orjson.loads(raw)["dependencies"]["database"]

        wait_until(lambda: readiness()["state"] == "degraded", timeout=15, what="the database degraded")
        database = readiness()
        assert set(database) == {"state", "since", "error"} and database["error"].isidentifier(), database
        wait_until(
            lambda: any("usage_write_failed" in line and secret_user in line for line in gw.log().splitlines()),
            timeout=5,
            what="the detail in the log, for the operator",
        )
    finally:
        _pg(postgres_url, "ALTER TABLE usage_away RENAME TO usage")
    # An outage is retried as before: the record queued meanwhile is written once the table is back.
    wait_until(lambda: _usage_rows(postgres_url, request_id), timeout=20, what="the queued record written")
    wait_until(lambda: readiness()["state"] == "ok", timeout=10, what="the database ok again")
    gw.stop()
