"""OpenAI's Responses API (`POST /v1/responses`), spoken to clients over chat completions.

A request is read into the chat completions request it means (`to_chat`): `instructions` become the system
message, `input` (a string, or items: messages with input/output text and images, `function_call` items and the
`function_call_output` items answering them) the conversation, after the stored conversation that
`previous_response_id` names; function tools, `tool_choice`, `max_output_tokens`, `text.format` (a JSON schema)
and `reasoning.effort` their chat forms. Every stage of the gateway then sees a chat request, and the answer
comes back through `Responses`, the exchange's surface (exchange.py): a chat answer becomes a response object
(reasoning, message and function-call output items, usage), a chat stream becomes the Responses events in
their order — `response.created`, `response.in_progress`, per item `response.output_item.added`, its deltas
(`response.reasoning_text.delta`, `response.content_part.added` and `response.output_text.delta`,
`response.function_call_arguments.delta`) and their `.done` events, `response.output_item.done`, then
`response.completed` (or `response.incomplete` when cut by `max_output_tokens`) with usage. A stream that ends
in error ends with an `error` event and `response.failed`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from portcullis.surfaces import chat_tool, invalid

# Request fields echoed in the response object (with their defaults when the request has none).
_ECHO: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": None,
    "store": True,
    "temperature": None,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": None,
    "truncation": "disabled",
}


# The Responses API's fields (read here, or with no chat meaning: never sent on). Any other field is passed on to
# the chat request as the gateway passes unknown chat fields (a backend's own: ignore_eos, min_p).
_KNOWN = frozenset(
    {
        *_ECHO,
        "user",
        "model",
        "input",
        "stream",
        "stream_options",
        "include",
        "background",
        "prompt",
        "prompt_cache_key",
        "safety_identifier",
        "service_tier",
        "max_tool_calls",
        "top_logprobs",
        "conversation",
    }
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def input_items(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's own input as items (a string is one user message), each with an id (input_items lists them)."""
    value = payload.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise invalid("'input' must be a string or a list of items.", "input")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid(f"'input[{i}]' must be an object.", f"input[{i}]")
        items.append(item)
    return items


