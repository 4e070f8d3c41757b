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
caller may use); a file with errors gives a `failed` batch listing them with their line numbers, as
OpenAI does. A valid batch is `in_progress` at once and its lines wait for the runner.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from portcullis.api.common import query_params, read_model
from portcullis.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge
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
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_WINDOW_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_ERRORS = 100  # errors listed for a file that failed validation


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
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidRequest("'limit' must be an integer from 1 to 100.", param="limit", code="invalid_value")
    return int(raw)


# -- files ---------------------------------------------------------------------------------------


async def upload_file(gw: Gateway, req: Request, ex: Exchange) -> None:
    store = _store(gw)
    limit = gw.config.batch.max_file_bytes
    form = await _read_form(req, limit + 64 * 1024, file_limit=limit)
    purpose = form.get("purpose", (None, b""))[1].decode(errors="replace").strip()
    if purpose != "batch":
        raise InvalidRequest(
            f"'purpose' must be 'batch' here (got {purpose!r}); this gateway stores batch input files only.",
            param="purpose",
            code="invalid_value",
        )
    if "file" not in form:
        raise InvalidRequest("The form has no 'file' part.", param="file", code="missing_required_parameter")
    filename, content = form["file"]
    count = _check_jsonl(content, gw.config.batch.max_lines)
    if count == 0:
        raise InvalidRequest("The file has no requests.", param="file", code="empty_file")
    ttl = gw.config.batch.file_ttl_s
    record = await store.create_file(
        file_id="file-" + secrets.token_hex(12),
        owner=_owner(ex),
        purpose="batch",
        filename=(filename or "input.jsonl")[:512],
        content=content,
        expires_at=time.time() + ttl if ttl is not None else None,
    )
    await req.respond_json(200, record)


def _check_jsonl(content: bytes, max_lines: int) -> int:
    """Lines of requests in a JSONL file (blank lines skipped); 400 naming the first bad line."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("The file is not UTF-8 text.", param="file", code="invalid_file") from exc
    count = 0
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            reason = str(exc).split(": line ")[0]  # (orjson's position is within the line, not the file)
            raise InvalidRequest(
                f"Line {number} of the file is not valid JSON: {reason}.", param="file", code="invalid_file"
            ) from exc
        count += 1
        if count > max_lines:
            raise InvalidRequest(
                f"The file has more than {max_lines} requests, the most one batch may hold.",
                param="file",
                code="too_many_requests_in_file",
            )
    return count


async def _read_form(req: Request, limit: int, *, file_limit: int) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body → {field: (filename, bytes)}, parsed as it arrives, never over `limit`."""
    kind, params = parse_options_header(req.header(b"content-type") or b"")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Upload files as multipart/form-data with the fields 'purpose' and 'file'.",
            param="file",
            code="invalid_content_type",
        )
    parts: dict[str, tuple[str | None, bytes]] = {}
    current: dict[str, Any] = {}
    header_field: list[bytes] = []
    header_value: list[bytes] = []

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, data=[], size=0)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        current["headers"][b"".join(header_field).lower()] = b"".join(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["size"] += end - start
        if current["size"] > file_limit:
            raise PayloadTooLarge(f"The file exceeds the limit of {file_limit} bytes.")
        current["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(current["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        filename = disposition.get(b"filename")
        parts[name] = (filename.decode(errors="replace") if filename is not None else None, b"".join(current["data"]))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in req.iter_body(limit):
            parser.write(chunk)
        parser.finalize()
    except GatewayError:
        raise
    except Exception as exc:  # python_multipart's parse errors
        raise InvalidRequest(f"The multipart body is malformed: {exc}", param="file", code="invalid_body") from exc
    return parts


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
    row = await _file(gw, ex, file_id)
    content = await _store(gw).file_content(file_id)
    if content is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", row.filename)
    await req.respond(
        200,
        content,
        [
            (b"content-type", b"application/octet-stream"),
            (b"content-disposition", f'attachment; filename="{safe_name}"'.encode()),
        ],
    )


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
    content = await store.file_content(spec.input_file_id) or b""
    principal = ex.principal
    assert principal is not None
    lines, errors, model = _check_lines(gw, content, spec.endpoint, principal)
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


def _check_lines(
    gw: Gateway, content: bytes, endpoint: str, principal: Principal
) -> tuple[list[tuple[str, str]], list[dict[str, Any]], str | None]:
    """(lines as (custom_id, body JSON), errors OpenAI-shaped with 1-based line numbers, the model)."""
    lines: list[tuple[str, str]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    validate = _VALIDATORS[endpoint]

    def fail(number: int, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < _MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": number})

    for number, raw in enumerate(content.split(b"\n"), start=1):
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
