"""What the non-OpenAI-inference handlers share: the query string, and a JSON body read into a pydantic
model with the first problem as an OpenAI-shaped 400 naming the field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError

from portcullis.errors import InvalidRequest
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity.throttle import peer_address, trusted_networks
from portcullis.safety.validation import parse_json_object
from portcullis.store.audit import Actor

if TYPE_CHECKING:
    from portcullis.config import Config
    from portcullis.store.bus import EventBus

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Live:
    """What handlers read that changes after the composition: the bus (made at preflight when there is Redis)
    and whether the gateway is draining."""

    event_bus: Callable[[], EventBus | None]
    is_draining: Callable[[], bool]

    @property
    def bus(self) -> EventBus | None:
        return self.event_bus()

    @property
    def draining(self) -> bool:
        return self.is_draining()


def actor(config: Config, req: Request, ex: Exchange) -> Actor:
    """Who is making an administrative change, for the audit log: the request's principal, from its address."""
    principal = ex.principal
    server = config.server
    source = peer_address(req.scope, trusted_networks(server.trusted_proxies), server.trusted_proxy_hops)
    if principal is None:  # (an admin route always has one; anonymous access names itself)
        return Actor(user="anonymous", via="anonymous", source=source, request_id=req.request_id)
    return Actor(principal.user, principal.via, principal.key_id, source, req.request_id)


def query_params(req: Request) -> dict[str, str]:
    """The query string's parameters (percent-decoded as UTF-8, bad bytes replaced); 400 for a NUL, which
    PostgreSQL refuses in text (a filter like ?user=%00 would fail in the driver as a 500)."""
    query = dict(parse_qsl(req.scope.get("query_string", b"").decode("latin-1")))
    for name, value in query.items():
        if "\x00" in value or "\x00" in name:
            raise InvalidRequest("Query parameters may not contain NUL bytes.", param=name, code="invalid_value")
    return query


def query_int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer parameter from `low` to `high`, or 400 naming it. ASCII digits only, and few of them:
    str.isdigit() is also true for '²', which int() refuses, and int() refuses more than 4300 digits."""
    raw = query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18 and low <= int(raw) <= high):
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}.", param=name, code="invalid_value")
    return int(raw)


async def read_model(config: Config, req: Request, model: type[M]) -> M:
    """The body (capped, parsed once; empty means {}) as `model`, or 400 `invalid_value` naming the field."""
    raw = await req.read_body(config.server.max_body_bytes)
    payload: Any = parse_json_object(raw, config.validation) if raw.strip() else {}
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise InvalidRequest(f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value") from exc