def _content(value: Any, param: str, role: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be a string or a list of content parts.", param)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal") and isinstance(
            part.get("text", part.get("refusal")), str
        ):
            parts.append({"type": "text", "text": part.get("text", part.get("refusal"))})
        elif kind == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise invalid(
                    f"'{param}[{j}].image_url' must be a URL (file ids are not stored here).", f"{param}[{j}]"
                )
            parts.append({"type": "image_url", "image_url": {"url": url, "detail": part.get("detail", "auto")}})
        else:
            raise invalid(f"'{param}[{j}]': a {kind!r} part is not supported here.", f"{param}[{j}]")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def to_messages(items: list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """Responses items → chat messages (a run of function_call items is one assistant turn with tool calls)."""
    out: list[dict[str, Any]] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"'{where}.role' must be user, assistant, system or developer.", f"{where}.role")
            content = _content(item.get("content"), f"{where}.content", role)
            message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, None
            out.append(message)
        elif kind == "function_call":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
                raise invalid(f"'{where}' needs a 'call_id' and a 'name'.", where)
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning:
                    out[-1]["reasoning_content"], reasoning = reasoning, None
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise invalid(f"'{where}.call_id' must be a string.", f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else orjson.dumps(output).decode()
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            content = item.get("content") or []
            if not isinstance(content, list) or not all(
                isinstance(c, dict) and isinstance(c.get("text", ""), str) for c in content
            ):
                raise invalid(f"'{where}.content' must be a list of reasoning_text parts.", f"{where}.content")
            reasoning = "".join(c.get("text", "") for c in content) or None
        else:
            raise invalid(f"'{where}': items of type {kind!r} are not supported here.", f"{where}.type")
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid("'tools' must be a list.", "tools")
    out = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise invalid(f"'tools[{i}]': only function tools are available here (not {kind!r}).", f"tools[{i}].type")
        if not isinstance(tool.get("name"), str):
            raise invalid(f"'tools[{i}].name' is required: the function's name.", f"tools[{i}].name")
        out.append(chat_tool(tool, tool.get("parameters")))
    return out


def to_chat(payload: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """A Responses request (after `history`, the items of the conversation it continues) → its chat request."""
    if not isinstance(payload.get("model"), str):
        raise invalid("'model' is required.", "model")
    chat: dict[str, Any] = {k: v for k, v in payload.items() if k not in _KNOWN}
    chat["model"] = payload["model"]
    messages = to_messages(history, "previous_response_id") + to_messages(input_items(payload))
    instructions = payload.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("'instructions' must be a string.", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    chat["messages"] = messages
    for name in ("temperature", "top_p", "stream", "parallel_tool_calls", "user", "top_logprobs"):
        if payload.get(name) is not None:
            chat[name] = payload[name]
    if payload.get("max_output_tokens") is not None:
        chat["max_tokens"] = payload["max_output_tokens"]
    if payload.get("tools"):
        chat["tools"] = _tools(payload["tools"])
    choice = payload.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        raise invalid("'tool_choice' must be none, auto, required or a function.", "tool_choice")
    text = payload.get("text")
    form = text.get("format") if isinstance(text, dict) else None
    if isinstance(form, dict):
        if form.get("type") == "json_schema":
            schema = {k: form[k] for k in ("name", "schema", "strict", "description") if k in form}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif form.get("type") == "json_object":
            chat["response_format"] = {"type": "json_object"}
    reasoning = payload.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    return chat


def _usage(usage: Any) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
    completion = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    out_details = usage.get("completion_tokens_details")
    reasoning = out_details.get("reasoning_tokens") if isinstance(out_details, dict) else None
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached if isinstance(cached, int) else 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning if isinstance(reasoning, int) else 0},
        "total_tokens": prompt + completion,
    }


def _from_usage(usage: Any) -> dict[str, int] | None:
    """A Responses usage → chat's; None when there is none (the gateway then charges what it can show was spent)."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Responses:
    """The exchange's surface (exchange.py) for one Responses request: a chat answer or stream → the Responses
    API's. `final` is the whole response object once the answer is over (what a stored response keeps)."""

    native_length = "max_output_tokens"  # (the length the request path settled is written into the native request)
    native = "/v1/responses"

    def __init__(
        self, payload: dict[str, Any], keep: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    ) -> None:
        self.id = new_id("resp")
        self.keep = keep  # stores the final response (store: true) before the client gets it
        self.created_at = int(time.time())
        self.model = payload.get("model", "")
        self.echo: dict[str, Any] = {
            k: payload.get(k, default) if payload.get(k) is not None else default for k, default in _ECHO.items()
        }
        if isinstance(payload.get("user"), str):  # (a string in OpenAI's document, never a null: absent when none)
            self.echo["user"] = payload["user"]
        self.final: dict[str, Any] | None = None
        # streams
        self.seq = 0
        self.started = False
        self.output: list[dict[str, Any]] = []  # the items so far (the open one last)
        self.open: str | None = None  # "message", "reasoning", "function_call"
        self.calls: dict[int, int] = {}  # a chat tool call's index → its item's output index
        self.text: list[str] = []
        self.finish: str | None = None
        self.usage: Any = None
        self.ended = False
        # native streams: the function call items (by id; llama-server sends no output_index) → chat tool call indexes
        self.native_calls: dict[Any, int] = {}

    def response(
        self, status: str, output: list[dict[str, Any]], usage: Any, reason: str = "max_output_tokens"
    ) -> dict[str, Any]:
        incomplete = {"reason": reason} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            # (an object in OpenAI's document, never a null: absent until the answer is over)
            **({"usage": _usage(usage)} if usage is not None else {}),
            **self.echo,
        }

    # -- whole answers ------------------------------------------------------------------------------

    async def answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        if answer.get("model"):
            self.model = answer["model"]
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        output: list[dict[str, Any]] = []
        if message.get("reasoning_content"):
            output.append(_reasoning(new_id("rs"), message["reasoning_content"]))
        if message.get("content") or not message.get("tool_calls"):
            output.append(_message(new_id("msg"), message.get("content") or "", "completed"))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            output.append(
                _call(
                    new_id("fc"),
                    call.get("id") or new_id("call"),
                    function.get("name") or "",
                    function.get("arguments") or "",
                    "completed",
                )
            )
        finish = choice.get("finish_reason")
        status = "incomplete" if finish in ("length", "content_filter") else "completed"
        reason = "content_filter" if finish == "content_filter" else "max_output_tokens"
        self.final = self.response(status, output, answer.get("usage") or {}, reason)
        if self.keep is not None:
            await self.keep(self.final)
        return self.final

    # -- streams --------------------------------------------------------------------------------------

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        body = orjson.dumps({"type": kind, "sequence_number": self.seq, **data})
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + body + b"\n\n"

    def _start(self) -> bytes:
        self.started = True
        shell = self.response("in_progress", [], None)
        return self._event("response.created", {"response": shell}) + self._event(
            "response.in_progress", {"response": shell}
        )

    def _open_item(self, kind: str, item: dict[str, Any]) -> bytes:
        out = self._close_item()
        self.open = kind
        self.output.append(item)
        index = len(self.output) - 1
        out += self._event("response.output_item.added", {"output_index": index, "item": item})
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event(
                "response.content_part.added",
                {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part},
            )
        return out

    def _close_item(self) -> bytes:
        if self.open is None:
            return b""
        kind, self.open = self.open, None
        index = len(self.output) - 1
        item = self.output[index]
        out = b""
        if kind == "message":
            text = "".join(self.text)
            self.text = []
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out += self._event(
                "response.output_text.done",
                {"item_id": item["id"], "output_index": index, "content_index": 0, "text": text, "logprobs": []},
            )
            out += self._event(
                "response.content_part.done",
                {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part},
            )
            item = self.output[index] = _message(item["id"], text, "completed")
        elif kind == "reasoning":
            text = "".join(self.text)
            self.text = []
            out += self._event(
                "response.reasoning_text.done",
                {"item_id": item["id"], "output_index": index, "content_index": 0, "text": text},
            )
            item = self.output[index] = _reasoning(item["id"], text)
        else:
            item["status"] = "completed"
            out += self._event(
                "response.function_call_arguments.done",
                {"item_id": item["id"], "output_index": index, "name": item["name"], "arguments": item["arguments"]},
            )
        return out + self._event("response.output_item.done", {"output_index": index, "item": item})

    def events(self, chunks: list[dict[str, Any]]) -> bytes:
        out = b"" if self.started else self._start()
        for chunk in chunks:
            if chunk.get("model") and not self.output:
                self.model = chunk["model"]
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content")
                if reasoning:
                    if self.open != "reasoning":
                        out += self._open_item("reasoning", {"type": "reasoning", "id": new_id("rs"), "summary": []})
                    self.text.append(reasoning)
                    out += self._event(
                        "response.reasoning_text.delta",
                        {
                            "item_id": self.output[-1]["id"],
                            "output_index": len(self.output) - 1,
                            "content_index": 0,
                            "delta": reasoning,
                        },
                    )
                text = delta.get("content")
                if text:
                    if self.open != "message":
                        out += self._open_item("message", _message(new_id("msg"), "", "in_progress", []))
                    self.text.append(text)
                    out += self._event(
                        "response.output_text.delta",
                        {
                            "item_id": self.output[-1]["id"],
                            "output_index": len(self.output) - 1,
                            "content_index": 0,
                            "delta": text,
                            "logprobs": [],
                        },
                    )
                for call in delta.get("tool_calls") or ():
                    n = call.get("index", 0)
                    function = call.get("function") or {}
                    if n not in self.calls:
                        item = _call(
                            new_id("fc"),
                            call.get("id") or new_id("call"),
                            function.get("name") or "",
                            "",
                            "in_progress",
                        )
                        out += self._open_item("function_call", item)
                        self.calls[n] = len(self.output) - 1
                    arguments = function.get("arguments")
                    if arguments:
                        index = self.calls[n]
                        self.output[index]["arguments"] += arguments
                        out += self._event(
                            "response.function_call_arguments.delta",
                            {"item_id": self.output[index]["id"], "output_index": index, "delta": arguments},
                        )
                if choice.get("finish_reason"):
                    self.finish = choice["finish_reason"]
        return out

    async def end(self) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        out = b"" if self.started else self._start()
        out += self._close_item()
        status = "incomplete" if self.finish == "length" else "completed"
        self.final = self.response(status, self.output, self.usage or {})
        if self.keep is not None:
            await self.keep(self.final)
        return out + self._event(f"response.{status}", {"response": self.final})

    def error(self, message: str, *, type: str, code: str | None) -> bytes:
        out = b"" if self.started else self._start()
        self.ended = True
        out += self._event("error", {"code": code or type, "message": message, "param": None})
        failed = self.response("failed", self.output, self.usage)
        failed["error"] = {"code": code or type, "message": message}
        return out + self._event("response.failed", {"response": failed})

    # -- native answers (a llama-server's own /v1/responses), read back as chat -------------------------

    def decode_answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for item in answer.get("output") or ():
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "message":
                text += [c.get("text", "") for c in item.get("content") or () if isinstance(c, dict)]
            elif kind == "reasoning":
                reasoning += [c.get("text", "") for c in item.get("content") or () if isinstance(c, dict)]
            elif kind == "function_call":
                calls.append(
                    {
                        "id": item.get("call_id"),
                        "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
                    }
                )
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else ("length" if self._cut(answer) else "stop")
        return {
            "id": answer.get("id", self.id),
            "object": "chat.completion",
            "model": answer.get("model", self.model),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": _from_usage(answer.get("usage")),
        }

    def _cut(self, response: dict[str, Any], kind: str = "") -> bool:
        """Did max_output_tokens end a native answer? llama-server says `completed` either way: its output tokens
        reaching the limit tell."""
        if kind == "response.incomplete" or response.get("status") == "incomplete":
            return True
        limit = self.echo["max_output_tokens"]
        used = (response.get("usage") or {}).get("output_tokens")
        return isinstance(limit, int) and isinstance(used, int) and used >= limit

    def decode_event(self, event: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        kind = event.get("type")
        base: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "model": self.model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if kind == "response.output_text.delta":
            return chunk({"content": event.get("delta", "")}), False
        if kind == "response.reasoning_text.delta":
            return chunk({"reasoning_content": event.get("delta", "")}), False
        if kind == "response.output_item.added":
            item = event.get("item") or {}
            if item.get("type") == "function_call":
                n = self.native_calls[item.get("id", event.get("output_index"))] = len(self.native_calls)
                call = {
                    "index": n,
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": ""},
                }
                return chunk({"tool_calls": [call]}), False
            return None, False
        if kind == "response.function_call_arguments.delta":
            n = self.native_calls.get(event.get("item_id", event.get("output_index")), 0)
            return chunk({"tool_calls": [{"index": n, "function": {"arguments": event.get("delta", "")}}]}), False
        if kind in ("response.completed", "response.incomplete"):
            response = event.get("response") or {}
            finish = "tool_calls" if self.native_calls else ("length" if self._cut(response, kind) else "stop")
            counted = _from_usage(response.get("usage"))
            return {**chunk({}, finish), **({"usage": counted} if counted else {})}, True
        if kind in ("response.failed", "error"):
            error = event.get("error") or (event.get("response") or {}).get("error") or event
            return {"error": {"message": error.get("message", "The upstream failed."), "code": error.get("code")}}, True
        return None, False


def _message(item_id: str, text: str, status: str, content: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    parts = (
        content if content is not None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": parts}


def _reasoning(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
