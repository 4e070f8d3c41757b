"""The database: an async SQLAlchemy engine and its migrations.

`upgrade()` applies Alembic migrations on the same async engine (through run_sync), so SQLite and
PostgreSQL take one code path. `pending()` says whether the schema lags behind the code: `serve` refuses
to start then, naming the command to run, unless `store.auto_migrate` is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, *, timeout_s: float = 5.0, statements: bool = False) -> AsyncEngine:
    """The engine for `url`. `statements`: every statement has the deadline too (the serving gateway; not
    migrations, which may take long on a large table)."""
    if url.startswith("sqlite"):
        # One file shared by every process on the host; a writer waits up to 30 s for another
        # process's lock rather than failing. WAL lets readers (reports, key lookups) run beside the
        # usage writer, and synchronous=NORMAL makes a commit cheap (durable at checkpoints: a power
        # cut may lose the last batches, never corrupt the file).
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        # A server that is down refuses at once; one that hangs (stopped, a dead network path) must not
        # hold a connect or a wait for a pooled connection longer than the deadline.
        engine = create_async_engine(
            url,
            pool_size=5,
            max_overflow=10,
            pool_pre_ping=True,
            pool_timeout=timeout_s,
            connect_args={"timeout": timeout_s, **({"command_timeout": timeout_s} if statements else {})},
        )
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _alembic(connection: Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


async def pending(engine: AsyncEngine) -> bool:
    return await current_revision(engine) != head_revision()


async def upgrade(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: command.upgrade(_alembic(c), "head"))
