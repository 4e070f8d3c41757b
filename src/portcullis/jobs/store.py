"""Files and batch jobs in the database: what the Batch API shows and what the runner leases.

Every state change is one SQL statement or one transaction, so any number of gateway processes can share
the tables:
  claim     the next runnable lines of a batch become `leased` by one process until `lease_until`
            (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so processes never wait on each other's lines; SQLite
            serialises writers, which gives the same guarantee for the processes of one host);
  finish    a leased line becomes `done` or `failed` with its output line, only if the lease is still
            this process's: a line whose lease expired and was taken over is written by whoever holds it;
  release   a leased line goes back to `pending` (overloaded, preempted, shutting down) to run again later;
  finalize  once no line is open, one transaction (the batch row locked) writes the output and error
            files from the lines in input order, in chunks as it reads them (never a whole file in memory),
            marks the batch ended and deletes its lines (their results are in the files now). Each input
            line has exactly one row, written once, so each appears exactly once in the output or the error
            file.

Every file, uploaded or generated, is stored in CHUNK_BYTES pieces (file_chunks) and read back one piece at
a time (generated files written before that kept their bytes in files.content: see iter_content). Output and
error files count toward their owner's stored files and bytes like uploads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import LargeBinary, and_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from portcullis.store.schema import batch_lines, batches, file_chunks, files

CHUNK_BYTES = 1024 * 1024  # a file is stored and read in pieces of this size
# Creating a batch inserts its lines in groups of at most this many lines or bytes (one statement each), so
# it never holds more than one group of a file's lines.
_INSERT_LINES = 1000
_INSERT_BYTES = 4 * 1024 * 1024
# Finalizing reads ended lines this many at a time (a line's result is one answer, usually a few KB).
_FINALIZE_PAGE = 256
OPEN = ("pending", "leased")
LIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(slots=True)
class Line:
    id: int
    line_no: int
    custom_id: str
    body: str
    attempts: int


def file_object(row: Any) -> dict[str, Any]:
    """OpenAI's File object (what OpenAI's document makes optional is left out when there is none: never a null)."""
    obj = {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
    }
    if row.expires_at is not None:
        obj["expires_at"] = int(row.expires_at)
    return obj


def batch_object(row: Any, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """OpenAI's Batch object; `counts` (lines by state) for a batch still running."""
    if counts is not None and row.status in LIVE:
        completed, failed = counts.get("done", 0), counts.get("failed", 0)
    else:
        completed, failed = row.completed, row.failed

    def t(value: float | None) -> int | None:
        return int(value) if value is not None else None

    obj = {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": {"object": "list", "data": row.errors} if row.errors else None,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": t(row.created_at),
        "in_progress_at": t(row.in_progress_at),
        "expires_at": t(row.expires_at),
        "finalizing_at": t(row.finalizing_at),
        "completed_at": t(row.completed_at),
        "failed_at": t(row.failed_at),
        "expired_at": t(row.expired_at),
        "cancelling_at": t(row.cancelling_at),
        "cancelled_at": t(row.cancelled_at),
        "request_counts": {"total": row.total, "completed": completed, "failed": failed},
        "metadata": row.metadata,
        "model": row.model,
    }
    # What OpenAI's document makes optional is left out when there is none (never a null); metadata may be null.
    return {k: v for k, v in obj.items() if v is not None or k == "metadata"}


