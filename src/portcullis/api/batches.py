"""The Batch API, OpenAI-compatible, run on this gateway's own backends (jobs/).

    POST   /v1/files                  upload a JSONL file (multipart, purpose "batch")
    GET    /v1/files                  the caller's files; /v1/files/{id}; /v1/files/{id}/content
    DELETE /v1/files/{id}
    POST   /v1/batches                {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches                the caller's batches (limit, after); /v1/batches/{id}
    POST   /v1/batches/{id}/cancel

Every route needs the `batches:write` scope. Files and batches belong to the user who created them;
a principal with `admin:read` may read anyone's. A batch is validated whole when it is created (each
line: JSON, a unique custom_id, POST to the batch's endpoint, a body the endpoint accepts, one model the
caller may use, and the scope the endpoint's route needs: `batches:write` alone runs nothing); a file with
errors gives a `failed` batch listing them with their line numbers, as OpenAI does. A valid batch is
`in_progress` at once and its lines wait for the runner (which checks the scope and the model again, as
the key is when the line runs).

Uploads are bounded per principal (files and bytes stored, output files included; uploads in progress)
and never held whole in memory: the file part is checked line by line as it arrives, spooled to an
anonymous temporary file (gone with its descriptor, whatever ends the upload), and stored in chunks
(jobs/store.py). The form takes only the fields the API defines. Files past their expiry are gone for
readers at once and deleted by the runner's sweep.

Creating a batch is bounded the same way: per principal, creations in progress, batches not ended and the
requests they hold; its input file is read twice, chunk by chunk (a first pass validates, a second inserts
the lines in groups), so no creation holds the file's lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from portcullis.api.common import query_int, query_params, read_model
from portcullis.config import BatchConfig
from portcullis.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge, TooManyRequests
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity import scopes
from portcullis.identity.auth import may_use
from portcullis.identity.principal import Principal
from portcullis.jobs.store import BatchStore, InputChanged, RowView, batch_object, file_object
from portcullis.safety import validation

if TYPE_CHECKING:
    from portcullis.config import Config
    from portcullis.jobs.runner import BatchRunner
    from portcullis.routing.catalog import Catalog


@dataclass(frozen=True, slots=True)
class BatchDeps:
    """What the files and batches handlers use."""

    config: Config
    catalog: Catalog
    batch_store: BatchStore | None  # None: batches are off
    batch_runner: BatchRunner | None
    scope_of: Callable[[str], str]  # the scope a client needs for an endpoint (the route table's)
    log: Any


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_VALIDATORS = {
    "/v1/chat/completions": validation.validate_chat,
    "/v1/completions": validation.validate_completion,
    "/v1/embeddings": validation.validate_embedding,
}
# ASCII digits, at most 9 (int() refuses over 4300 digits: a 5000-digit window was a 500); \Z, not $.
_WINDOW = re.compile(r"^([0-9]{1,9})([smhd])\Z")
_WINDOW_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_ERRORS = 100  # errors listed for a file that failed validation
_SPOOL_FLUSH = 1024 * 1024  # bytes of an upload held in memory before they are written to its spool file
# The form of an upload: these fields and no other (OpenAI's Files API, as its SDK sends them: `purpose`,
# `expires_after[...]`, then `file`). Anything else is refused when its part's headers arrive, so no field
# is kept that the API does not use.
_FORM_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]", "file")
_FIELDS_LIMIT = 1024  # bytes of all the fields other than the file together (their values are words)
_HEADERS_LIMIT = 16 * 1024  # bytes of all the parts' headers together
_FORM_ROOM = 64 * 1024  # what the form may add to its file: boundaries, headers and the fields above
# OpenAI's bounds of `expires_after[seconds]` (1 hour to 30 days).
_EXPIRES_MIN_S, _EXPIRES_MAX_S = 3600, 2_592_000
# Control characters (C0, DEL, C1): refused in a custom_id and a file name, which are stored as text
# (PostgreSQL refuses NUL in text: it was a 500) and shown back in JSON and headers.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Errors of the spool's storage that mean "no room", not "broken".
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NewBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str
    completion_window: str = Field(max_length=64)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's bounds: keys up to 64 characters, values up to 512 (a batch row is kept after it ends).
        # (NULs never get here: the JSON body's parse drops them, as for every JSON request.)
        for key, item in (value or {}).items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return value


def _store(api: BatchDeps) -> BatchStore:
    if api.batch_store is None:
        raise NotFound("The Batch API is not enabled on this gateway.", code="not_found")
    return api.batch_store


def _owner(ex: Exchange) -> str:
    assert ex.principal is not None
    return ex.principal.user


def _may_read(ex: Exchange, owner: str) -> bool:
    principal = ex.principal
    return principal is not None and (principal.user == owner or scopes.ADMIN_READ in principal.scopes)


def _limit(query: dict[str, str]) -> int:
    return query_int(query, "limit", 20, 1, 100)


# -- files ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_more(counts: dict[str, int], owner: str, limit: int, what: str, code: str) -> Iterator[None]:
    """One more of `what` in progress for `owner` (in this process) while the block runs; past `limit`, 429."""
    in_progress = counts.get(owner, 0)
    if in_progress >= limit:
        raise TooManyRequests(
            f"You have {in_progress} {what} in progress, the most allowed at once; retry when one ends.",
            code=code,
            headers={"retry-after": "1"},
        )
    counts[owner] = in_progress + 1
    try:
        yield
    finally:
        left = counts.get(owner, 1) - 1
        if left > 0:
            counts[owner] = left
        else:
            counts.pop(owner, None)


async def upload_file(api: BatchDeps, req: Request, ex: Exchange) -> None:
    store = _store(api)
    config = api.config.batch
    owner = _owner(ex)
    # Uploads in progress per principal: each one holds a spool file and a request; the stored-bytes
    # quota below only sees finished uploads, so this is what bounds a burst of parallel ones.
    with _one_more(store.uploading, owner, config.max_uploads_in_progress, "uploads", "too_many_uploads"):
        count, used = await store.usage(owner, time.time())
        _check_quota(config, count, used, 0)
        room = min(config.max_file_bytes, config.max_bytes_per_owner - used)
        spool: IO[bytes] = await _spool_io(
            api, tempfile.TemporaryFile, dir=config.spool_dir, prefix="portcullis-upload-"
        )
        try:
            check = _JsonlCheck(config.max_lines, api.config.server.max_body_bytes)
            form = await _read_form(api, req, room + _FORM_ROOM, spool=spool, check=check, file_limit=room)
            _check_purpose(form.get("purpose", b""))
            if check.size < 0:
                raise InvalidRequest("The form has no 'file' part.", param="file", code="missing_required_parameter")
            if check.count == 0:
                raise InvalidRequest("The file has no requests.", param="file", code="empty_file")
            ttl = _ttl(config, form)
            size = check.size
            await _spool_io(api, spool.seek, 0)
            record = await store.store_upload(
                file_id="file-" + secrets.token_hex(12),
                owner=owner,
                filename=(check.filename or "input.jsonl")[:512],
                read=lambda n: _spool_io(api, spool.read, n),
                size=size,
                expires_at=time.time() + ttl if ttl is not None else None,
                check=lambda files_now, bytes_now: _check_quota(config, files_now, bytes_now, size),
            )
        finally:
            # (an anonymous file: closing it frees its storage, whatever ended the upload)
            await asyncio.to_thread(spool.close)
    await req.respond_json(200, record)


async def _spool_io(api: BatchDeps, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn` (an operation on an upload's spool) in a thread. Its storage failing is the gateway's trouble,
    not a bad request: logged, and 507 (no room: a full disk or a file-size limit) or 503 to the client."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except OSError as exc:
        api.log.error("upload_spool_failed", error=str(exc), errno=exc.errno)
        if exc.errno in _NO_ROOM:
            raise GatewayError(
                "The gateway has no room to receive this upload now; try again later.",
                status=507,
                type="server_error",
                code="insufficient_storage",
            ) from exc
        raise GatewayError(
            "The gateway could not store this upload now; try again later.",
            status=503,
            type="server_error",
            code="storage_unavailable",
        ) from exc


def _check_purpose(raw: bytes) -> None:
    purpose = raw.decode(errors="replace").strip()
    if purpose != "batch":
        raise InvalidRequest(
            f"'purpose' must be 'batch' here (got {purpose!r}); this gateway stores batch input files only.",
            param="purpose",
            code="invalid_value",
        )


def _ttl(config: BatchConfig, form: dict[str, bytes]) -> float | None:
    """How long the file lives: `expires_after` (anchor created_at, 1 hour to 30 days, as OpenAI), within
    the gateway's `batch.file_ttl_s`."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return config.file_ttl_s
    if anchor is None or seconds is None:
        missing = "expires_after[anchor]" if anchor is None else "expires_after[seconds]"
        raise InvalidRequest(
            f"'expires_after' needs both 'expires_after[anchor]' and 'expires_after[seconds]' (missing {missing!r}).",
            param=missing,
            code="missing_required_parameter",
        )
    ttl = float(_expires_seconds(seconds))
    return min(ttl, config.file_ttl_s) if config.file_ttl_s is not None else ttl


