"""Review of the Batch API's bounds (findings A-D): creating a batch holds neither its file nor its lines
and is bounded per principal (creations in progress, batches not ended, the requests they hold); output
and error files are written in chunks and count toward their owner's file limits; an upload's form takes
only the fields the API defines; control characters never reach a text column (PostgreSQL refused NUL:
500s); a spool that cannot be written is the gateway's error (507), not a malformed body, and an upload
that ends early leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import resource
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest
from conftest import scratch_postgres
from procs import (
    Proc,
    gateway_config,
    http_post,
    new_key,
    openai_client,
    start_gateway,
    wait_ended,
    wait_until,
)

MIB = 1024 * 1024


def _jsonl(n: int, *, pad: int = 0, id_pad: int = 0, model: str = "m") -> bytes:
    items = [
        {
            "custom_id": f"req-{i}-" + "i" * id_pad,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "x" * pad + str(i)}], "max_tokens": 4},
        }
        for i in range(n)
    ]
    return b"\n".join(orjson.dumps(x) for x in items) + b"\n"


SDK_TIMEOUT_S = 120  # uploads of tens of MiB on a busy machine


def _upload(client: openai.OpenAI, content: bytes, **options: Any) -> Any:
    return client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch", **options)


def _create(client: openai.OpenAI, file_id: str, **options: Any) -> Any:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **options
    )


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux: "reset the peak RSS")
    return _rss(pid)[0]


def _db(gw: Proc) -> sqlite3.Connection:
    return sqlite3.connect(gw.database_url.split("///", 1)[1])


def _not_now() -> dict[str, str]:
    """An off-peak window two hours from now (UTC): with in_peak never, the runner runs no line (it still
    ends cancelled batches)."""
    hour = time.gmtime().tm_hour
    return {"days": "daily", "from": f"{(hour + 2) % 24:02d}:00", "to": f"{(hour + 3) % 24:02d}:00", "tz": "UTC"}


def _held_config(sim: Proc, **batch: Any) -> dict[str, Any]:
    return gateway_config(
        {"m": [sim.url]},
        scheduling={"off_peak": [_not_now()]},
        batch={"poll_s": 0.1, "in_peak": "never", **batch},
    )


@pytest.fixture(scope="module")
def held(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """The default limits; batches are accepted and wait (nothing runs), cancelled ones end."""
    proc = start_gateway(_held_config(sim), module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tight(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """Small per-owner limits: 3 batches not ended holding 5 requests in all, 16 KiB of files."""
    cfg = _held_config(sim, max_live_batches_per_owner=3, max_queued_lines_per_owner=5, max_bytes_per_owner=16384)
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


# -- A: creating a batch -------------------------------------------------------------------------


def test_creating_a_batch_holds_neither_its_file_nor_its_lines(held: Proc) -> None:
    """A batch of a 50 MiB file (40,000 requests) is created with the gateway's peak RSS growing by a
    bounded few MiB (the build before held every line and the rows built from them at once), all its lines
    stored; a file whose last line is wrong is refused whole, naming that line, with no line stored."""
    client = openai_client(held, new_key(held, user="creator"), timeout=SDK_TIMEOUT_S)
    pid = held.popen.pid
    _create(client, _upload(client, _jsonl(10)).id)  # warm: imports, statements, connections
    content = _jsonl(40_000, pad=1_160)
    assert 49 * MIB < len(content) < 51 * MIB
    file = _upload(client, content)
    base = _reset_peak(pid)
    batch = _create(client, file.id)
    growth = _rss(pid)[1] - base
    print(f"creating a batch of {len(content) / MIB:.1f} MiB: peak RSS +{growth / MIB:.1f} MiB")
    assert batch.status == "in_progress" and batch.request_counts.total == 40_000
    assert growth < 24 * MIB, f"the gateway's peak RSS grew by {growth / MIB:.1f} MiB to create one batch"
    with _db(held) as db:
        assert db.execute("SELECT count(*) FROM batch_lines WHERE batch_id = ?", (batch.id,)).fetchone()[0] == 40_000

    bad = content + b'{"custom_id": "last", "method": "GET"}\n'
    failed = _create(client, _upload(client, bad).id)
    assert failed.status == "failed", failed
    assert [(e.line, e.code) for e in failed.errors.data] == [(40_001, "invalid_method")]
    with _db(held) as db:
        assert db.execute("SELECT count(*) FROM batch_lines WHERE batch_id = ?", (failed.id,)).fetchone()[0] == 0
    client.batches.cancel(batch.id)
    wait_ended(client, batch.id)


def _stalled_create(gw: Proc, key: str) -> socket.socket:
    """A POST /v1/batches whose headers are sent and whose body never comes."""
    sock = socket.create_connection(("127.0.0.1", gw.port))
    head = (
        "POST /v1/batches HTTP/1.1\r\nhost: x\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{"
    )
    sock.sendall(head.encode())
    return sock


def test_batch_creations_in_progress_are_bounded_per_principal(held: Proc) -> None:
    """Each creation reads its whole input file: a principal gets 2 at once (the default); the next is
    refused with 429 while they last, and accepted once they end. (The build before had no limit.)"""
    key = new_key(held, user="eager")
    client = openai_client(held, key, timeout=SDK_TIMEOUT_S)
    good = _upload(client, _jsonl(2)).id
    bad = _upload(client, b'{"custom_id": "1", "method": "GET"}\n').id  # (its batches fail: none stays live)
    stalled = [_stalled_create(held, key) for _ in range(2)]

    def refill() -> None:
        """A stalled request that got an answer (refused, because one of ours was in progress when it came)
        no longer counts: open another in its place."""
        for i, sock in enumerate(stalled):
            sock.setblocking(False)
            try:
                sock.recv(1)
            except BlockingIOError:
                continue  # no answer: still in progress
            sock.close()
            stalled[i] = _stalled_create(held, key)

    def refused() -> bool:
        refill()
        try:
            _create(client, bad)
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "too_many_batch_creations", exc.body
            return True
        return False

    try:
        wait_until(refused, timeout=10, interval=0.05, what="a creation beyond 2 in progress to be refused")
    finally:
        for sock in stalled:
            sock.close()

    def accepted() -> bool:
        try:
            return _create(client, good).status == "in_progress"
        except openai.RateLimitError:
            return False

    wait_until(accepted, timeout=10, what="creations to be accepted once the stalled ones ended")


def test_batches_not_ended_and_their_requests_are_bounded_per_owner(tight: Proc) -> None:
    """With 3 batches not ended and 5 requests in them at most: past either, 429 naming which (400 for a
    file larger than the limit alone); an ended batch makes room; another owner is not affected."""
    client = openai_client(tight, new_key(tight, user="busy"), timeout=SDK_TIMEOUT_S)
    two, one, six = (_upload(client, _jsonl(n)).id for n in (2, 1, 6))
    with pytest.raises(openai.BadRequestError) as too_big:
        _create(client, six)
    assert too_big.value.body["code"] == "too_many_queued_requests", too_big.value.body
    assert too_big.value.body["param"] == "input_file_id"
    first = _create(client, two)
    _create(client, two)  # 4 requests held
    with pytest.raises(openai.RateLimitError) as info:
        _create(client, two)
    assert info.value.body["code"] == "too_many_queued_requests", info.value.body
    _create(client, one)  # 5 requests, 3 batches
    with pytest.raises(openai.RateLimitError) as info:
        _create(client, one)
    assert info.value.body["code"] == "too_many_batches", info.value.body

    neighbour = openai_client(tight, new_key(tight, user="neighbour"), timeout=SDK_TIMEOUT_S)
    assert _create(neighbour, _upload(neighbour, _jsonl(2)).id).status == "in_progress"

    client.batches.cancel(first.id)
    assert wait_ended(client, first.id).status == "cancelled"
    assert _create(client, one).status == "in_progress"  # 4 requests in 3 batches again


def test_output_and_error_files_count_toward_the_owners_limits(tight: Proc) -> None:
    """Output and error files are always written whole, and count: once they put the owner over the
    16 KiB of files, uploads and new batches are refused until the owner deletes some. (The build before
    counted input files only: it let the owner create and cancel batches, each writing an error file the
    size of its input, without end.)"""
    client = openai_client(tight, new_key(tight, user="outputs"), timeout=SDK_TIMEOUT_S)
    file = _upload(client, _jsonl(5, id_pad=480))
    assert 3000 < file.bytes < 4000
    error_files = []
    for _ in range(10):
        try:
            batch = _create(client, file.id)
        except openai.BadRequestError as exc:
            assert exc.body["code"] == "file_quota_exceeded" and exc.body["param"] == "input_file_id", exc.body
            break
        client.batches.cancel(batch.id)
        ended = wait_ended(client, batch.id)
        assert ended.status == "cancelled" and ended.request_counts.failed == 5
        lines = [orjson.loads(x) for x in client.files.content(ended.error_file_id).text.splitlines()]
        assert [x["error"]["code"] for x in lines] == ["batch_cancelled"] * 5
        error_files.append(ended.error_file_id)
    else:
        pytest.fail("the owner's error files grew past their file limits and batches were still accepted")
    stored = orjson.loads(client.files.with_raw_response.list().text)["data"]
    assert sum(f["bytes"] for f in stored) > 16384  # (written in full past the limit: they are results)
    with pytest.raises(openai.APIStatusError) as info:
        _upload(client, _jsonl(1))
    assert info.value.status_code == 413 and info.value.body["code"] == "file_quota_exceeded", info.value.body
    for file_id in error_files[:2]:
        client.files.delete(file_id)
    assert _upload(client, _jsonl(1)).id
    assert _create(client, file.id).status == "in_progress"


def test_a_batch_end_writes_its_files_in_chunks(held: Proc) -> None:
    """Cancelling a batch of 40,000 requests writes a ~25 MiB error file in 1 MiB chunks, with the
    gateway's peak RSS growing by a bounded few MiB (the build before built every error line, then the
    whole file, in memory, and stored it as one value); its lines are deleted once in the files, and the
    file downloads whole."""
    client = openai_client(held, new_key(held, user="canceller"), timeout=SDK_TIMEOUT_S)
    pid = held.popen.pid
    content = _jsonl(40_000, id_pad=480)
    batch = _create(client, _upload(client, content).id)
    assert batch.request_counts.total == 40_000
    base = _reset_peak(pid)
    client.batches.cancel(batch.id)
    ended = wait_ended(client, batch.id)
    growth = _rss(pid)[1] - base
    print(f"ending a batch of 40,000 lines: peak RSS +{growth / MIB:.1f} MiB")
    assert ended.status == "cancelled" and ended.request_counts.failed == 40_000
    info = client.files.retrieve(ended.error_file_id)
    assert 20 * MIB < info.bytes < 30 * MIB
    assert growth < 24 * MIB, f"the gateway's peak RSS grew by {growth / MIB:.1f} MiB to end one batch"
    with _db(held) as db:
        inline = db.execute("SELECT length(content) FROM files WHERE id = ?", (info.id,)).fetchone()[0]
        chunks = db.execute("SELECT count(*) FROM file_chunks WHERE file_id = ?", (info.id,)).fetchone()[0]
        lines = db.execute("SELECT count(*) FROM batch_lines WHERE batch_id = ?", (batch.id,)).fetchone()[0]
    assert (inline, chunks, lines) == (0, -(-info.bytes // MIB), 0)
    text = client.files.content(info.id).content
    assert len(text) == info.bytes
    ids = [orjson.loads(x)["custom_id"] for x in text.splitlines()]
    assert ids == [f"req-{i}-" + "i" * 480 for i in range(40_000)]


def test_a_file_stored_whole_is_read_back_in_pieces(on_postgres: Proc) -> None:
    """A generated file of the build before (its bytes in one value, files.content) downloads in 1 MiB
    slices on PostgreSQL: peak RSS grows by a bounded few MiB, not by the file (the build before read the
    value whole). (SQLite materialises a value to slice it: there it is still read whole.)"""
    client = openai_client(on_postgres, new_key(on_postgres, user="legacy"), timeout=SDK_TIMEOUT_S)
    data = os.urandom(15 * MIB).hex().encode()  # 30 MiB

    async def insert() -> None:
        conn = await asyncpg.connect(on_postgres.database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(
                "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, expires_at, content) "
                "VALUES ('file-outlegacy', 'legacy', 'batch_output', 'old.jsonl', $1, $2, NULL, $3)",
                len(data),
                time.time(),
                data,
            )
        finally:
            await conn.close()

    asyncio.run(insert())
    pid = on_postgres.popen.pid
    client.files.content(_upload(client, _jsonl(1)).id)  # warm
    base = _reset_peak(pid)
    got = client.files.content("file-outlegacy").content
    growth = _rss(pid)[1] - base
    print(f"download of a 30 MiB inline file: peak RSS +{growth / MIB:.1f} MiB")
    assert got == data
    assert growth < 16 * MIB, f"the gateway's peak RSS grew by {growth / MIB:.1f} MiB for one download"


# -- B: the upload form --------------------------------------------------------------------------


def _raw_upload(gw: Proc, key: str, parts: bytes, *, declared: int) -> socket.socket:
    """An upload whose head declares `declared` body bytes and whose first `parts` are sent; the rest never
    comes. The answer, if the gateway gives one before the body ends, is readable from the socket."""
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.settimeout(30)
    head = (
        "POST /v1/files HTTP/1.1\r\nhost: x\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: multipart/form-data; boundary=b\r\n"
        f"content-length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + parts)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The status and error of the one answer on `sock`, read by its framing (not to the close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    if b"content-length" in headers:
        while len(body) < int(headers[b"content-length"]):
            body += _recv(sock)
    else:  # chunked: the last chunk is empty
        while not body.endswith(b"0\r\n\r\n"):
            body += _recv(sock)
        pieces, rest = [], body
        while (size := int(rest.split(b"\r\n", 1)[0], 16)) > 0:
            rest = rest.split(b"\r\n", 1)[1]
            pieces.append(rest[:size])
            rest = rest[size + 2 :]
        body = b"".join(pieces)
    return int(head.split()[1]), orjson.loads(body)["error"]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the gateway closed the connection without an answer")
    return data


def _field(name: str, value: bytes) -> bytes:
    return f'--b\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"


def test_a_form_field_the_api_does_not_define_is_refused_when_it_begins(held: Proc) -> None:
    """Only purpose, file and expires_after[...] are taken: another field is refused with 400 naming it as
    soon as its part's headers arrive, before the 100 MiB the request declares (the build before kept every
    distinct field up to the body limit: 1,600 fields of 60 KB each took 85 MiB per upload); so is a field
    given twice."""
    key = new_key(held, user="fields")
    for parts, param in (
        (_field("purpose", b"batch") + b'--b\r\ncontent-disposition: form-data; name="padding-1"\r\n\r\n', "padding-1"),
        (_field("purpose", b"batch") + _field("purpose", b"batch"), "purpose"),
    ):
        sock = _raw_upload(held, key, parts, declared=100 * MIB)
        try:
            status, error = _answer(sock)
        finally:
            sock.close()
        assert status == 400 and error["param"] == param, (status, error)
        assert error["type"] == "invalid_request_error"


def test_a_wrong_purpose_is_refused_before_the_file_is_read(held: Proc) -> None:
    """The SDKs send purpose before file: a purpose other than 'batch' is refused when its field ends, not
    after the file that follows was spooled (the build before read the whole body first)."""
    key = new_key(held, user="purposeful")
    parts = _field("purpose", b"fine-tune") + (
        b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n' + _jsonl(100)
    )
    sock = _raw_upload(held, key, parts, declared=50 * MIB)
    try:
        status, error = _answer(sock)
    finally:
        sock.close()
    assert (status, error["param"], error["code"]) == (400, "purpose", "invalid_value"), error


def test_expires_after_is_taken_as_openai_defines_it(held: Proc) -> None:
    """expires_after (anchor created_at, 1 hour to 30 days) sets the file's expiry, within batch.file_ttl_s;
    a value out of its bounds is refused naming it. (The build before ignored it: 30 days whatever was
    asked.)"""
    client = openai_client(held, new_key(held, user="expiring"), timeout=SDK_TIMEOUT_S)
    file = _upload(client, _jsonl(1), expires_after={"anchor": "created_at", "seconds": 3600})
    assert file.expires_at is not None and file.expires_at - file.created_at == 3600
    with pytest.raises(openai.BadRequestError) as info:
        _upload(client, _jsonl(1), expires_after={"anchor": "created_at", "seconds": 60})
    assert info.value.body["param"] == "expires_after[seconds]", info.value.body
    for anchor, seconds, param in (
        (b"created_at", b"0000000003600000", "expires_after[seconds]"),
        (b"now", b"3600", "expires_after[anchor]"),
    ):
        body = (
            _field("purpose", b"batch")
            + _field("expires_after[anchor]", anchor)
            + _field("expires_after[seconds]", seconds)
            + b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
            + _jsonl(1)
            + b"\r\n--b--\r\n"
        )
        status, raw = http_post(
            held.url + "/v1/files", body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert status == 400 and orjson.loads(raw)["error"]["param"] == param, (status, raw)


# -- C: control characters, on PostgreSQL --------------------------------------------------------


@pytest.fixture(scope="module")
def on_postgres(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    with scratch_postgres("portcullis_batch_limits") as database_url:
        cfg = _held_config(sim)
        cfg["store"]["database_url"] = re.sub(r"^postgresql://", "postgresql+asyncpg://", database_url)
        proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
        try:
            yield proc
        finally:
            proc.stop()


def test_a_custom_id_with_a_control_character_is_refused_naming_its_line(on_postgres: Proc) -> None:
    """A custom_id holding NUL fails the file at its line (the build before stored it: PostgreSQL refused
    the NUL, a 500); a request body's NULs (metadata) are dropped when it is parsed, as in every request."""
    client = openai_client(on_postgres, timeout=SDK_TIMEOUT_S)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    items = [
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
        for custom_id in ("ok", "a\u0000b")
    ]
    file = _upload(client, b"\n".join(orjson.dumps(x) for x in items) + b"\n")
    batch = _create(client, file.id)
    assert batch.status == "failed"
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(2, "invalid_custom_id", "custom_id")]
    ok = _create(client, _upload(client, _jsonl(1)).id, metadata={"note": "a\u0000b"})
    assert client.batches.retrieve(ok.id).metadata == {"note": "ab"}  # (every JSON body's NULs are dropped)


