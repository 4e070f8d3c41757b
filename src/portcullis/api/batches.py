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

Uploads are bounded per principal (files and bytes stored, uploads in progress) and never held whole in
memory: the file part is checked line by line as it arrives, spooled to a temporary file, and stored in
chunks (jobs/store.py). Files past their expiry are gone for readers at once and deleted by the runner's
sweep.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from typing import IO, TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from portcullis.api.common import query_int, query_params, read_model
from portcullis.config import BatchConfig
from portcullis.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge, TooManyRequests
from portcullis.http import Request
from portcullis.identity import scopes
from portcullis.identity.auth import may_use
from portcullis.identity.principal import Principal
from portcullis.jobs.store import BatchStore, RowView, batch_object, file_object
from portcullis.safety import validation
from portcullis.upstream.exchange import Exchange

if TYPE_CHECKING:
    from portcullis.app import Gateway

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
_FIELD_LIMIT = 64 * 1024  # a form field other than the file (purpose)


class NewBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _store(gw: Gateway) -> BatchStore:
    if gw.batch_store is None:
        raise NotFound("The Batch API is not enabled on this gateway.", code="not_found")
    return gw.batch_store


def _owner(ex: Exchange) -> str:
    assert ex.principal is not None
    return ex.principal.user


def _may_read(ex: Exchange, owner: str) -> bool:
    principal = ex.principal
    return principal is not None and (principal.user == owner or scopes.ADMIN_READ in principal.scopes)


def _limit(query: dict[str, str]) -> int:
    return query_int(query, "limit", 20, 1, 100)


# -- files ---------------------------------------------------------------------------------------


async def upload_file(gw: Gateway, req: Request, ex: Exchange) -> None:
    store = _store(gw)
    config = gw.config.batch
    owner = _owner(ex)
    # Uploads in progress per principal: each one holds a spool file and a request; the stored-bytes
    # quota below only sees finished uploads, so this is what bounds a burst of parallel ones.
    in_progress = store.uploading.get(owner, 0)
    if in_progress >= config.max_uploads_in_progress:
        raise TooManyRequests(
            f"You have {in_progress} uploads in progress, the most allowed at once; retry when one ends.",
            code="too_many_uploads",
            headers={"retry-after": "1"},
        )
    store.uploading[owner] = in_progress + 1
    try:
        count, used = await store.usage(owner, time.time())
        _check_quota(config, count, used, 0)
        room = min(config.max_file_bytes, config.max_bytes_per_owner - used)
        spool: IO[bytes] = await asyncio.to_thread(
            tempfile.TemporaryFile, dir=config.spool_dir, prefix="portcullis-upload-"
        )
        try:
            check = _JsonlCheck(config.max_lines, gw.config.server.max_body_bytes)
            form = await _read_form(req, room + _FIELD_LIMIT, spool=spool, check=check, file_limit=room, config=config)
            purpose = form.get("purpose", b"").decode(errors="replace").strip()
            if purpose != "batch":
                raise InvalidRequest(
                    f"'purpose' must be 'batch' here (got {purpose!r}); this gateway stores batch input files only.",
                    param="purpose",
                    code="invalid_value",
                )
            if check.size < 0:
                raise InvalidRequest("The form has no 'file' part.", param="file", code="missing_required_parameter")
            if check.count == 0:
                raise InvalidRequest("The file has no requests.", param="file", code="empty_file")
            ttl = config.file_ttl_s
            size = check.size
            record = await store.store_upload(
                file_id="file-" + secrets.token_hex(12),
                owner=owner,
                filename=(check.filename or "input.jsonl")[:512],
                spool=spool,
                size=size,
                expires_at=time.time() + ttl if ttl is not None else None,
                check=lambda files_now, bytes_now: _check_quota(config, files_now, bytes_now, size),
            )
        finally:
            await asyncio.to_thread(spool.close)
    finally:
        left = store.uploading.get(owner, 1) - 1
        if left > 0:
            store.uploading[owner] = left
        else:
            store.uploading.pop(owner, None)
    await req.respond_json(200, record)