def _check_form_field(name: str, value: bytes) -> None:
    """A field's value, checked as soon as the field ends (before the file that follows it is read)."""
    if name == "purpose":
        _check_purpose(value)
    elif name == "expires_after[anchor]":
        if value.decode(errors="replace").strip() != "created_at":
            raise InvalidRequest("'expires_after[anchor]' must be 'created_at'.", param=name, code="invalid_value")
    elif name == "expires_after[seconds]":
        _expires_seconds(value)


def _expires_seconds(value: bytes) -> int:
    text = value.decode(errors="replace").strip()
    # (at most 8 ASCII digits before int(): the bounds are checked on the whole value)
    if not (0 < len(text) <= 8 and text.isascii() and text.isdigit() and _EXPIRES_MIN_S <= int(text) <= _EXPIRES_MAX_S):
        raise InvalidRequest(
            f"'expires_after[seconds]' must be a whole number of seconds from {_EXPIRES_MIN_S} to {_EXPIRES_MAX_S}.",
            param="expires_after[seconds]",
            code="invalid_value",
        )
    return int(text)


def _check_quota(config: BatchConfig, files_stored: int, bytes_stored: int, adding: int) -> None:
    """Refuse an upload past the principal's stored files or bytes (`adding`: the new file's size, 0 before
    it is known)."""
    if files_stored >= config.max_files_per_owner:
        raise InvalidRequest(
            f"You store {files_stored} files, the most allowed ({config.max_files_per_owner}; your batches' "
            "output and error files count); delete some (DELETE /v1/files/{id}) or wait for them to expire.",
            param="file",
            code="file_quota_exceeded",
        )
    limit = config.max_bytes_per_owner
    if bytes_stored + adding > limit or (adding == 0 and bytes_stored >= limit):
        raise PayloadTooLarge(
            f"Your files would take more than the {limit} bytes you may store (stored now: {bytes_stored}; "
            "your batches' output and error files count); delete some or wait for them to expire.",
            param="file",
            code="file_quota_exceeded",
        )


