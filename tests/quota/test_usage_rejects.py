"""The usage writer against a real PostgreSQL: one record the database refuses for its data (a user too long for
its column, a NUL) never holds up the others, and its spooled copy does not come back; an outage is still
retried, never dropped.

Review finding: a JWT user of a 253-character subject failed the batch's INSERT, and the writer retried that
batch for ever: no tenant's usage was written again. Such a user can no longer come from outside (the subject is
refused, tests/security/test_unstorable_identity.py), so the record is put in the writer's queue here.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import scratch_postgres

from portcullis.config import UsageConfig
from portcullis.obs.metrics import Metrics
from portcullis.quota.usage import FIELDS, UsageRecorder
from portcullis.routing.catalog import Catalog
from portcullis.store.db import make_engine, upgrade
from portcullis.store.health import DatabaseHealth


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    error = info = warning = exception = _add

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.lines if name == event]


def record(request_id: str, user: str = "alice") -> tuple[Any, ...]:
    """A record as the request path gives it (FIELDS but the record id)."""
    values = {
        "at": time.time(),
        "request_id": request_id,
        "key_id": "0123456789abcdef",
        "user": user,
        "route": "/v1/chat/completions",
        "model": "tiny",
        "deployment": "r0",
        "stream": False,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cost": 0.0,
        "latency_ms": 1.0,
        "ttft_ms": None,
        "status": 200,
        "error": None,
        "cache_hit": False,
        "moderation": None,
    }
    return tuple(values[f] for f in FIELDS[:-1])


async def _until(predicate: Any, what: str) -> None:
    for _ in range(300):  # 15 s
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _recorder(engine: Any, spool_dir: Path, log: Log, health: DatabaseHealth | None = None) -> UsageRecorder:
    config = UsageConfig(flush_interval_s=0.05, batch_size=50, spool_dir=spool_dir)
    return UsageRecorder(engine, config, Metrics(Catalog({})), log, health=health, timeout_s=2.0)


def test_a_record_the_database_refuses_is_dropped_and_the_others_written(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    with scratch_postgres() as url:
        asyncio.run(_refused_record(url, spool_dir))
        # The spooled copies of the dropped records do not come back: the spool is done with, and a process
        # starting on the same folder replays nothing.
        assert not list(spool_dir.glob("usage-*")), list(spool_dir.iterdir())
        asyncio.run(_replays_nothing(url, spool_dir))


async def _refused_record(url: str, spool_dir: Path) -> None:
    engine = make_engine(url, timeout_s=2.0, statements=True)
    try:
        await upgrade(engine)
        log = Log()
        health = DatabaseHealth(engine, timeout_s=2.0, log=log)
        recorder = _recorder(engine, spool_dir, log, health)
        recorder.start()
        # One batch: two good records of other tenants around two that PostgreSQL refuses.
        recorder.record(record("good-1", user="bob"))
        recorder.record(record("too-long", user="jwt:" + "s" * 255))
        recorder.record(record("good-2", user="carol"))
        recorder.record(record("nul", user="jwt:dana\x00"))
        recorder.record(record("good-3"))
        await _until(lambda: recorder.written == 3, "the good records written")
        assert recorder.rejected == 2 and not recorder.queue
        assert {r["request_id"] for r in log.named("usage_record_rejected")} == {"too-long", "nul"}
        assert "portcullis_usage_records_rejected_total 2.0" in recorder.metrics.render().decode()
        assert not health.degraded, "a refused record says nothing about the database"
        # And after it, usage goes on being written.
        recorder.record(record("good-4"))
        await _until(lambda: recorder.written == 4, "a later record written")
        async with engine.connect() as conn:
            rows = await conn.exec_driver_sql("SELECT request_id FROM usage ORDER BY request_id")
            assert [r[0] for r in rows] == ["good-1", "good-2", "good-3", "good-4"]
        assert recorder.spool is not None and recorder.spool.done == recorder.spool.appended == 6
        await recorder.stop()
    finally:
        await engine.dispose()


async def _replays_nothing(url: str, spool_dir: Path) -> None:
    engine = make_engine(url, timeout_s=2.0, statements=True)
    try:
        again = _recorder(engine, spool_dir, Log())
        again.start()
        await asyncio.sleep(0.3)
        await again.stop()
        assert again.replayed == 0 and again.rejected == 0
    finally:
        await engine.dispose()


def test_an_outage_is_retried_never_dropped(tmp_path: Path) -> None:
    """A database that refuses connections: the records stay queued (and spooled), nothing is counted as
    rejected, and the database is degraded."""
    asyncio.run(_outage(tmp_path / "spool"))
    assert list((tmp_path / "spool").glob("usage-*.spool")), "the queued records stay in the spool"


async def _outage(spool_dir: Path) -> None:
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:9/nowhere", timeout_s=1.0, statements=True)
    try:
        log = Log()
        health = DatabaseHealth(engine, timeout_s=1.0, log=log)
        recorder = _recorder(engine, spool_dir, log, health)
        recorder.start()
        recorder.record(record("a"))
        recorder.record(record("b"))
        await _until(lambda: len(log.named("usage_write_failed")) >= 2, "two failed writes")
        assert health.degraded and len(recorder.queue) == 2
        assert recorder.rejected == 0 and recorder.written == 0 and not log.named("usage_record_rejected")
        await recorder.stop()  # (tries for its deadline, then leaves the records to the spool)
    finally:
        await health.stop()
        await engine.dispose()


@pytest.mark.parametrize("field", ["user", "model"])
def test_a_value_sqlite_cannot_encode_is_dropped_too(tmp_path: Path, field: str) -> None:
    """SQLite stores any length and a NUL, but its driver cannot encode an unpaired surrogate: dropped alike."""
    asyncio.run(_sqlite(tmp_path, field))


async def _sqlite(tmp_path: Path, field: str) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/usage.db", statements=True)
    try:
        await upgrade(engine)
        log = Log()
        recorder = _recorder(engine, tmp_path / "spool", log)
        recorder.start()
        bad = list(record("surrogate"))
        bad[FIELDS.index(field)] = "x\ud800"
        recorder.record(record("good-1"))
        recorder.record(tuple(bad))
        recorder.record(record("good-2"))
        await _until(lambda: recorder.written == 2, "the good records written")
        assert recorder.rejected == 1 and [r["request_id"] for r in log.named("usage_record_rejected")] == ["surrogate"]
        await recorder.stop()
    finally:
        await engine.dispose()