def test_a_file_name_with_a_control_character_is_refused(on_postgres: Proc) -> None:
    """A NUL (or any control character) in the file part's name is a 400 naming the file (the build before
    stored it: a 500 on PostgreSQL)."""
    for name in (b"a\x00b.jsonl", b"a\x1b[2J.jsonl"):
        body = (
            _field("purpose", b"batch")
            + b'--b\r\ncontent-disposition: form-data; name="file"; filename="'
            + name
            + b'"\r\n\r\n'
            + _jsonl(1)
            + b"\r\n--b--\r\n"
        )
        status, raw = http_post(
            on_postgres.url + "/v1/files", body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert status == 400 and orjson.loads(raw)["error"]["param"] == "file", (status, raw)


def test_batch_fields_that_are_stored_are_bounded(on_postgres: Proc) -> None:
    """completion_window is stored as checked (the build before stored it with the white space around it:
    past the column's 16 characters, a 500 on PostgreSQL); metadata keys and values are held to OpenAI's 64 and 512
    characters (the build before took any length)."""
    client = openai_client(on_postgres, timeout=SDK_TIMEOUT_S)
    file = _upload(client, _jsonl(1))
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h" + "\n" * 20,  # type: ignore[arg-type]
    )
    assert batch.completion_window == "24h"
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, file.id, metadata={"note": "x" * 513})
    assert info.value.body["param"] == "metadata", info.value.body