class _JsonlCheck:
    """Checks a JSONL file as it arrives, line by line, so no whole file is ever held: UTF-8 JSON on each
    line, at most `max_lines` requests, no line over `max_line` bytes (a line is one request body, and a
    body over the gateway's body cap could never run). Keeps the part's size and filename."""

    def __init__(self, max_lines: int, max_line: int) -> None:
        self.max_lines = max_lines
        self.max_line = max_line
        self.partial: list[bytes] = []
        self.partial_size = 0
        self.number = 0  # lines seen (1-based numbers in messages)
        self.count = 0  # requests (non-blank lines)
        self.size = -1  # bytes of the file part; -1: no file part yet
        self.filename: str | None = None

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            if self.partial:
                self.partial.append(piece)
                piece = b"".join(self.partial)
                self.partial.clear()
                self.partial_size = 0
            self._line(piece)
            start = end + 1
        if start < len(data):
            self.partial_size += len(data) - start
            if self.partial_size > self.max_line:
                self._too_long(self.number + 1)
            self.partial.append(data[start:])

    def finish(self) -> None:
        if self.partial:
            piece = b"".join(self.partial)
            self.partial.clear()
            self._line(piece)

    def _too_long(self, number: int) -> None:
        raise InvalidRequest(
            f"Line {number} of the file is longer than {self.max_line} bytes, the largest request body accepted.",
            param="file",
            code="invalid_file",
        )

    def _line(self, raw: bytes) -> None:
        self.number += 1
        if len(raw) > self.max_line:
            self._too_long(self.number)
        if not raw.strip():
            return
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(
                    f"Line {self.number} of the file is not UTF-8 text.", param="file", code="invalid_file"
                ) from exc
            reason = str(exc).split(": line ")[0]  # (orjson's position is within the line, not the file)
            raise InvalidRequest(
                f"Line {self.number} of the file is not valid JSON: {reason}.", param="file", code="invalid_file"
            ) from exc
        self.count += 1
        if self.count > self.max_lines:
            raise InvalidRequest(
                f"The file has more than {self.max_lines} requests, the most one batch may hold.",
                param="file",
                code="too_many_requests_in_file",
            )


