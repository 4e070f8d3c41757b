"""Anthropic's Messages API (`POST /v1/messages`), spoken to clients over chat completions.

A request is read into the chat completions request it means (`to_chat`): the system prompt becomes a
system message, content blocks become parts, `tool_use` blocks become the assistant's tool calls and
`tool_result` blocks the tool messages that answer them, tools and `tool_choice` their chat forms,
`stop_sequences` the stop list. Every stage of the gateway then sees a chat request (the same validation
limits, quotas, moderation, cache, routing), and the answer comes back through `Messages`, the exchange's
surface (exchange.py): a chat answer becomes a message, a chat stream becomes Anthropic's events in their
order — `message_start`, per block `content_block_start`, its deltas (`text_delta`, `thinking_delta` from
`reasoning_content`, `input_json_delta` for a tool call's arguments) and `content_block_stop`, then
`message_delta` with the stop reason and usage, `message_stop`. A stream that ends in error ends with
Anthropic's `error` event. A llama-server that answers `/v1/messages` itself gets the request as sent
(`native`); its answer is read back as chat (`decode_*`) so that the same filters judge and count it.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from portcullis.errors import anthropic_sse_error
from portcullis.surfaces import chat_tool, invalid

# chat finish_reason → Anthropic stop_reason
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
_FINISH = {v: k for k, v in _STOP.items()} | {"stop_sequence": "stop", "pause_turn": "stop"}
# What an error's OpenAI type says about its HTTP status (for the stream's error event).
_STATUS = {
    "invalid_request_error": 400,
    "rate_limit_error": 429,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
}
# Fields of a Messages request that have a chat meaning of the same name.
_SAME = ("model", "max_tokens", "temperature", "top_p", "top_k", "stream")
# The rest of the Messages API's fields: read here, or with no chat meaning (never sent on). Any other field is
# passed on to the chat request as the gateway passes unknown chat fields (a backend's own: ignore_eos, min_p).
_KNOWN = frozenset(
    {
        *_SAME,
        "messages",
        "system",
        "stop_sequences",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "container",
        "context_management",
        "mcp_servers",
        "service_tier",
        "betas",
    }
)


def _text_blocks(value: Any, param: str) -> str:
    """A system prompt: a string, or text blocks joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = []
        for i, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise invalid(f"'{param}[{i}]' must be a text block.", f"{param}[{i}]")
            out.append(block["text"])
        return "\n\n".join(out)
    raise invalid(f"'{param}' must be a string or a list of text blocks.", param)


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            url = f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
            return {"type": "image_url", "image_url": {"url": url}}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise invalid(f"'{param}.source' must be a base64 or url image source.", f"{param}.source")