def not_run(batch_id: str, line_no: int, custom_id: str, code: str, message: str) -> str:
    """The error file's line for a request that never ran (expired, cancelled)."""
    return orjson.dumps(
        {
            "id": f"batch_req_{batch_id[6:]}_{line_no}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    ).decode()


class BatchStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.uploading: dict[str, int] = {}  # principal → uploads in progress in this process
        self.creating: dict[str, int] = {}  # principal → batch creations in progress in this process
        # Quota checks of one owner's uploads (or batch creations) in this process take turns (striped: a
        # bounded set of locks).
        self._quota_locks = [asyncio.Lock() for _ in range(64)]
        self._batch_locks = [asyncio.Lock() for _ in range(64)]

    # -- files ----------------------------------------------------------------------------------

    async def store_upload(
        self,
        *,
        file_id: str,
        owner: str,
        filename: str,
        read: Callable[[int], Awaitable[bytes]],
        size: int,
        expires_at: float | None,
        check: Callable[[int, int], None],
    ) -> dict[str, Any]:
        """An uploaded file (`size` bytes; `read(n)` gives its next n from the spool) stored in CHUNK_BYTES
        pieces, in one transaction that first calls `check(files, bytes)` with what the owner already stores
        (it raises to refuse): under the transaction (and, on PostgreSQL, a lock per owner) so concurrent
        uploads cannot both pass it."""
        row = {
            "id": file_id,
            "owner": owner,
            "purpose": "batch",
            "filename": filename,
            "bytes": size,
            "created_at": time.time(),
            "expires_at": expires_at,
            "content": b"",
        }
        async with self._quota_locks[hash(owner) % len(self._quota_locks)], self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": "files:" + owner})
            check(*await self._usage(conn, owner, time.time()))
            await conn.execute(insert(files).values(row))
            seq = 0
            while data := await read(CHUNK_BYTES):
                await conn.execute(insert(file_chunks).values(file_id=file_id, seq=seq, data=data))
                seq += 1
        return file_object(RowView(row))

    async def usage(self, owner: str, now: float) -> tuple[int, int]:
        """(files, their bytes) the owner stores now: uploads and the output and error files of their batches
        (expired ones no longer count)."""
        async with self.engine.connect() as conn:
            return await self._usage(conn, owner, now)

    async def _usage(self, conn: AsyncConnection, owner: str, now: float) -> tuple[int, int]:
        query = select(func.count(), func.coalesce(func.sum(files.c.bytes), 0)).where(
            files.c.owner == owner, _live(now)
        )
        count, size = (await conn.execute(query)).one()
        return int(count), int(size)

    async def get_file(self, file_id: str) -> Any:
        """The file's row without its content; None once it expired (the sweep deletes it later)."""
        columns = [c for c in files.c if c.name != "content"]
        async with self.engine.connect() as conn:
            query = select(*columns).where(files.c.id == file_id, _live(time.time()))
            return (await conn.execute(query)).first()

    async def iter_content(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes piece by piece (its inline content, then its chunks), one query per piece, so a
        reader holds one chunk at a time. Inline content (files written before they were chunked) is read
        in CHUNK_BYTES slices on PostgreSQL; SQLite materialises a whole value to slice it, so there it is
        read in one piece, as it always was."""
        async with self.engine.connect() as conn:
            sliced = conn.dialect.name == "postgresql"
            inline = (await conn.execute(select(func.length(files.c.content)).where(files.c.id == file_id))).scalar()
            seqs: list[int] = list(
                (
                    await conn.execute(
                        select(file_chunks.c.seq).where(file_chunks.c.file_id == file_id).order_by(file_chunks.c.seq)
                    )
                ).scalars()
            )
        step = CHUNK_BYTES if sliced else max(1, inline or 0)
        for start in range(0, inline or 0, step):
            async with self.engine.connect() as conn:
                piece = func.substr(files.c.content, start + 1, step, type_=LargeBinary)  # (1-based)
                data = (await conn.execute(select(piece).where(files.c.id == file_id))).scalar()
            if data:
                yield bytes(data)
        for seq in seqs:
            async with self.engine.connect() as conn:
                query = select(file_chunks.c.data).where(file_chunks.c.file_id == file_id, file_chunks.c.seq == seq)
                data = (await conn.execute(query)).scalar()
            if data:
                yield data

    async def file_content(self, file_id: str) -> bytes | None:
        """The whole file (small generated files, tests); readers of uploads use iter_content."""
        if await self.get_file(file_id) is None:
            return None
        return b"".join([piece async for piece in self.iter_content(file_id)])

    async def list_files(self, owner: str | None, purpose: str | None, limit: int, after: str | None) -> list[Any]:
        columns = [c for c in files.c if c.name != "content"]
        query = (
            select(*columns)
            .where(_live(time.time()))
            .order_by(files.c.created_at.desc(), files.c.id.desc())
            .limit(limit)
        )
        if owner is not None:
            query = query.where(files.c.owner == owner)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        if after is not None:
            query = query.where(
                files.c.created_at < select(files.c.created_at).where(files.c.id == after).scalar_subquery()
            )
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def delete_file(self, file_id: str) -> bool:
        async with self.engine.begin() as conn:
            await conn.execute(delete(file_chunks).where(file_chunks.c.file_id == file_id))
            return (await conn.execute(delete(files).where(files.c.id == file_id))).rowcount > 0

    async def delete_expired_files(self, now: float) -> int:
        expired = and_(files.c.expires_at.is_not(None), files.c.expires_at <= now)
        async with self.engine.begin() as conn:
            await conn.execute(delete(file_chunks).where(file_chunks.c.file_id.in_(select(files.c.id).where(expired))))
            done = await conn.execute(delete(files).where(expired))
            return done.rowcount

    # -- batches --------------------------------------------------------------------------------

    async def create_batch(
        self,
        row: dict[str, Any],
        lines: AsyncIterator[tuple[str, str]] | None = None,
        check: Callable[[int, int, int, int], None] | None = None,
    ) -> None:
        """The batch and its lines ((custom_id, body JSON) in input order, read as they are inserted, in
        groups), in one transaction: if `lines` raises, or yields other than row["total"] lines, nothing is
        stored. `check(live batches, their lines, files, bytes)` is called first with what the owner has now
        (it raises to refuse), under the transaction and, on PostgreSQL, a lock per owner, so concurrent
        creations cannot both pass it."""
        owner = row["owner"]
        async with self._batch_locks[hash(owner) % len(self._batch_locks)], self.engine.begin() as conn:
            if check is not None:
                if conn.dialect.name == "postgresql":
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": "batches:" + owner}
                    )
                now = time.time()
                check(*await self._batch_usage(conn, owner), *await self._usage(conn, owner, now))
            await conn.execute(insert(batches).values(row))
            if lines is None:
                return
            group: list[dict[str, Any]] = []
            size = count = 0
            async for custom_id, body in lines:
                group.append(
                    {
                        "batch_id": row["id"],
                        "line_no": count,
                        "custom_id": custom_id,
                        "body": body,
                        "state": "pending",
                        "not_before": 0.0,
                        "attempts": 0,
                    }
                )
                count += 1
                size += len(body) + len(custom_id)
                if len(group) >= _INSERT_LINES or size >= _INSERT_BYTES:
                    await conn.execute(insert(batch_lines), group)
                    group = []
                    size = 0
            if group:
                await conn.execute(insert(batch_lines), group)
            if count != row["total"]:
                raise InputChanged(f"the input file gave {count} requests, {row['total']} when it was checked")

    async def batch_usage(self, owner: str) -> tuple[int, int]:
        """(batches not ended, the lines they hold) of the owner."""
        async with self.engine.connect() as conn:
            return await self._batch_usage(conn, owner)

    async def _batch_usage(self, conn: AsyncConnection, owner: str) -> tuple[int, int]:
        query = select(func.count(), func.coalesce(func.sum(batches.c.total), 0)).where(
            batches.c.owner == owner, batches.c.status.in_(LIVE)
        )
        count, lines = (await conn.execute(query)).one()
        return int(count), int(lines)

    async def get_batch(self, batch_id: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(batches).where(batches.c.id == batch_id))).first()

    async def list_batches(self, owner: str | None, limit: int, after: str | None) -> list[Any]:
        query = select(batches).order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(batches.c.owner == owner)
        if after is not None:
            query = query.where(
                batches.c.created_at < select(batches.c.created_at).where(batches.c.id == after).scalar_subquery()
            )
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def counts(self, batch_id: str) -> dict[str, int]:
        query = (
            select(batch_lines.c.state, func.count())
            .where(batch_lines.c.batch_id == batch_id)
            .group_by(batch_lines.c.state)
        )
        async with self.engine.connect() as conn:
            return {state: n for state, n in (await conn.execute(query)).all()}

    async def counts_many(self, batch_ids: list[str]) -> dict[str, dict[str, int]]:
        if not batch_ids:
            return {}
        query = (
            select(batch_lines.c.batch_id, batch_lines.c.state, func.count())
            .where(batch_lines.c.batch_id.in_(batch_ids))
            .group_by(batch_lines.c.batch_id, batch_lines.c.state)
        )
        out: dict[str, dict[str, int]] = {}
        async with self.engine.connect() as conn:
            for batch_id, state, n in (await conn.execute(query)).all():
                out.setdefault(batch_id, {})[state] = n
        return out

    async def active(self) -> list[Any]:
        """Batches a runner may have work in, the nearest deadline first."""
        query = (
            select(
                batches.c.id,
                batches.c.status,
                batches.c.model,
                batches.c.endpoint,
                batches.c.expires_at,
                batches.c.principal,
            )
            .where(batches.c.status.in_(("in_progress", "cancelling")))
            .order_by(batches.c.expires_at)
        )
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def cancel(self, batch_id: str, now: float) -> bool:
        async with self.engine.begin() as conn:
            done = await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status.in_(("validating", "in_progress")))
                .values(status="cancelling", cancelling_at=now)
            )
            return done.rowcount > 0

    # -- lines ----------------------------------------------------------------------------------

    async def claim(self, batch_id: str, owner: str, n: int, now: float, lease_s: float) -> list[Line]:
        """Lease up to n runnable lines of a batch: pending ones due now, or leased ones whose lease expired
        (their process died). Lines are taken in input order."""
        runnable = or_(
            and_(batch_lines.c.state == "pending", batch_lines.c.not_before <= now),
            and_(batch_lines.c.state == "leased", batch_lines.c.lease_until < now),
        )
        chosen = (
            select(batch_lines.c.id)
            .where(batch_lines.c.batch_id == batch_id, runnable)
            .order_by(batch_lines.c.id)
            .limit(n)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(batch_lines)
            .where(batch_lines.c.id.in_(chosen))
            .values(state="leased", lease_owner=owner, lease_until=now + lease_s, attempts=batch_lines.c.attempts + 1)
            .returning(
                batch_lines.c.id,
                batch_lines.c.line_no,
                batch_lines.c.custom_id,
                batch_lines.c.body,
                batch_lines.c.attempts,
            )
        )
        async with self.engine.begin() as conn:
            rows = (await conn.execute(statement)).all()
        return sorted((Line(*row) for row in rows), key=lambda line: line.line_no)

    async def renew(self, ids: list[int], owner: str, until: float) -> None:
        if not ids:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batch_lines)
                .where(batch_lines.c.id.in_(ids), batch_lines.c.lease_owner == owner, batch_lines.c.state == "leased")
                .values(lease_until=until)
            )

    async def settle(
        self, owner: str, finished: list[tuple[int, str, str, float]], released: list[tuple[int, float]]
    ) -> None:
        """Lines that ended ((id, done|failed, output line, when)) and lines going back to pending ((id,
        not before)), in one transaction; each only while this process still holds its lease."""
        mine = and_(
            batch_lines.c.id == _param("line_id"), batch_lines.c.lease_owner == owner, batch_lines.c.state == "leased"
        )
        async with self.engine.begin() as conn:
            if finished:
                await conn.execute(
                    update(batch_lines)
                    .where(mine)
                    .values(
                        state=_param("new_state"),
                        result=_param("new_result"),
                        finished_at=_param("at"),
                        lease_owner=None,
                    ),
                    [{"line_id": i, "new_state": s, "new_result": r, "at": t} for i, s, r, t in finished],
                )
            if released:
                await conn.execute(
                    update(batch_lines)
                    .where(mine)
                    .values(state="pending", lease_owner=None, lease_until=None, not_before=_param("due")),
                    [{"line_id": i, "due": due} for i, due in released],
                )

    async def finalize(self, batch_id: str, now: float, *, ttl_s: float | None) -> str | None:
        """End the batch if nothing is open (or it expired, or it is being cancelled and nothing runs):
        write the output and error files, set the final status, delete the lines. Returns that status, or
        None if not yet. The lines are read a page at a time and the files written a chunk at a time, so a
        batch's end holds one page and one chunk per file whatever the batch's size."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(batches).where(batches.c.id == batch_id).with_for_update())).first()
            if row is None or row.status not in ("in_progress", "cancelling"):
                return None
            mine = batch_lines.c.batch_id == batch_id
            is_open = and_(mine, batch_lines.c.state.in_(OPEN))
            open_lines = (await conn.execute(select(func.count()).where(is_open))).scalar() or 0
            if row.status == "cancelling":
                running = and_(mine, batch_lines.c.state == "leased", batch_lines.c.lease_until >= now)
                if (await conn.execute(select(batch_lines.c.id).where(running).limit(1))).first() is not None:
                    return None  # lines still running; their processes are stopping them
                final, code, message = (
                    "cancelled",
                    "batch_cancelled",
                    "The batch was cancelled before this request ran.",
                )
            elif now >= row.expires_at and open_lines:
                final, code, message = (
                    "expired",
                    "batch_expired",
                    ("This request could not be executed before the completion window expired."),
                )
            elif open_lines:
                return None
            else:
                final, code, message = "completed", "", ""
            if open_lines:
                # Lines that never ran end as failed with no result: their error line (which names the
                # reason) is made as the error file is written, not stored line by line first.
                await conn.execute(
                    update(batch_lines)
                    .where(is_open)
                    .values(state="failed", result=None, finished_at=now, lease_owner=None)
                )
            expires = now + ttl_s if ttl_s is not None else None
            writers = {
                kind: _FileWriter(conn, f"file-{kind[:3]}{batch_id[6:]}", f"{batch_id}_{kind}.jsonl")
                for kind in ("output", "error")
            }
            last = -1
            while True:
                page = (
                    await conn.execute(
                        select(
                            batch_lines.c.line_no, batch_lines.c.custom_id, batch_lines.c.state, batch_lines.c.result
                        )
                        .where(mine, batch_lines.c.line_no > last)
                        .order_by(batch_lines.c.line_no)
                        .limit(_FINALIZE_PAGE)
                    )
                ).all()
                if not page:
                    break
                for r in page:
                    if r.state == "done":
                        await writers["output"].add(r.result)
                    else:
                        result = (
                            r.result
                            if r.result is not None
                            else not_run(batch_id, r.line_no, r.custom_id, code, message)
                        )
                        await writers["error"].add(result)
                last = page[-1].line_no
            values: dict[str, Any] = {
                "status": final,
                "completed": writers["output"].lines,
                "failed": writers["error"].lines,
                "finalizing_at": now,
                f"{final}_at": now,
            }
            for kind, writer in writers.items():
                if not writer.lines:
                    continue
                await writer.close()
                # Always written, even past the owner's file limits (they are the batch's results); they count
                # toward them from now on, so uploads and new batches wait until the owner makes room.
                await conn.execute(
                    insert(files).values(
                        id=writer.file_id,
                        owner=row.owner,
                        purpose="batch_output",
                        filename=writer.filename,
                        bytes=writer.size,
                        created_at=now,
                        expires_at=expires,
                        content=b"",
                    )
                )
                values[f"{kind}_file_id"] = writer.file_id
            # The lines' results are in the files now: the table keeps only what live batches hold.
            await conn.execute(delete(batch_lines).where(mine))
            await conn.execute(update(batches).where(batches.c.id == batch_id).values(values))
            return final

    async def fail_batch(self, batch_id: str, now: float, errors: list[dict[str, Any]]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status.in_(LIVE))
                .values(status="failed", failed_at=now, errors=errors)
            )


class InputChanged(Exception):
    """A batch's input file read back differently from when it was checked (deleted or expired meanwhile)."""


class _FileWriter:
    """A generated file written as file_chunks of CHUNK_BYTES as its lines come (one chunk held at a time)."""

    def __init__(self, conn: AsyncConnection, file_id: str, filename: str) -> None:
        self.conn = conn
        self.file_id = file_id
        self.filename = filename
        self.lines = 0
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._seq = 0

    async def add(self, line: str) -> None:
        data = line.encode() + b"\n"
        self.lines += 1
        self.size += len(data)
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= CHUNK_BYTES:
            joined = b"".join(self._pending)
            full = len(joined) - len(joined) % CHUNK_BYTES
            for start in range(0, full, CHUNK_BYTES):
                await self._write(joined[start : start + CHUNK_BYTES])
            rest = joined[full:]
            self._pending = [rest] if rest else []
            self._pending_size = len(rest)

    async def close(self) -> None:
        if self._pending:
            await self._write(b"".join(self._pending))
            self._pending = []
            self._pending_size = 0

    async def _write(self, data: bytes) -> None:
        await self.conn.execute(insert(file_chunks).values(file_id=self.file_id, seq=self._seq, data=data))
        self._seq += 1


class RowView:
    """A dict read like a result row (for objects built before they were read back)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def _param(name: str) -> Any:
    return bindparam(name)


def _live(now: float) -> Any:
    """Files not expired at `now`: an expired file is gone for readers before the sweep deletes it."""
    return or_(files.c.expires_at.is_(None), files.c.expires_at > now)