def _check_quota(config: BatchConfig, files_stored: int, bytes_stored: int, adding: int) -> None:
    """Refuse an upload past the principal's stored files or bytes (`adding`: the new file's size, 0 before
    it is known)."""
    if files_stored >= config.max_files_per_owner:
        raise InvalidRequest(
            f"You store {files_stored} files, the most allowed ({config.max_files_per_owner}); "
            "delete some (DELETE /v1/files/{id}) or wait for them to expire.",
            param="file",
            code="file_quota_exceeded",
        )
    limit = config.max_bytes_per_owner
    if bytes_stored + adding > limit or (adding == 0 and bytes_stored >= limit):
        raise PayloadTooLarge(
            f"Your files would take more than the {limit} bytes you may store "
            f"(stored now: {bytes_stored}); delete some or wait for them to expire.",
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
    req: Request, limit: int, *, spool: IO[bytes], check: _JsonlCheck, file_limit: int, config: BatchConfig
) -> dict[str, bytes]:
    """A multipart/form-data upload, parsed as it arrives and never over `limit` bytes: the 'file' part is
    checked line by line and written to `spool` in pieces of at most _SPOOL_FLUSH bytes (memory stays
    bounded whatever the file's size); the other fields → {name: bytes}, each at most _FIELD_LIMIT."""
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

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, data=[], size=0, name=None, is_file=False)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        current["headers"][b"".join(header_field).lower()] = b"".join(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(current["headers"].get(b"content-disposition", b""))
        current["name"] = disposition.get(b"name", b"").decode(errors="replace")
        if current["name"] == "file":
            if check.size >= 0:
                raise InvalidRequest("The form has more than one 'file' part.", param="file", code="invalid_body")
            filename = disposition.get(b"filename")
            check.filename = filename.decode(errors="replace") if filename is not None else None
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
        current["size"] += len(piece)
        if current["size"] > _FIELD_LIMIT:
            raise PayloadTooLarge(f"The form field {current['name']!r} exceeds {_FIELD_LIMIT} bytes.")
        current["data"].append(piece)

    def on_part_end() -> None:
        if current["is_file"]:
            check.finish()
        else:
            fields[current["name"]] = b"".join(current["data"])

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
    try:
        async for chunk in req.iter_body(limit):
            parser.write(chunk)
            if pending_size >= _SPOOL_FLUSH:
                data = b"".join(pending)
                pending.clear()
                pending_size = 0
                await asyncio.to_thread(spool.write, data)
        parser.finalize()
    except GatewayError:
        raise
    except Exception as exc:  # python_multipart's parse errors
        raise InvalidRequest(f"The multipart body is malformed: {exc}", param="file", code="invalid_body") from exc
    if pending:
        await asyncio.to_thread(spool.write, b"".join(pending))
    return fields


async def list_files(gw: Gateway, req: Request, ex: Exchange) -> None:
    query = query_params(req)
    limit = _limit(query)
    rows = await _store(gw).list_files(_owner(ex), query.get("purpose"), limit, query.get("after"))
    data = [file_object(r) for r in rows]
    await req.respond_json(200, {"object": "list", "data": data, "has_more": len(data) == limit})


async def _file(gw: Gateway, ex: Exchange, file_id: str) -> Any:
    row = await _store(gw).get_file(file_id)
    if row is None or not _may_read(ex, row.owner):
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return row


async def get_file(gw: Gateway, req: Request, ex: Exchange, file_id: str) -> None:
    await req.respond_json(200, file_object(await _file(gw, ex, file_id)))


async def file_content(gw: Gateway, req: Request, ex: Exchange, file_id: str) -> None:
    """The file's bytes, streamed chunk by chunk as they are read (a download holds one chunk at a time)."""
    row = await _file(gw, ex, file_id)
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", row.filename)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(row.bytes).encode()),
        (b"content-disposition", f'attachment; filename="{safe_name}"'.encode()),
    ]
    pieces = _store(gw).iter_content(file_id)
    first = await anext(pieces, b"")  # (a database error here still gets its error answer)
    req.status = 200
    await req.send({"type": "http.response.start", "status": 200, "headers": req.response_headers + headers})
    await req.send({"type": "http.response.body", "body": first, "more_body": True})
    async for piece in pieces:
        await req.send({"type": "http.response.body", "body": piece, "more_body": True})
    await req.send({"type": "http.response.body", "body": b"", "more_body": False})


async def delete_file(gw: Gateway, req: Request, ex: Exchange, file_id: str) -> None:
    row = await _file(gw, ex, file_id)
    if row.owner != _owner(ex):
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    await _store(gw).delete_file(file_id)
    await req.respond_json(200, {"id": file_id, "object": "file", "deleted": True})


# -- batches -------------------------------------------------------------------------------------