# -- D: the spool --------------------------------------------------------------------------------


def test_a_spool_that_cannot_grow_is_the_gateways_error_not_a_bad_body(
    sim: Proc, module_tmp: Path, reaper: Any
) -> None:
    """With the gateway's files held to 6 MiB (RLIMIT_FSIZE: what a full disk looks like to a writer), an
    8 MiB upload gets 507 insufficient_storage in the OpenAI shape, logged (the build before answered 400
    "The multipart body is malformed: [Errno 27] File too large"); the spool is released and the next,
    smaller, upload is stored."""
    spool = module_tmp / "small-spool"
    spool.mkdir()
    gw = reaper(start_gateway(_held_config(sim, spool_dir=str(spool)), module_tmp, ready_path="/readyz"))
    client = openai_client(gw, timeout=SDK_TIMEOUT_S)
    resource.prlimit(gw.popen.pid, resource.RLIMIT_FSIZE, (6 * MIB, 6 * MIB))
    with pytest.raises(openai.APIStatusError) as info:
        _upload(client, _jsonl(6_000, pad=1_300))
    assert info.value.status_code == 507, info.value.body
    assert info.value.body["code"] == "insufficient_storage" and info.value.body["type"] == "server_error"
    wait_until(lambda: "upload_spool_failed" in gw.log(), timeout=10, what="the spool failure's log line")
    assert _spool_files(gw, spool) == []
    assert _upload(client, _jsonl(2)).bytes > 0


