"""How demanding a request looks, 0 (trivial) .. 1 (the most capable model): the input of cost-aware routing.

`features()` reads what the request shows without calling anything: the prompt's size, how long the
conversation is, whether it carries code or mathematics or asks for reasoning, how long an answer it
allows, whether it offers tools or demands a JSON schema. `heuristic()` weighs those into a score. A
router can use any other scorer (`routers.<name>.scorer: package.module:function`): it receives the same
`Features` and returns a float, so an operator can plug in a trained classifier.

The weights are a starting point, not a truth: read the score in `x-portcullis-route` and in
`portcullis route explain`, and give the candidates qualities that match what they handle well.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portcullis.routing.context import content_text

# Scan at most this much text for code/math/reasoning cues: a huge prompt says enough by its size.
_SCAN_CHARS = 20_000

_CODE = re.compile(
    r"```|^\s*(def|class|import|from|fn|func|public|private|#include|package)\b|\bfunction\s*\w*\s*\(|=>|"
    r"\bSELECT\b[\s\S]{1,200}?\bFROM\b|[;{}]\s*$|\btraceback\b|\bstack trace\b|\bcompile[sd]?\b|\bregex\b",
    re.IGNORECASE | re.MULTILINE,
)
_MATH = re.compile(
    r"\\(frac|int|sum|sqrt|lim|prod|partial)\b|\$[^$\n]{1,200}\$|"
    r"\b(integral|derivative|theorem|lemma|prove|proof|equation|matrix|eigen\w*|probability|polynomial|"
    r"logarithm|differential|optimi[sz]e)\b|\d\s*[\^*/\u00d7\u00f7]\s*\d|[∑∫√∂≤≥≠]",
    re.IGNORECASE,
)
_REASONING = re.compile(
    r"\b(step[- ]by[- ]step|explain why|reason(ing)? about|analy[sz]e|compare|trade-?offs?|pros and cons|"
    r"evaluate|design an?|architect\w*|plan (a|an|the)|think carefully|justify|critique)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Features:
    prompt_tokens: int  # estimated
    messages: int
    user_turns: int
    code: bool
    math: bool
    reasoning: bool
    max_tokens: int | None
    tools: int
    structured_output: bool  # response_format json_schema


Scorer = Callable[[Features], float]


def features(payload: dict[str, Any], prompt_tokens: int) -> Features:
    """What a chat or completion request shows (payload: the client's JSON, already validated)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        texts = [
            content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") != "assistant"
        ]
        user_turns = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "user")
        count = len(messages)
    else:
        prompt = payload.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt or () if isinstance(p, str)]
        user_turns = count = 1
    # The newest text matters most: scan from the end.
    sample, size = [], 0
    for text in reversed(texts):
        sample.append(text[-(_SCAN_CHARS - size) :])
        size += len(sample[-1])
        if size >= _SCAN_CHARS:
            break
    scanned = "\n".join(sample)
    response_format = payload.get("response_format")
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    tools = payload.get("tools")
    return Features(
        prompt_tokens=prompt_tokens,
        messages=count,
        user_turns=user_turns,
        code=bool(_CODE.search(scanned)),
        math=bool(_MATH.search(scanned)),
        reasoning=bool(_REASONING.search(scanned)),
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        tools=len(tools) if isinstance(tools, list) else 0,
        structured_output=isinstance(response_format, dict) and response_format.get("type") == "json_schema",
    )


def heuristic(f: Features) -> float:
    """A weighted sum of the cues, clipped to [0, 1]. A short plain question scores near 0; a long
    conversation about code with reasoning asked for, near 1."""
    score = 0.25 * min(1.0, math.log2(1 + f.prompt_tokens / 128) / 6)  # 128 tokens ~0.04, 8k ~1
    score += 0.10 * min(1.0, max(0, f.user_turns - 1) / 8)
    score += 0.20 if f.code else 0.0
    score += 0.20 if f.math else 0.0
    score += 0.15 if f.reasoning else 0.0
    score += 0.10 * min(1.0, (f.max_tokens or 0) / 4096)
    score += 0.10 if f.tools else 0.0
    score += 0.05 if f.structured_output else 0.0
    return max(0.0, min(1.0, score))


def load_scorer(spec: str) -> Scorer:
    """`heuristic`, or `package.module:function` (imported once, at startup)."""
    if spec == "heuristic":
        return heuristic
    module_name, _, attr = spec.partition(":")
    scorer = getattr(importlib.import_module(module_name), attr)
    if not callable(scorer):
        raise TypeError(f"{spec} is not callable")
    return scorer  # type: ignore[no-any-return]