async def create_batch(gw: Gateway, req: Request, ex: Exchange) -> None:
    store = _store(gw)
    spec = await read_model(gw, req, NewBatch)
    if spec.endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint", code="invalid_value"
        )
    window = _window_s(spec.completion_window, gw.config.batch.min_window_s, gw.config.batch.max_window_s)
    file = await _file(gw, ex, spec.input_file_id)
    if file.purpose != "batch":
        raise InvalidRequest("The input file's purpose must be 'batch'.", param="input_file_id", code="invalid_value")
    principal = ex.principal
    assert principal is not None
    lines, errors, model = await _check_lines(gw, _file_lines(store, spec.input_file_id), spec.endpoint, principal)
    now = time.time()
    row: dict[str, Any] = {
        "id": "batch_" + secrets.token_hex(12),
        "owner": principal.user,
        "principal": _snapshot(principal),
        "endpoint": spec.endpoint,
        "model": model or "",
        "input_file_id": spec.input_file_id,
        "completion_window": spec.completion_window,
        "status": "failed" if errors else "in_progress",
        "total": 0 if errors else len(lines),
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
    await store.create_batch(row, [] if errors else lines)
    if gw.batch_runner is not None and not errors:
        gw.batch_runner.wake()
    gw.log.info("batch_created", batch_id=row["id"], user=principal.user, lines=row["total"], status=row["status"])
    await req.respond_json(200, batch_object(RowView(row)))


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
    """(1-based line number, line) of a stored file, read chunk by chunk."""
    number = 0
    partial = b""
    async for piece in store.iter_content(file_id):
        parts = (partial + piece).split(b"\n") if partial else piece.split(b"\n")
        partial = parts.pop()
        for raw in parts:
            number += 1
            yield number, raw
    if partial:
        yield number + 1, partial


def route_scope(gw: Gateway, endpoint: str) -> str:
    """The scope a client needs to call `endpoint` itself: a batch line needs it too (read from the route
    table, so the two cannot disagree)."""
    return gw.routes[("POST", endpoint)][1]


async def _check_lines(
    gw: Gateway, numbered: AsyncIterator[tuple[int, bytes]], endpoint: str, principal: Principal
) -> tuple[list[tuple[str, str]], list[dict[str, Any]], str | None]:
    """(lines as (custom_id, body JSON), errors OpenAI-shaped with 1-based line numbers, the model)."""
    lines: list[tuple[str, str]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    validate = _VALIDATORS[endpoint]
    needed = route_scope(gw, endpoint)

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
        if custom_id in seen:
            fail(number, "duplicate_custom_id", f"The custom_id {custom_id!r} appears more than once.", "custom_id")
            continue
        seen.add(custom_id)
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
            validate(body, gw.config.validation)
            name = gw.catalog.resolve(body["model"])
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
        lines.append((custom_id, orjson.dumps(body).decode()))
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no requests.", "param": None, "line": None})
    return lines, errors, model


def _snapshot(principal: Principal) -> dict[str, Any]:
    return {
        "user": principal.user,
        "tier": principal.tier,
        "key_id": principal.key_id,
        "via": principal.via,
        "scopes": sorted(principal.scopes),
        "models": sorted(principal.models) if principal.models is not None else None,
    }


async def _batch(gw: Gateway, ex: Exchange, batch_id: str) -> Any:
    row = await _store(gw).get_batch(batch_id)
    if row is None or not _may_read(ex, row.owner):
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    return row


async def get_batch(gw: Gateway, req: Request, ex: Exchange, batch_id: str) -> None:
    row = await _batch(gw, ex, batch_id)
    counts = await _store(gw).counts(batch_id) if row.status in ("in_progress", "cancelling") else None
    await req.respond_json(200, batch_object(row, counts))


async def list_batches(gw: Gateway, req: Request, ex: Exchange) -> None:
    query = query_params(req)
    limit = _limit(query)
    store = _store(gw)
    rows = await store.list_batches(_owner(ex), limit, query.get("after"))
    live = await store.counts_many([r.id for r in rows if r.status in ("in_progress", "cancelling")])
    data = [batch_object(r, live.get(r.id)) for r in rows]
    await req.respond_json(
        200,
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(data) == limit,
        },
    )


async def cancel_batch(gw: Gateway, req: Request, ex: Exchange, batch_id: str) -> None:
    store = _store(gw)
    row = await _batch(gw, ex, batch_id)
    if row.owner != _owner(ex) and scopes.KEYS_ADMIN not in (ex.principal.scopes if ex.principal else ()):
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    if not await store.cancel(batch_id, time.time()):
        if row.status != "cancelling":
            raise InvalidRequest(
                f"Cannot cancel a batch with status '{row.status}'.", param="batch_id", code="invalid_state"
            )
    if gw.batch_runner is not None:
        gw.batch_runner.wake()
    row = await store.get_batch(batch_id)
    await req.respond_json(200, batch_object(row, await store.counts(batch_id)))