def _spool_files(gw: Proc, spool: Path) -> list[str]:
    """The gateway's open files in the spool directory (an anonymous spool file shows as '<dir>/#<inode>
    (deleted)')."""
    fds = Path(f"/proc/{gw.popen.pid}/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue  # (closed meanwhile)
    return [t for t in targets if t.startswith(str(spool))]


def test_an_upload_cut_off_midway_leaves_nothing_behind(sim: Proc, module_tmp: Path, reaper: Any) -> None:
    """A client that goes away mid-upload (3 MiB of a declared 20 MiB sent) leaves no spool file open and
    no file row or chunk stored."""
    spool = module_tmp / "cut-spool"
    spool.mkdir()
    gw = reaper(start_gateway(_held_config(sim, spool_dir=str(spool)), module_tmp, ready_path="/readyz"))
    key = new_key(gw, user="quitter")
    parts = _field("purpose", b"batch") + (
        b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n' + _jsonl(2_400, pad=1_160)
    )
    sock = _raw_upload(gw, key, parts, declared=20 * MIB)
    try:
        wait_until(lambda: _spool_files(gw, spool) != [], what="the upload's spool file")
    finally:
        sock.close()
    wait_until(lambda: _spool_files(gw, spool) == [], what="the spool file to be released")
    assert list(spool.iterdir()) == []
    with _db(gw) as db:
        assert db.execute("SELECT count(*) FROM files WHERE owner = 'quitter'").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM file_chunks").fetchone()[0] == 0
