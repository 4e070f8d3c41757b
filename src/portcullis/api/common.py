"""What the non-OpenAI-inference handlers share: the query string, and a JSON body read into a pydantic
model with the first problem as an OpenAI-shaped 400 naming the field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError

from portcullis.errors import InvalidRequest
from portcullis.http import Request
from portcullis.safety.validation import parse_json_object

if TYPE_CHECKING:
    from portcullis.app import Gateway

M = TypeVar("M", bound=BaseModel)


def query_params(req: Request) -> dict[str, str]:
    return dict(parse_qsl(req.scope.get("query_string", b"").decode("latin-1")))


async def read_model(gw: Gateway, req: Request, model: type[M]) -> M:
    """The body (capped, parsed once; empty means {}) as `model`, or 400 `invalid_value` naming the field."""
    raw = await req.read_body(gw.config.server.max_body_bytes)
    payload: Any = parse_json_object(raw, gw.config.validation) if raw.strip() else {}
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise InvalidRequest(f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value") from exc
