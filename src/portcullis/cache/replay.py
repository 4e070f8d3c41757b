"""A cached answer is stored once, as the non-streamed JSON answer, and served either way.

To a streaming client it is replayed as the chunks a llama-server or OpenAI stream has: per choice a
first chunk with the role and the whole content (and tool calls), a last chunk with the finish reason,
the usage chunk when the client asked for it, then `[DONE]`. A streamed answer is assembled back into
the non-streamed form as it passes, so a stream's miss fills the cache too.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def as_stream(answer: dict[str, Any], *, chat: bool, include_usage: bool) -> list[bytes]:
    """The SSE events (each `data: ...\\n\\n`) that replay `answer`."""
    return [*map(_event, as_chunks(answer, chat=chat, include_usage=include_usage)), DONE]


def as_chunks(answer: dict[str, Any], *, chat: bool, include_usage: bool) -> list[dict[str, Any]]:
    """The stream chunks that replay `answer` (without the closing `[DONE]`)."""
    base: dict[str, Any] = {k: answer[k] for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    kind = "chat.completion.chunk" if chat else "text_completion"
    events: list[dict[str, Any]] = []
    for choice in answer.get("choices") or []:
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            if message.get("reasoning_content"):
                delta["reasoning_content"] = message["reasoning_content"]
            first = {"index": index, "delta": delta, "finish_reason": None}
            last = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        else:
            first = {"index": index, "text": choice.get("text", ""), "logprobs": None, "finish_reason": None}
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}
        events.append({**base, "object": kind, "choices": [first]})
        events.append({**base, "object": kind, "choices": [last]})
    if include_usage and answer.get("usage") is not None:
        events.append({**base, "object": kind, "choices": [], "usage": answer["usage"]})
    return events


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class Assembler:
    """Builds the non-streamed answer from a stream's chunks. `failed` when the stream holds something
    this cannot represent faithfully (then nothing is cached)."""

    __slots__ = ("base", "chat", "choices", "failed", "usage")

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.base: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None
        self.failed = False

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.base:
            self.base = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for part in chunk.get("choices") or []:
            if not isinstance(part, dict):
                self.failed = True
                return
            index = part.get("index", 0)
            choice = self.choices.setdefault(index, {"index": index, "text": [], "finish_reason": None})
            if part.get("finish_reason") is not None:
                choice["finish_reason"] = part["finish_reason"]
            if self.chat:
                delta = part.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.failed = True  # tool-call deltas are merged by index and name: not worth the risk
                    return
                if delta.get("content"):
                    choice["text"].append(delta["content"])
                if delta.get("role"):
                    choice["role"] = delta["role"]
            elif part.get("text"):
                choice["text"].append(part["text"])

    def answer(self) -> dict[str, Any] | None:
        if self.failed or not self.choices or any(c["finish_reason"] is None for c in self.choices.values()):
            return None
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            text = "".join(c["text"])
            if self.chat:
                message = {"role": c.get("role", "assistant"), "content": text}
                choices.append({"index": index, "message": message, "finish_reason": c["finish_reason"]})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": c["finish_reason"]})
        kind = "chat.completion" if self.chat else "text_completion"
        answer = {**self.base, "object": kind, "choices": choices}
        if self.usage is not None:
            answer["usage"] = self.usage
        return answer