async def _read_form(
    api: BatchDeps, req: Request, limit: int, *, spool: IO[bytes], check: _JsonlCheck, file_limit: int
) -> dict[str, bytes]:
    """A multipart/form-data upload, parsed as it arrives and never over `limit` bytes: the 'file' part is
    checked line by line and written to `spool` in pieces of at most _SPOOL_FLUSH bytes (memory stays
    bounded whatever the file's size); the other fields → {name: bytes}. Only the fields of _FORM_FIELDS,
    each once, are accepted (any other is refused when its headers arrive), their values and the parts'
    headers within _FIELDS_LIMIT and _HEADERS_LIMIT bytes in all; `purpose` is checked when it ends (before
    the file, in the order the SDKs send them), not after the file was read."""
    config = api.config.batch
    kind, params = parse_options_header(req.header(b"content-type") or b"")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Upload files as multipart/form-data with the fields 'purpose' and 'file'.",
            param="file",
            code="invalid_content_type",
        )
    fields: dict[str, bytes] = {}
    current: dict[str, Any] = {}
    header_field: list[bytes] = []
    header_value: list[bytes] = []
    pending: list[bytes] = []  # file bytes not yet in the spool
    pending_size = 0
    sizes = {"fields": 0, "headers": 0}

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, data=[], name=None, is_file=False)

    def count_header(size: int) -> None:
        sizes["headers"] += size
        if sizes["headers"] > _HEADERS_LIMIT:
            raise InvalidRequest(
                f"The form's part headers exceed {_HEADERS_LIMIT} bytes.", param="file", code="invalid_body"
            )

    def on_header_field(data: bytes, start: int, end: int) -> None:
        count_header(end - start)
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        count_header(end - start)
        header_value.append(data[start:end])

    def on_header_end() -> None:
        current["headers"][b"".join(header_field).lower()] = b"".join(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(current["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        if name not in _FORM_FIELDS:
            raise InvalidRequest(
                f"Unknown form field {name[:64]!r}: uploads take 'purpose', 'file' and optionally "
                "'expires_after[anchor]' and 'expires_after[seconds]'.",
                param=name[:64] or None,
                code="unknown_parameter",
            )
        if name in fields or (name == "file" and check.size >= 0):
            raise InvalidRequest(f"The form has more than one {name!r} field.", param=name, code="invalid_body")
        current["name"] = name
        if name == "file":
            filename = disposition.get(b"filename")
            check.filename = filename.decode(errors="replace") if filename is not None else None
            if check.filename is not None and _CONTROL.search(check.filename):
                raise InvalidRequest(
                    "The file's name must not contain control characters.", param="file", code="invalid_value"
                )
            check.size = 0
            current["is_file"] = True

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal pending_size
        piece = data[start:end]
        if current["is_file"]:
            if check.size + len(piece) > file_limit:
                raise PayloadTooLarge(
                    f"The file exceeds {file_limit} bytes: the limit per file is {config.max_file_bytes} "
                    f"and each principal may store {config.max_bytes_per_owner} bytes of files.",
                    param="file",
                    code="file_too_large" if file_limit == config.max_file_bytes else "file_quota_exceeded",
                )
            check.feed(piece)
            pending.append(piece)
            pending_size += len(piece)
            return
        sizes["fields"] += len(piece)
        if sizes["fields"] > _FIELDS_LIMIT:
            raise PayloadTooLarge(
                f"The form's fields other than the file exceed {_FIELDS_LIMIT} bytes.", param=current["name"]
            )
        current["data"].append(piece)

    def on_part_end() -> None:
        if current["is_file"]:
            check.finish()
            return
        value = fields[current["name"]] = b"".join(current["data"])
        _check_form_field(current["name"], value)  # now, not after the file that follows it was read

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )

    def parse(chunk: bytes | None) -> None:
        try:
            if chunk is None:
                parser.finalize()
            else:
                parser.write(chunk)
        except GatewayError:
            raise
        except Exception as exc:  # python_multipart's parse errors (the body's; storage is not touched here)
            raise InvalidRequest(f"The multipart body is malformed: {exc}", param="file", code="invalid_body") from exc

    # (the client going away ends the upload with ClientDisconnected, and the spool's storage failing with
    # _spool_io's error: neither is a malformed body)
    async for chunk in req.iter_body(limit):
        parse(chunk)
        if pending_size >= _SPOOL_FLUSH:
            data = b"".join(pending)
            pending.clear()
            pending_size = 0
            await _spool_io(api, spool.write, data)
    parse(None)
    if pending:
        await _spool_io(api, spool.write, b"".join(pending))
    return fields


async def list_files(api: BatchDeps, req: Request, ex: Exchange) -> None:
    query = query_params(req)
    limit = _limit(query)
    rows = await _store(api).list_files(_owner(ex), query.get("purpose"), limit + 1, query.get("after"))
    await req.respond_json(200, page([file_object(r) for r in rows[:limit]], more=len(rows) > limit))


async def _file(api: BatchDeps, ex: Exchange, file_id: str) -> Any:
    row = await _store(api).get_file(file_id)
    if row is None or not _may_read(ex, row.owner):
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return row


async def get_file(api: BatchDeps, req: Request, ex: Exchange, file_id: str) -> None:
    await req.respond_json(200, file_object(await _file(api, ex, file_id)))


async def file_content(api: BatchDeps, req: Request, ex: Exchange, file_id: str) -> None:
    """The file's bytes, streamed chunk by chunk as they are read (a download holds one chunk at a time)."""
    row = await _file(api, ex, file_id)
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", row.filename)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(row.bytes).encode()),
        (b"content-disposition", f'attachment; filename="{safe_name}"'.encode()),
    ]
    pieces = _store(api).iter_content(file_id)
    first = await anext(pieces, b"")  # (a database error here still gets its error answer)
    req.status = 200
    await req.send({"type": "http.response.start", "status": 200, "headers": req.response_headers + headers})
    await req.send({"type": "http.response.body", "body": first, "more_body": True})
    async for piece in pieces:
        await req.send({"type": "http.response.body", "body": piece, "more_body": True})
    await req.send({"type": "http.response.body", "body": b"", "more_body": False})


async def delete_file(api: BatchDeps, req: Request, ex: Exchange, file_id: str) -> None:
    row = await _file(api, ex, file_id)
    if row.owner != _owner(ex):
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    await _store(api).delete_file(file_id)
    await req.respond_json(200, {"id": file_id, "object": "file", "deleted": True})


# -- batches -------------------------------------------------------------------------------------


async def create_batch(api: BatchDeps, req: Request, ex: Exchange) -> None:
    store = _store(api)
    config = api.config.batch
    principal = ex.principal
    assert principal is not None
    owner = principal.user
    # Creations in progress per principal (counted from before the body is read, as uploads are): each
    # reads its input file, up to max_file_bytes, twice and writes its lines.
    limit = config.max_creations_in_progress
    with _one_more(store.creating, owner, limit, "batch creations", "too_many_batch_creations"):
        row = await _create_batch(api, store, req, ex, principal)
    if api.batch_runner is not None and row["status"] == "in_progress":
        api.batch_runner.wake()
    api.log.info("batch_created", batch_id=row["id"], user=owner, lines=row["total"], status=row["status"])
    await req.respond_json(200, batch_object(RowView(row)))


async def _create_batch(api: BatchDeps, store: BatchStore, req: Request, ex: Exchange, principal: Principal) -> Any:
    config = api.config.batch
    spec = await read_model(api.config, req, NewBatch)
    if spec.endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint", code="invalid_value"
        )
    completion_window = spec.completion_window.strip()  # (stored as checked: the column holds 16 characters)
    window = _window_s(completion_window, config.min_window_s, config.max_window_s)
    file = await _file(api, ex, spec.input_file_id)
    if file.purpose != "batch":
        raise InvalidRequest("The input file's purpose must be 'batch'.", param="input_file_id", code="invalid_value")
    owner = principal.user
    now = time.time()
    # Refused before the file is read when nothing could be added (checked again, with the batch's size,
    # where it is stored).
    _check_room(config, *await store.batch_usage(owner), *await store.usage(owner, now), 0)
    total, errors, model = await _check_lines(api, _file_lines(store, spec.input_file_id), spec.endpoint, principal)
    now = time.time()
    row: dict[str, Any] = {
        "id": "batch_" + secrets.token_hex(12),
        "owner": owner,
        "principal": _snapshot(principal),
        "endpoint": spec.endpoint,
        "model": model or "",
        "input_file_id": spec.input_file_id,
        "completion_window": completion_window,
        "status": "failed" if errors else "in_progress",
        "total": 0 if errors else total,
        "completed": 0,
        "failed": 0,
        "output_file_id": None,
        "error_file_id": None,
        "errors": errors or None,
        "metadata": spec.metadata,
        "created_at": now,
        "expires_at": now + window,
        "in_progress_at": None if errors else now,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": now if errors else None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
    }
    if errors:
        await store.create_batch(row)  # (a failed batch holds no lines)
        return row
    try:
        await store.create_batch(
            row,
            _accepted_lines(store, spec.input_file_id),
            check=lambda live, queued, files_now, bytes_now: _check_room(
                config, live, queued, files_now, bytes_now, total
            ),
        )
    except InputChanged as exc:
        raise InvalidRequest(
            "The input file was deleted or expired while the batch was being created.",
            param="input_file_id",
            code="invalid_value",
        ) from exc
    return row


