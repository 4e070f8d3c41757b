"""Stream events as a client reads them (raw), and the official schemas of the Responses and Messages APIs' events
(the `openai` and `anthropic` SDKs' types are generated from them)."""

from __future__ import annotations

import urllib.request
from typing import Annotated, Any, get_args, get_origin

import orjson
from anthropic.types import RawMessageStreamEvent
from openai.types.responses import ResponseStreamEvent


def _by_type(union: Any) -> dict[str, Any]:
    """The SDK's models of a stream's events (generated from the official schemas), by their `type`."""
    while get_origin(union) is Annotated:
        union = get_args(union)[0]
    return {get_args(m.model_fields["type"].annotation)[0]: m for m in get_args(union)}


class _Events:
    def __init__(self, union: Any) -> None:
        self.models = _by_type(union)

    def validate_python(self, data: dict[str, Any]) -> None:
        """The event validated against the schema of its type (an unknown type fails)."""
        assert data.get("type") in self.models, data
        self.models[data["type"]].model_validate(data)


RESPONSE_EVENT = _Events(ResponseStreamEvent)
MESSAGE_EVENT = _Events(RawMessageStreamEvent)


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
