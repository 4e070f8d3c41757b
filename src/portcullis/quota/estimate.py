"""Token estimates for admission: the prompt from its characters, the completion from max_tokens.

An estimate only sizes the reservation; the real counts from the upstream replace it when the
response ends. Characters per token is configurable (`quota.chars_per_token`, 4 for English text with
the usual BPE vocabularies); each message adds a few tokens of chat-template framing.
"""

from __future__ import annotations

import math
from typing import Any

from portcullis.config import QuotaConfig
from portcullis.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, prompt_count

_PER_MESSAGE = 4  # role markers and separators of a chat template
_PER_REQUEST = 3


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            extra = getattr(part, "model_extra", None) or {}
            text = extra.get("text")
            if isinstance(text, str):
                total += len(text)
        return total
    return 0


def _prompt_input(value: Any, chars_per_token: float) -> int:
    if isinstance(value, str):
        return math.ceil(len(value) / chars_per_token)
    if isinstance(value, list):
        if value and isinstance(value[0], int):
            return len(value)  # already token ids
        return sum(_prompt_input(v, chars_per_token) for v in value)
    return 0


def chat_prompt(request: ChatCompletionRequest, chars_per_token: float) -> int:
    chars = 0
    for message in request.messages:
        chars += _chars(message.content)
    return math.ceil(chars / chars_per_token) + _PER_MESSAGE * len(request.messages) + _PER_REQUEST


def completion_prompt(request: CompletionRequest, chars_per_token: float) -> int:
    # Several prompts are several requests upstream: each is read, and framed, on its own.
    return _prompt_input(request.prompt, chars_per_token) + _PER_REQUEST * prompt_count(request.prompt)


def embedding_input(request: EmbeddingRequest, chars_per_token: float) -> int:
    return _prompt_input(request.input, chars_per_token)


def completion_allowance(max_tokens: int | None, n: int | None, default: int) -> int:
    """Completion tokens to reserve: what the client allows (or the configured default), per choice."""
    return (max_tokens or default) * max(1, n or 1)


def _answers(request: ChatCompletionRequest | CompletionRequest) -> int:
    """Answers the upstream generates: n, or best_of when larger (it generates best_of, returns n)."""
    best_of = request.best_of if isinstance(request, CompletionRequest) else (request.model_extra or {}).get("best_of")
    return max(request.n or 1, best_of or 1)


def reservation(
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest, config: QuotaConfig
) -> tuple[int, int]:
    """(prompt tokens, completion tokens) to reserve for one validated request.

    Validation normalised the lengths: `max_tokens` holds the request's one length whichever field the
    client used (max_completion_tokens, n_predict, ...), or the ceiling when it gave none; and `n` the
    choices whether the client said n or n_cmpl. A completion's answers are those times its prompts."""
    cpt = config.chars_per_token
    cap = config.max_reserved_tokens
    if isinstance(request, ChatCompletionRequest):
        completion = completion_allowance(request.max_tokens, _answers(request), config.default_max_tokens)
        return chat_prompt(request, cpt), completion if cap is None else min(completion, cap)
    if isinstance(request, CompletionRequest):
        completion = completion_allowance(
            request.max_tokens, _answers(request) * prompt_count(request.prompt), config.default_max_tokens
        )
        return completion_prompt(request, cpt), completion if cap is None else min(completion, cap)
    return embedding_input(request, cpt), 0
