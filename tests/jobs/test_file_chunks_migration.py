"""Migration 0006 moved uploads into file_chunks; going back to 0005 must keep them (a review found the
downgrade dropped the chunks, and the files uploaded since read back empty). Run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import command

from portcullis.store import db
from portcullis.store.schema import file_chunks, files


async def _roundtrip(url: str) -> bytes:
    engine = db.make_engine(url)
    try:
        await db.upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(
                files.insert().values(
                    id="file-1",
                    owner="u",
                    purpose="batch",
                    filename="in.jsonl",
                    bytes=16,
                    created_at=0.0,
                    expires_at=None,
                    content=b"head-",
                )
            )
            pieces = ((1, b"two"), (0, b"one"), (2, b"three"))  # inserted out of order: seq decides
            await conn.execute(file_chunks.insert(), [{"file_id": "file-1", "seq": i, "data": d} for i, d in pieces])
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(db._alembic(c), "0005"))
        async with engine.connect() as conn:
            assert "file_chunks" not in await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            content = (await conn.execute(sa.select(files.c.content).where(files.c.id == "file-1"))).scalar_one()
        return bytes(content)
    finally:
        await engine.dispose()


def test_downgrading_0006_keeps_uploaded_files(database_url: str) -> None:
    assert asyncio.run(_roundtrip(database_url)) == b"head-onetwothree"