def _check_room(config: BatchConfig, live: int, queued: int, files_stored: int, bytes_stored: int, adding: int) -> None:
    """Refuse a batch of `adding` requests (0: before its size is known) past the owner's batches not
    ended, the requests they hold, or while the owner's files are over their limits (output files are
    always written and count: new work waits until the owner makes room)."""
    if adding > config.max_queued_lines_per_owner:
        raise InvalidRequest(
            f"The file has {adding} requests; unfinished batches may hold at most "
            f"{config.max_queued_lines_per_owner} of yours at once.",
            param="input_file_id",
            code="too_many_queued_requests",
        )
    if live >= config.max_live_batches_per_owner:
        raise TooManyRequests(
            f"You have {live} batches not yet ended, the most allowed ({config.max_live_batches_per_owner}); "
            "create this one when one of them ends (or cancel one).",
            code="too_many_batches",
        )
    limit = config.max_queued_lines_per_owner
    if queued + adding > limit or queued >= limit:
        held = f"Your unfinished batches hold {queued} requests"
        raise TooManyRequests(
            (
                f"{held}, the most allowed ({limit})"
                if adding == 0
                else f"{held}; this file's {adding} would pass the {limit} allowed"
            )
            + "; create this batch when some have ended (or cancel one).",
            code="too_many_queued_requests",
        )
    if files_stored > config.max_files_per_owner or bytes_stored > config.max_bytes_per_owner:
        raise InvalidRequest(
            f"You store {files_stored} files of {bytes_stored} bytes, more than allowed "
            f"({config.max_files_per_owner} files, {config.max_bytes_per_owner} bytes; your batches' output and "
            "error files count): delete some (DELETE /v1/files/{id}) before creating a batch.",
            param="input_file_id",
            code="file_quota_exceeded",
        )


