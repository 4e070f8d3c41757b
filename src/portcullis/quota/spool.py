"""The usage spool: every usage record in a local append-only file before it is queued for the database.

The in-memory queue is written to the database in batches, about once a second; a process killed in
between (SIGKILL, OOM, a crash) would take those records with it, and while the database is away the
queue holds far more. So each record is first appended to this process's spool file, one JSON line, with
one `write` (the kernel keeps it when the process dies; it is not fsynced, so a power cut of the machine
may still lose the last records). Once a batch is in the database its lines are no longer needed: a
segment of the spool whose records are all written is deleted (the current one is emptied).

Each process holds an exclusive `flock` on its own files for as long as it lives. A file in the spool
folder whose lock can be taken belongs to a process that is gone: an *orphan*. The writer replays
orphans into the database (in batches, records that are already there replaced by their copy, so a
replay that is cut short and done again counts nothing twice) and deletes them. Processes of one gateway
share the folder (`serve --workers N`, or a restart on the same host), so whoever starts next replays
what the dead one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

# A segment that passed this size is closed at the next write to the database, so segments whose records are
# all written go away under steady load too (and a replay after a crash re-reads little that is written).
_SEGMENT_BYTES = 1024 * 1024
_PREFIX, _SUFFIX = "usage-", ".spool"


def default_spool_dir(database_url: str) -> Path:
    """Beside a SQLite file; for a database server, a folder of this user's state per database."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1] if ":///" in database_url else "portcullis.db"
        return Path(path).resolve().with_name(Path(path).name + ".usage-spool")
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return state / "portcullis" / "usage-spool" / digest


class _Segment:
    __slots__ = ("end", "fd", "path", "size")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0
        self.end: int | None = None  # the index after its last record, once a newer segment took over


class UsageSpool:
    def __init__(self, directory: Path, *, segment_bytes: int = _SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.appended = 0  # records given an index (every queued record, written to the file or not)
        self.done = 0  # records known to be in the database
        self._segments: deque[_Segment] = deque()
        self._tag = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._pending: list[bytes] = []  # appended this turn of the loop, written at the next (append)
        self.unwritten = 0  # records whose write failed (queued, but lost if the process dies)
        self._serial = 0

    def open(self) -> None:
        """Create the folder and this process's first segment (raises OSError when it cannot)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._segments.append(self._new_segment())

    def _new_segment(self) -> _Segment:
        """A new file, locked before it takes the name other processes look for (an unlocked file of that
        name would be an orphan to them)."""
        self._serial += 1
        name = f"{_PREFIX}{self._tag}-{self._serial}{_SUFFIX}"
        hidden = self.directory / f".{name}.new"
        fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, self.directory / name)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                hidden.unlink()
            raise
        return _Segment(self.directory / name, fd)

    # -- the request path -------------------------------------------------------------------------

    def append(self, row: tuple[Any, ...]) -> bool:
        """Spool one record (it is queued next, whatever happens here); False when it could not be.

        The records of one turn of the event loop go out in one `write`, at the start of the next turn (a
        write per record was a system call per request, ~3% of the gateway's CPU). A process killed within
        that turn loses them, as it would lose a record made a moment later; the batch to the database comes
        about a second after."""
        self.appended += 1
        if not self._segments:  # closed
            return False
        try:
            data = orjson.dumps(row)
        except TypeError:  # a string JSON cannot hold (a lone surrogate): never the request's failure
            return False
        pending = self._pending
        pending.append(data)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a tool, a test): at once
                self.flush()
        return True

    def flush(self) -> None:
        """Write what was appended since the last flush (a failure is counted in `unwritten`)."""
        pending = self._pending
        if not pending or not self._segments:
            return
        count = len(pending)
        pending.append(b"")  # (the last line's newline)
        data = b"\n".join(pending)
        pending.clear()
        current = self._segments[-1]
        try:
            os.write(current.fd, data)
        except OSError:
            self.unwritten += count  # a full disk: the records are still queued, only not crash-safe
            return
        current.size += len(data)

    # -- the writer ---------------------------------------------------------------------------------

    def written(self, count: int) -> None:
        """The oldest `count` queued records are in the database now."""
        self.flush()  # (before any truncation below: what is pending belongs in the current segment)
        self.done += count
        segments = self._segments
        if not segments:
            return
        current = segments[-1]
        if self.done == self.appended and current.size:
            with contextlib.suppress(OSError):
                os.ftruncate(current.fd, 0)  # appends (O_APPEND) go on at the new end
                current.size = 0
        elif current.size >= self.segment_bytes:
            with contextlib.suppress(OSError):  # else: keep appending to this one
                segments.append(self._new_segment())
                current.end = self.appended
        while len(segments) > 1 and segments[0].end is not None and segments[0].end <= self.done:
            _remove(segments.popleft())

    def orphans(self) -> Iterator[tuple[Path, int]]:
        """Spool files of processes that are gone, each locked for the caller (who removes it when done)."""
        mine = {s.path for s in self._segments}
        for path in sorted(self.directory.glob(f"{_PREFIX}*{_SUFFIX}")):
            if path in mine:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # removed meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live process's
                continue
            yield path, fd

    def close(self) -> None:
        """At shutdown: files holding nothing unwritten go; the rest stay for the next process to replay."""
        self.flush()
        everything_written = self.done == self.appended
        while self._segments:
            segment = self._segments.popleft()
            if everything_written or segment.size == 0:
                _remove(segment)
            else:
                os.close(segment.fd)
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # only when empty


def read_orphan(fd: int, batch: int, width: int) -> Iterator[tuple[list[tuple[Any, ...]], int]]:
    """An orphan's records in batches, each with how many lines could not be read (a torn last line, or a
    record of another width: written by another version)."""
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)
        rows: list[tuple[Any, ...]] = []
        bad = 0
        for line in f:
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, list) or len(row) != width:
                bad += 1
                continue
            rows.append(tuple(row))
            if len(rows) >= batch:
                yield rows, bad
                rows, bad = [], 0
        if rows or bad:
            yield rows, bad


def remove_orphan(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)


def set_aside(path: Path, fd: int) -> Path:
    """An orphan the database keeps refusing: renamed out of the way (kept for a human), never retried."""
    aside = path.with_name(path.name + ".bad")
    with contextlib.suppress(OSError):
        path.rename(aside)
    os.close(fd)
    return aside


def _remove(segment: _Segment) -> None:
    with contextlib.suppress(OSError):
        segment.path.unlink()
    os.close(segment.fd)
