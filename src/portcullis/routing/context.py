"""Context fit: how many tokens a request needs, and which deployments can hold it.

A llama-server slot holds `n_ctx` tokens (prompt and completion together); a request that does not fit
fails there after a round trip, and on a mixed fleet (4k and 32k contexts) it should simply go to a
replica that can hold it. The need is the prompt plus `max_tokens` (or plus one token when the request
sets none: llama-server then generates until the context is full).

Counting the prompt exactly needs the model's tokenizer, which only the upstream has. So: an estimate
first, from the text's UTF-8 size (a CJK character is three bytes and about one token, an English word
about four bytes a token) times the model's tokens per byte: `1 / quota.chars_per_token` until the
model's own answers have shown the real figure (their `usage.prompt_tokens` against the bytes sent,
learned per model), uncertain by `routing.context.margin`. Only when a context limit lies inside that
uncertainty, the exact count from a replica's `POST /tokenize`, one text at a time, remembered by the
text's hash so a conversation's earlier messages are never counted twice. The chat template's framing
adds a few tokens per message (counted generously).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import OrderedDict
from typing import Any

import orjson

from portcullis.config import ContextFitConfig
from portcullis.errors import GatewayError
from portcullis.routing.catalog import Replica, SideCall

_PER_MESSAGE = 6  # <|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|> and the like
_PER_REQUEST = 5  # BOS and the assistant header the template opens


def content_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined (images and audio carry none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def texts_of(payload: dict[str, Any]) -> tuple[list[str], int]:
    """The texts a request's prompt is made of, and the number of messages (0 for a completion)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        texts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if content is not None:
                texts.append(content_text(content))
            if m.get("tool_calls"):
                texts.append(orjson.dumps(m["tool_calls"]).decode())
        if payload.get("tools"):
            texts.append(orjson.dumps(payload["tools"]).decode())
        return texts, len(messages)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return [prompt], 0
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [max(prompt, key=len)], 0  # several prompts: each is its own request upstream
    return [], 0


def token_id_prompt(payload: dict[str, Any]) -> int | None:
    """A completion prompt given as token ids counts itself."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if all(isinstance(p, list) for p in prompt):
            return max(len(p) for p in prompt)
    return None


def completion_need(payload: dict[str, Any]) -> int:
    asked = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return asked if isinstance(asked, int) and asked > 0 else 1


_LEARN_MIN_BYTES = 256  # prompts smaller than this say too little about a tokenizer
_LEARN_RATE = 0.1


class TokenCounter:
    def __init__(self, config: ContextFitConfig, chars_per_token: float, call: SideCall | None = None) -> None:
        self.config = config
        self.call = call  # the upstream stage's side call (None: no exact counts, estimates only)
        self.default_ratio = 1 / chars_per_token  # tokens per byte before a model has shown its own
        self.ratios: dict[str, float] = {}
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self.tokenize_calls = 0

    @staticmethod
    def measure(payload: dict[str, Any]) -> tuple[int, int]:
        """(UTF-8 bytes of the prompt's texts, the template's framing tokens). On every request with a known
        context: the common case (string contents) is measured in one pass, without building a list."""
        messages = payload.get("messages")
        if isinstance(messages, list):
            size = 0
            for m in messages:
                content = m.get("content") if isinstance(m, dict) else None
                if type(content) is not str or m.get("tool_calls"):
                    break  # parts, tool calls: the general way below
                size += len(content) if content.isascii() else len(content.encode())
            else:
                if not payload.get("tools"):
                    return size, _PER_MESSAGE * len(messages) + _PER_REQUEST
        texts, count = texts_of(payload)
        size = sum(len(t) if t.isascii() else len(t.encode()) for t in texts)
        return size, (_PER_MESSAGE * count + _PER_REQUEST if count else 1)

    def estimate(self, payload: dict[str, Any], model: str | None = None) -> int:
        ids = token_id_prompt(payload)
        if ids is not None:
            return ids
        return self.sized(*self.measure(payload), model)

    def sized(self, size: int, framing: int, model: str | None) -> int:
        """The estimate for a prompt already measured (bytes, framing tokens)."""
        return math.ceil(size * self.ratios.get(model or "", self.default_ratio)) + framing

    def learn(self, model: str, size: int, framing: int, prompt_tokens: int) -> None:
        """An answer's real prompt count: the model's tokens per byte moves towards what it showed."""
        if size < _LEARN_MIN_BYTES or prompt_tokens <= framing:
            return
        seen = min(2.0, max(0.02, (prompt_tokens - framing) / size))
        old = self.ratios.get(model)
        self.ratios[model] = seen if old is None else old + _LEARN_RATE * (seen - old)

    def bounds(self, estimate: int, payload: dict[str, Any]) -> tuple[int, int]:
        """The prompt's token count is believed to lie in [low, high]."""
        if token_id_prompt(payload) is not None:
            return estimate, estimate
        margin = self.config.margin
        return max(1, math.floor(estimate / (1 + margin))), math.ceil(estimate * (1 + margin))

    async def exact(self, model: str, replicas: list[Replica], payload: dict[str, Any], now: float) -> int | None:
        """The prompt's tokens by the model's own tokenizer (a llama-server replica's /tokenize), or None."""
        ids = token_id_prompt(payload)
        if ids is not None:
            return ids
        replica = next((r for r in replicas if r.kind == "llama_cpp" and r.client is not None and r.usable(now)), None)
        if replica is None or self.call is None:
            return None
        texts, messages = texts_of(payload)
        keys = [hashlib.blake2b(f"{model}\0{t}".encode(), digest_size=16).digest() for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._counts}
        if missing:
            try:
                async with asyncio.timeout(self.config.tokenize_timeout_s):
                    counted = await asyncio.gather(*(self._tokenize(replica, t) for t in missing.values()))
            except (TimeoutError, OSError, ValueError, GatewayError):
                return None
            for key, n in zip(missing, counted, strict=True):
                self._remember(key, n)
        total = 0
        for key in keys:
            count = self._counts.get(key)
            if count is None:
                return None
            self._counts.move_to_end(key)
            total += count
        return total + (_PER_MESSAGE * messages + _PER_REQUEST if messages else 1)

    async def _tokenize(self, replica: Replica, text: str) -> int:
        assert self.call is not None
        self.tokenize_calls += 1
        ask = {"content": text, "add_special": False}
        status, answer = await self.call(replica, "/tokenize", ask, model=replica.model)
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(tokens, list):
            raise ValueError(f"/tokenize answered {status}")
        return len(tokens)

    def _remember(self, key: bytes, count: int) -> None:
        self._counts[key] = count
        if len(self._counts) > self.config.cache_entries:
            self._counts.popitem(last=False)


def fits(replica: Replica, need: int) -> bool:
    context = replica.context
    return context is None or context >= need