def _tool_result_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, block in enumerate(content):
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            else:
                raise invalid(f"'{param}[{i}]': only text blocks can be sent in a tool result here.", f"{param}[{i}]")
        return "\n".join(parts)
    raise invalid(f"'{param}' must be a string or a list of text blocks.", param)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list.", "messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{param}' must be an object.", param)
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"'{param}.role' must be 'user' or 'assistant'.", f"{param}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise invalid(f"'{param}.content' must be a string or a list of content blocks.", f"{param}.content")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        thinking: list[str] = []
        for j, block in enumerate(content):
            where = f"{param}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and role == "user":
                parts.append(_image(block, where))
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise invalid(f"'{where}' needs an 'id' and a 'name'.", where)
                arguments = orjson.dumps(block.get("input") or {}).decode()
                calls.append(
                    {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
                )
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise invalid(f"'{where}.tool_use_id' must be a string.", f"{where}.tool_use_id")
                text = _tool_result_text(block.get("content"), f"{where}.content")
                if block.get("is_error"):
                    text = f"Error: {text}"
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                if isinstance(block.get("thinking"), str):
                    thinking.append(block["thinking"])
            else:
                raise invalid(f"'{where}': a {kind!r} block is not supported in a {role} message.", where)
        out += results  # a user turn's tool results answer the previous turn's calls: they come first
        if role == "assistant":
            text = "".join(p["text"] for p in parts)
            assistant: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                assistant["tool_calls"] = calls
            if thinking:
                assistant["reasoning_content"] = "".join(thinking)
            if text or calls or thinking:
                out.append(assistant)
        elif parts:
            only_text = all(p["type"] == "text" for p in parts)
            out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid("'tools' must be a list.", "tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise invalid(f"'tools[{i}]' must be an object with a 'name'.", f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise invalid(
                f"'tools[{i}]': Anthropic's server tools ({tool['type']}) are not available here; declare a "
                "custom tool with an 'input_schema'.",
                f"tools[{i}].type",
            )
        out.append(chat_tool(tool, tool.get("input_schema")))
    return out


def _tool_choice(value: Any, chat: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise invalid("'tool_choice' must be an object.", "tool_choice")
    kind = value.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(value.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": value["name"]}}
    else:
        raise invalid("'tool_choice.type' must be auto, any, none or tool (with a name).", "tool_choice.type")
    if value.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def to_chat(payload: dict[str, Any]) -> dict[str, Any]:
    """A Messages request → the chat completions request it means (400 naming the Messages field)."""
    if not isinstance(payload.get("model"), str):
        raise invalid("'model' is required.", "model")
    max_tokens = payload.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("'max_tokens' is required: a positive integer.", "max_tokens")
    chat: dict[str, Any] = {k: v for k, v in payload.items() if k in _SAME or k not in _KNOWN}
    messages = _messages(payload.get("messages"))
    system = payload.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": _text_blocks(system, "system")})
    chat["messages"] = messages
    stops = payload.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("'stop_sequences' must be a list of strings.", "stop_sequences")
        chat["stop"] = stops
    if payload.get("tools") is not None:
        chat["tools"] = _tools(payload["tools"])
    if payload.get("tool_choice") is not None:
        _tool_choice(payload["tool_choice"], chat)
    metadata = payload.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    thinking = payload.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "disabled":
        chat["chat_template_kwargs"] = {"enable_thinking": False}  # llama-server's switch for thinking templates
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # message_delta carries the usage
    return chat


def count_tokens_chat(payload: dict[str, Any]) -> dict[str, Any]:
    """A count_tokens request (a Messages request without max_tokens) → its chat request."""
    return to_chat({**payload, "max_tokens": 1, "stream": False})


def _usage(usage: Any) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    # Anthropic counts the prompt's tokens read from the cache apart from its input tokens (the sum is the prompt).
    cached = cached if isinstance(cached, int) and isinstance(prompt, int) and 0 <= cached <= prompt else 0
    return {
        "input_tokens": prompt - cached if isinstance(prompt, int) else 0,
        "output_tokens": completion if isinstance(completion, int) else 0,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
        # (required by Anthropic's document, nullable: nothing here knows them)
        "cache_creation": None,
        "inference_geo": None,
        "output_tokens_details": None,
        "server_tool_use": None,
        "service_tier": None,
    }


# The usage a message_delta event carries (Anthropic's MessageDeltaUsage).
_DELTA_USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens_details",
    "server_tool_use",
)


def _chat_usage(prompt: int, completion: int, cached: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if isinstance(cached, int) and cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _prompt_of(usage: Any) -> int:
    """The prompt's tokens in an Anthropic usage: its input tokens and those read from or written to the cache."""
    usage = usage if isinstance(usage, dict) else {}
    return sum(
        value
        for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
        if isinstance(value := usage.get(key), int)
    )


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {"_raw": raw}  # a model's broken JSON: kept, not lost
    return value if isinstance(value, dict) else {"_value": value}


class Messages:
    """The exchange's surface (exchange.py) for one Messages request: a chat answer or stream → Anthropic's."""

    native_length = "max_tokens"  # (the length the request path settled is written into the native request)
    native = "/v1/messages"

    def __init__(self, model: str, stop_sequences: list[str] | None = None) -> None:
        self.model = model
        self.stops = frozenset(stop_sequences or ())
        self.stop_sequence: str | None = None  # the one of them that ended the stream
        self.id = "msg_" + os.urandom(12).hex()
        self.started = False
        self.index = -1  # the open block's index (-1: none)
        self.block: str | None = None  # "text", "thinking", "tool_use"
        self.tools: dict[int, int] = {}  # a chat tool call's index → its block's index
        self.stop_reason: str | None = None
        self.usage: dict[str, Any] = _usage(None)
        self.ended = False
        # native streams: the chat chunks' shared fields, and the blocks' kinds by index
        self.native_blocks: dict[int, str] = {}
        self.native_prompt = 0  # the prompt's tokens, as message_start told (message_delta may not)
        self.native_cached = 0
        self.native_calls: dict[int, int] = {}

    # -- whole answers ------------------------------------------------------------------------------

    async def answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        content: list[dict[str, Any]] = []
        if message.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"], "citations": None})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or "toolu_" + os.urandom(12).hex(),
                    "name": function.get("name", ""),
                    "input": _arguments(function.get("arguments")),
                    "caller": {"type": "direct"},
                }
            )
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": answer.get("model", self.model),
            "content": content,
            **self._stopped(choice),
            "stop_details": None,
            "container": None,
            "usage": _usage(answer.get("usage")),
        }

    def _stopped(self, choice: dict[str, Any]) -> dict[str, Any]:
        """The stop reason, and the stop sequence that ended the answer when the backend told which: a chat choice
        carries it as vLLM's `stop_reason` (and as this surface's decoding of a native answer does); a chat
        completion from llama-server does not say, so there it reads as end_turn."""
        finish = choice.get("finish_reason") or "stop"
        matched = choice.get("stop_reason")
        if finish == "stop" and isinstance(matched, str) and matched in self.stops:
            return {"stop_reason": "stop_sequence", "stop_sequence": matched}
        return {"stop_reason": _STOP.get(finish, "end_turn"), "stop_sequence": None}

    # -- streams --------------------------------------------------------------------------------------

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.block = kind
        return out + _event("content_block_start", {"index": self.index, "content_block": block})

    def _close(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return _event("content_block_stop", {"index": self.index})

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self.started = True
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model", self.model),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "stop_details": None,
            "container": None,
            "usage": _usage(None),  # (the prompt's count comes with message_delta: a chat stream tells it last)
        }
        return _event("message_start", {"message": message})

    def events(self, chunks: list[dict[str, Any]]) -> bytes:
        out = b""
        for chunk in chunks:
            if not self.started:
                out += self._start(chunk)
            if chunk.get("usage"):
                self.usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue  # one message: the first choice (n > 1 has no Messages form)
                delta = choice.get("delta") or {}
                thinking = delta.get("reasoning_content")
                if thinking:
                    if self.block != "thinking":
                        out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                    out += _event(
                        "content_block_delta",
                        {"index": self.index, "delta": {"type": "thinking_delta", "thinking": thinking}},
                    )
                text = delta.get("content")
                if text:
                    if self.block != "text":
                        out += self._open("text", {"type": "text", "text": "", "citations": None})
                    out += _event(
                        "content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": text}}
                    )
                for call in delta.get("tool_calls") or ():
                    n = call.get("index", 0)
                    function = call.get("function") or {}
                    if n not in self.tools:
                        out += self._open(
                            "tool_use",
                            {
                                "type": "tool_use",
                                "id": call.get("id") or "toolu_" + os.urandom(12).hex(),
                                "name": function.get("name") or "",
                                "input": {},
                                "caller": {"type": "direct"},
                            },
                        )
                        self.tools[n] = self.index
                    arguments = function.get("arguments")
                    if arguments:
                        out += _event(
                            "content_block_delta",
                            {
                                "index": self.tools[n],
                                "delta": {"type": "input_json_delta", "partial_json": arguments},
                            },
                        )
                if choice.get("finish_reason"):
                    stopped = self._stopped(choice)
                    self.stop_reason, self.stop_sequence = stopped["stop_reason"], stopped["stop_sequence"]
        return out

    async def end(self) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        out = b"" if self.started else self._start({})
        out += self._close()
        out += _event(
            "message_delta",
            {
                "delta": {
                    "stop_reason": self.stop_reason or "end_turn",
                    "stop_sequence": self.stop_sequence,
                    "stop_details": None,
                    "container": None,
                },
                "usage": {k: self.usage[k] for k in _DELTA_USAGE},
            },
        )
        return out + _event("message_stop", {})

    def error(self, message: str, *, type: str, code: str | None) -> bytes:
        self.ended = True
        status = 529 if code in ("service_unavailable", "upstream_unavailable") else _STATUS.get(type, 500)
        if code == "budget_exceeded" or type == "rate_limit_error":
            status = 429
        return anthropic_sse_error(message, status=status)

    # -- native answers (a llama-server's own /v1/messages), read back as chat -------------------------

    def decode_answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        text: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in answer.get("content") or ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text.append(block.get("text") or "")
            elif kind == "thinking":
                thinking.append(block.get("thinking") or "")
            elif kind == "tool_use":
                arguments = orjson.dumps(block.get("input") or {}).decode()
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": block.get("name"), "arguments": arguments},
                    }
                )
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        if calls:
            message["tool_calls"] = calls
        usage = answer.get("usage")
        counted = (
            _chat_usage(_prompt_of(usage), usage.get("output_tokens", 0), usage.get("cache_read_input_tokens"))
            if isinstance(usage, dict)
            else None  # none told: the gateway charges what it can show was spent
        )
        return {
            "id": answer.get("id", self.id),
            "object": "chat.completion",
            "model": answer.get("model", self.model),
            "choices": [_finished(answer.get("stop_reason"), answer.get("stop_sequence"), message=message)],
            **({"usage": counted} if counted else {}),
        }

    def decode_event(self, event: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        kind = event.get("type")
        base: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "model": self.model}
        if kind == "message_start":
            message = event.get("message") or {}
            self.native_prompt = _prompt_of(message.get("usage"))
            self.native_cached = (message.get("usage") or {}).get("cache_read_input_tokens") or 0
            return {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}, False
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            index = event.get("index", 0)
            self.native_blocks[index] = block.get("type", "")
            if block.get("type") == "tool_use":
                n = self.native_calls[index] = len(self.native_calls)
                call = {
                    "index": n,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return {
                    **base,
                    "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}],
                }, False
            return None, False
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            dkind = delta.get("type")
            out: dict[str, Any]
            if dkind == "text_delta":
                out = {"content": delta.get("text", "")}
            elif dkind == "thinking_delta":
                out = {"reasoning_content": delta.get("thinking", "")}
            elif dkind == "input_json_delta":
                n = self.native_calls.get(event.get("index", 0), 0)
                out = {"tool_calls": [{"index": n, "function": {"arguments": delta.get("partial_json", "")}}]}
            else:
                return None, False
            return {**base, "choices": [{"index": 0, "delta": out, "finish_reason": None}]}, False
        if kind == "message_delta":
            usage = event.get("usage") or {}
            # (llama-server's message_delta has the output tokens only: the prompt's came with message_start)
            prompt = _prompt_of(usage) or self.native_prompt
            completion = usage.get("output_tokens", 0)
            delta = event.get("delta") or {}
            # The finish and the usage in one chunk (a chat stream may carry both at once).
            return {
                **base,
                "choices": [_finished(delta.get("stop_reason"), delta.get("stop_sequence"), delta={})],
                "usage": _chat_usage(prompt, completion, usage.get("cache_read_input_tokens") or self.native_cached),
            }, False
        if kind == "message_stop":
            return None, True
        return None, False  # ping, content_block_stop: the encoder makes its own


def _finished(stop_reason: Any, stop_sequence: Any, **body: Any) -> dict[str, Any]:
    """A native answer's end as a chat choice: the finish reason, and the stop sequence that ended it (llama-server
    tells it, with stop_reason end_turn) as vLLM's chat `stop_reason`, which `Messages._stopped` reads back."""
    choice = {"index": 0, **body, "finish_reason": _FINISH.get(stop_reason or "", "stop")}
    if isinstance(stop_sequence, str) and stop_sequence:
        choice["stop_reason"] = stop_sequence
    return choice
