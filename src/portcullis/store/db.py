"""The database: an async SQLAlchemy engine and its migrations.

`upgrade()` applies Alembic migrations on the same async engine (through run_sync), so SQLite and
PostgreSQL take one code path. `pending()` says whether the schema lags behind the code: `serve` refuses
to start then, naming the command to run, unless `store.auto_migrate` is on.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        # One file; writes are rare (key admin, last-used batches), so a writer waits up to 30 s for
        # another process's lock rather than failing.
        engine = create_async_engine(url, connect_args={"timeout": 30})
    else:
        engine = create_async_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True)
    return engine


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
