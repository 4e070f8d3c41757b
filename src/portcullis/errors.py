"""The gateway's one error tree, and the one place it becomes OpenAI-shaped JSON.

    GatewayError                      status  type                     code
     ├── InvalidRequest               400     invalid_request_error    (varies; param names the field)
     │    └── ContextLengthExceeded   400     invalid_request_error    context_length_exceeded
     ├── Unauthenticated              401     invalid_request_error    invalid_api_key / invalid_token
     ├── Forbidden                    403     permission_error         missing_scope / model_not_allowed
     ├── NotFound                     404     invalid_request_error    model_not_found / not_found
     ├── MethodNotAllowed             405     invalid_request_error    method_not_allowed
     ├── Conflict                     409     invalid_request_error    name_taken / ...
     ├── PayloadTooLarge              413     invalid_request_error    request_too_large
     ├── TooManyRequests              429     rate_limit_error         too_many_failed_auth / ...
     ├── UpstreamError                (the upstream's status, normalised)
     ├── BadGateway                   502     server_error             upstream_unreachable
     ├── ServiceUnavailable           503     server_error             no_ready_replica / model_loading / ...
     └── GatewayTimeout               504     server_error             upstream_timeout

The `openai` SDK picks its exception class from the status alone (400 BadRequestError, 404
NotFoundError, 413 APIStatusError, 429 RateLimitError, >=500 InternalServerError), so the status is
the contract; type/code/param refine it for humans and for code that inspects `err.code`.
Third-party errors (aiohttp, pydantic) are translated into this tree at the boundary that sees them.
"""

from __future__ import annotations

import math
from typing import Any

import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}
        self.extra: dict[str, Any] = {}  # fields beside OpenAI's four (a backend's own numbers: n_prompt_tokens, n_ctx)

    def body(self) -> bytes:
        if self.extra:
            fields = {**self.extra, "message": self.message, "type": self.type, "param": self.param, "code": self.code}
            return orjson.dumps({"error": fields})
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def anthropic_body(self, request_id: str | None = None) -> bytes:
        """The same error in Anthropic's shape, for the Messages API's clients (their SDK reads the status)."""
        error = {"type": anthropic_type(self.status), "message": self.message}
        return orjson.dumps({"type": "error", "error": error, "request_id": request_id})


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthenticated(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "missing_scope"


class TooManyRequests(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamError(GatewayError):
    """An error answer from the upstream, already normalised to the OpenAI shape."""


class BadGateway(GatewayError):
    status = 502
    code = "upstream_unreachable"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class GatewayTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """The OpenAI error JSON. Every error the gateway emits, in a body or an SSE event, goes through here."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def sse_error(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    """The same error as a server-sent event: how a stream that has started ends in error."""
    return b"data: " + error_body(message, type=type, code=code) + b"\n\n"


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (rounded up: never earlier than the real wait) and `retry-after-ms`
    with the precision (the openai SDK prefers it)."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); its SDK maps the status to an
# exception, the type is for people and logs.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
    503: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_sse_error(message: str, *, status: int) -> bytes:
    """An Anthropic stream's error event (its SDK raises it as an APIStatusError)."""
    data = orjson.dumps({"type": "error", "error": {"type": anthropic_type(status), "message": message}})
    return b"event: error\ndata: " + data + b"\n\n"