def _window_s(text: str, min_s: float, max_s: float) -> float:
    match = _WINDOW.match(text.strip())
    seconds = int(match.group(1)) * _WINDOW_S[match.group(2)] if match else 0
    if not min_s <= seconds <= max_s:
        raise InvalidRequest(
            f"'completion_window' must be a duration from {min_s:g}s to {max_s / 3600:g}h, like 24h (got {text!r}).",
            param="completion_window",
            code="invalid_value",
        )
    return float(seconds)


async def _file_lines(store: BatchStore, file_id: str) -> AsyncIterator[tuple[int, bytes]]:
    """(1-based line number, line) of a stored file, read chunk by chunk (a line split over chunks is
    joined once, when it ends)."""
    number = 0
    partial: list[bytes] = []
    async for piece in store.iter_content(file_id):
        start = 0
        while (end := piece.find(b"\n", start)) >= 0:
            raw = piece[start:end]
            if partial:
                partial.append(raw)
                raw = b"".join(partial)
                partial.clear()
            number += 1
            yield number, raw
            start = end + 1
        if start < len(piece):
            partial.append(piece[start:])
    if partial:
        yield number + 1, b"".join(partial)


async def _accepted_lines(store: BatchStore, file_id: str) -> AsyncIterator[tuple[str, str]]:
    """(custom_id, body JSON) of each request of a file that _check_lines accepted whole, read again chunk
    by chunk (the second pass: what is stored is never held as a list)."""
    async for _, raw in _file_lines(store, file_id):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
            custom_id, body = item["custom_id"], item["body"]
        except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
            raise InputChanged("a line no longer reads as it was checked") from exc
        yield custom_id, orjson.dumps(body).decode()


