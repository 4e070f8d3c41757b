"""The response cache under the other APIs: a deterministic Messages or Responses request is answered from the
cache the second time, in the API's own shape, streamed or not (the cache keeps the chat answer; the surface makes
the API's answer or events from it); a stored response is not the cache's: each answer has its own id."""

from __future__ import annotations

import urllib.request
from typing import Any

import orjson
from events import MESSAGE_EVENT, RESPONSE_EVENT, sse_events
from procs import ADMIN_KEY, Proc


def _post(gw: Proc, path: str, body: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    request = urllib.request.Request(
        gw.url + path,
        data=orjson.dumps(body),
        headers={"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.headers.get("x-portcullis-cache"), orjson.loads(r.read())


def test_a_deterministic_message_is_answered_from_the_cache(gw: Proc) -> None:
    ask = {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}
    first_how, first = _post(gw, "/v1/messages", ask)
    again_how, again = _post(gw, "/v1/messages", ask)
    assert (first_how, again_how) == ("miss", "hit")
    assert again["type"] == "message" and again["content"] == first["content"]
    assert again["usage"]["output_tokens"] == first["usage"]["output_tokens"] == 6
    events = sse_events(gw.url + "/v1/messages", {**ask, "stream": True}, {"authorization": f"Bearer {ADMIN_KEY}"})
    for _, data in events:
        MESSAGE_EVENT.validate_python(data)
    text = "".join(d["delta"]["text"] for _, d in events if d.get("delta", {}).get("type") == "text_delta")
    assert text == first["content"][0]["text"]
    assert [d["type"] for _, d in events][-1] == "message_stop"


def test_a_deterministic_response_is_answered_from_the_cache(gw: Proc) -> None:
    ask = {"model": "tiny", "input": "cache this one", "temperature": 0, "max_output_tokens": 5}
    first_how, first = _post(gw, "/v1/responses", ask)
    again_how, again = _post(gw, "/v1/responses", ask)
    assert (first_how, again_how) == ("miss", "hit")
    assert again["output"][0]["content"][0]["text"] == first["output"][0]["content"][0]["text"]
    assert again["id"] != first["id"]  # each answer is a response of its own (stored under its own id)
    events = sse_events(gw.url + "/v1/responses", {**ask, "stream": True}, {"authorization": f"Bearer {ADMIN_KEY}"})
    for n, (_, data) in enumerate(events):
        RESPONSE_EVENT.validate_python(data)
        assert data["sequence_number"] == n
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == first["output"][0]["content"][0]["text"]
