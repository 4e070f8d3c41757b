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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portcullis.routing.context import content_text

# Cues are looked for in the newest text only, this much of it: a long prompt says enough by its size, and
# the cost must stay small on every routed request (regular expressions over 20,000 characters measured
# hundreds of microseconds; word sets and substring tests over 1,000, a few).
_SCAN_CHARS = 1_000
_SPACES = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\n\t"})

# Marks found verbatim in the text, and words found among its words (lower case, punctuation removed).
_CODE_MARKS = ("```", "=>", "();", "};", "#include", "def ", "import ", "return ", "console.log", "select *", "</")
_CODE_WORDS = frozenset(
    "python javascript typescript golang rust java kotlin sql regex compile compiler traceback stacktrace "
    "segfault function refactor debug bug exception".split()
)
_MATH_MARKS = (
    "\\frac",
    "\\int",
    "\\sum",
    "\\sqrt",
    "$$",
    "^2",
    "^3",
    "x^",
    "\u2211",
    "\u222b",
    "\u221a",
    "\u2264",
    "\u2265",
)
_MATH_WORDS = frozenset(
    "integral integrals derivative derivatives theorem lemma prove proof equation equations matrix eigenvalue "
    "eigenvalues probability polynomial logarithm differential optimize optimise calculus algebra".split()
)
_REASONING_MARKS = ("step by step", "step-by-step", "explain why", "pros and cons", "think carefully", "trade-off")
_REASONING_WORDS = frozenset(
    "analyze analyse compare evaluate justify critique architecture tradeoffs tradeoff design reasoning".split()
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
    scanned = "\n".join(sample).lower()
    words = set(scanned.translate(_SPACES).split())
    response_format = payload.get("response_format")
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    tools = payload.get("tools")
    return Features(
        prompt_tokens=prompt_tokens,
        messages=count,
        user_turns=user_turns,
        code=not _CODE_WORDS.isdisjoint(words) or any(m in scanned for m in _CODE_MARKS),
        math=not _MATH_WORDS.isdisjoint(words) or any(m in scanned for m in _MATH_MARKS),
        reasoning=not _REASONING_WORDS.isdisjoint(words) or any(m in scanned for m in _REASONING_MARKS),
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