async def _check_lines(
    api: BatchDeps, numbered: AsyncIterator[tuple[int, bytes]], endpoint: str, principal: Principal
) -> tuple[int, list[dict[str, Any]], str | None]:
    """(requests, errors OpenAI-shaped with 1-based line numbers, the model). The first pass over the file:
    it keeps no line, only a 16-byte digest of each custom_id to find duplicates."""
    total = 0
    errors: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    model: str | None = None
    validate = _VALIDATORS[endpoint]
    needed = api.scope_of(endpoint)  # (a line needs the scope a client needs to call the endpoint itself)

    def fail(number: int, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < _MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": number})

    async for number, raw in numbered:
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            fail(number, "invalid_json_line", "This line is not valid JSON.")
            continue
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            fail(
                number,
                "missing_required_parameter",
                "Each line needs a 'custom_id' string (1-512 characters).",
                "custom_id",
            )
            continue
        if _CONTROL.search(custom_id):
            fail(
                number,
                "invalid_custom_id",
                "A custom_id must not contain control characters (such as NUL).",
                "custom_id",
            )
            continue
        digest = hashlib.blake2b(custom_id.encode(errors="surrogatepass"), digest_size=16).digest()
        if digest in seen:
            fail(number, "duplicate_custom_id", f"The custom_id {custom_id!r} appears more than once.", "custom_id")
            continue
        seen.add(digest)
        if item.get("method") != "POST":
            fail(number, "invalid_method", "Each line's 'method' must be POST.", "method")
            continue
        if item.get("url") != endpoint:
            fail(number, "mismatched_endpoint", f"The line's 'url' must be the batch's endpoint {endpoint}.", "url")
            continue
        if needed not in principal.scopes:  # batches:write is not a way around the endpoint's own scope
            fail(
                number,
                "missing_scope",
                f"Your credentials lack the scope '{needed}' needed to call {endpoint}.",
                "url",
            )
            continue
        body = item.get("body")
        if not isinstance(body, dict):
            fail(number, "missing_required_parameter", "Each line needs a 'body' object.", "body")
            continue
        if body.get("stream"):
            fail(number, "invalid_value", "Batch requests cannot stream.", "body.stream")
            continue
        try:
            validate(body, api.config.validation)
            name = api.catalog.resolve(body["model"])
        except GatewayError as exc:
            fail(number, exc.code or "invalid_request", exc.message, f"body.{exc.param}" if exc.param else "body")
            continue
        if not may_use(principal, body["model"], name):
            fail(
                number, "model_not_allowed", f"Your credentials do not allow the model '{body['model']}'.", "body.model"
            )
            continue
        if model is None:
            model = name
        elif name != model:
            fail(number, "mismatched_model", f"Every line must use the same model ('{model}').", "body.model")
            continue
        total += 1
    if not total and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no requests.", "param": None, "line": None})
    return total, errors, model


def _snapshot(principal: Principal) -> dict[str, Any]:
    return {
        "user": principal.user,
        "tier": principal.tier,
        "key_id": principal.key_id,
        "via": principal.via,
        "scopes": sorted(principal.scopes),
        "models": sorted(principal.models) if principal.models is not None else None,
    }


async def _batch(api: BatchDeps, ex: Exchange, batch_id: str) -> Any:
    row = await _store(api).get_batch(batch_id)
    if row is None or not _may_read(ex, row.owner):
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    return row


async def get_batch(api: BatchDeps, req: Request, ex: Exchange, batch_id: str) -> None:
    row = await _batch(api, ex, batch_id)
    counts = await _store(api).counts(batch_id) if row.status in ("in_progress", "cancelling") else None
    await req.respond_json(200, batch_object(row, counts))


async def list_batches(api: BatchDeps, req: Request, ex: Exchange) -> None:
    query = query_params(req)
    limit = _limit(query)
    store = _store(api)
    rows = await store.list_batches(_owner(ex), limit + 1, query.get("after"))
    more, rows = len(rows) > limit, rows[:limit]
    live = await store.counts_many([r.id for r in rows if r.status in ("in_progress", "cancelling")])
    await req.respond_json(200, page([batch_object(r, live.get(r.id)) for r in rows], more=more))


def page(data: list[dict[str, Any]], *, more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: the objects, the first and last ids (the next page is `after=last_id`), and whether
    more follow (the store was asked for one more than the page holds: the last page says false)."""
    out: dict[str, Any] = {"object": "list", "data": data, "has_more": more}
    if data:  # (strings in OpenAI's document: an empty page has none)
        out["first_id"], out["last_id"] = data[0]["id"], data[-1]["id"]
    return out


async def cancel_batch(api: BatchDeps, req: Request, ex: Exchange, batch_id: str) -> None:
    store = _store(api)
    row = await _batch(api, ex, batch_id)
    if row.owner != _owner(ex) and scopes.KEYS_ADMIN not in (ex.principal.scopes if ex.principal else ()):
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    if not await store.cancel(batch_id, time.time()):
        if row.status != "cancelling":
            raise InvalidRequest(
                f"Cannot cancel a batch with status '{row.status}'.", param="batch_id", code="invalid_state"
            )
    if api.batch_runner is not None:
        api.batch_runner.wake()
    row = await store.get_batch(batch_id)
    await req.respond_json(200, batch_object(row, await store.counts(batch_id)))
