"""llama.cpp's own completion API (`POST /completion`, `POST /infill`), which editors and front-ends are built on.

A llama-server gets the request as sent (`native`: `n_probs`, `post_sampling_probs`, per-request `lora`, its
samplers); its answer is read as an OpenAI completion (`decode_*`) for the stages' filters, and goes back as it
came, with the text as the filters left it (so `completion_probabilities` and the rest are kept). A backend
without these endpoints gets the OpenAI completion the request means (`to_completion`: /infill's prefix and
suffix as `prompt` and `suffix`) and its answer in llama.cpp's shape. Its streams have no `[DONE]`: the last
event says `"stop": true`.
"""

from __future__ import annotations

from typing import Any

import orjson

from portcullis.errors import InvalidRequest

# llama.cpp fields with an OpenAI completion meaning (the rest is passed on as the gateway passes unknown fields).
_RENAMED = {"n_predict": "max_tokens", "n_probs": "logprobs"}
_LLAMA_ONLY = frozenset({"input_prefix", "input_suffix", "input_extra", "prompt", "n_predict", "n_probs"})


def to_completion(payload: dict[str, Any], *, infill: bool) -> dict[str, Any]:
    """A /completion or /infill request → the OpenAI completion request it means (400 naming the field)."""
    if not isinstance(payload.get("model"), str):
        raise InvalidRequest("'model' is required (the gateway serves several).", param="model", code="invalid_value")
    out: dict[str, Any] = {k: v for k, v in payload.items() if k not in _LLAMA_ONLY}
    for name, openai_name in _RENAMED.items():
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[openai_name] = value if name != "n_probs" else min(value, 5)
    if infill:
        prefix, suffix = payload.get("input_prefix", ""), payload.get("input_suffix", "")
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise InvalidRequest("'input_prefix' and 'input_suffix' must be strings.", param="input_prefix")
        extra = payload.get("input_extra")
        context = ""
        if isinstance(extra, list):  # the other files' chunks, before the prefix (as llama-server lays them out)
            context = "".join(f"{c.get('filename', '')}\n{c.get('text', '')}\n" for c in extra if isinstance(c, dict))
        prompt = payload.get("prompt")
        out["prompt"] = context + prefix + (prompt if isinstance(prompt, str) else "")
        if suffix:
            out["suffix"] = suffix
    else:
        prompt = payload.get("prompt")
        # One prompt: a string or token ids. (A list of prompts gets llama-server's array of answers, which this
        # endpoint does not meter or moderate: the OpenAI completions endpoint takes several.)
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            raise InvalidRequest(
                "'prompt' must be one prompt: a string or a list of token ids (send several to /v1/completions).",
                param="prompt",
                code="invalid_value",
            )
        out["prompt"] = prompt
    for many in ("n", "n_cmpl"):
        if isinstance(payload.get(many), int) and payload[many] > 1:
            raise InvalidRequest(
                f"'{many}': one completion per request here (use /v1/completions for several).",
                param=many,
                code="invalid_value",
            )
    if out.get("max_tokens") == 0 or payload.get("n_predict") == -1:
        out.pop("max_tokens", None)  # llama.cpp's -1: as long as the context allows
    if out.get("stream"):
        out["stream_options"] = {"include_usage": True}
    return out


def _stop_type(finish: Any) -> str:
    return {"length": "limit", "stop": "eos"}.get(finish, "eos")


class Completion:
    """The exchange's surface (exchange.py) for one /completion or /infill request."""

    native_length = "n_predict"  # (the length the request path settled is written into the native request)

    def __init__(self, model: str, *, infill: bool) -> None:
        self.model = model
        self.native = "/infill" if infill else "/completion"
        self.original: dict[str, Any] | None = None  # a native whole answer, as it came
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None

    # -- whole answers --------------------------------------------------------------------------

    async def answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        choice = (answer.get("choices") or [{}])[0]
        text = choice.get("text") or ""
        if self.original is not None:  # native: as it came, with the text the filters let through
            return {**_as_filtered(self.original, text), "model": self.model}
        usage = answer.get("usage") or {}
        return {
            "content": text,
            "model": self.model,
            "stop": True,
            "stop_type": _stop_type(choice.get("finish_reason")),
            "tokens_predicted": usage.get("completion_tokens", 0),
            "tokens_evaluated": usage.get("prompt_tokens", 0),
            "truncated": False,
        }

    # -- streams --------------------------------------------------------------------------------

    def events(self, chunks: list[dict[str, Any]]) -> bytes:
        out = b""
        for chunk in chunks:
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            raw = chunk.get("llama")  # a native event, as it came
            choices = chunk.get("choices") or []
            text = choices[0].get("text") or "" if choices and isinstance(choices[0], dict) else ""
            if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
                self.finish = choices[0]["finish_reason"]
            if raw is not None:
                if raw.get("stop"):
                    continue  # the last event goes out at the end, with what the filters let through before it
                out += b"data: " + orjson.dumps(_as_filtered(raw, text)) + b"\n\n"
            elif text:
                out += b"data: " + orjson.dumps({"content": text, "stop": False}) + b"\n\n"
        return out

    async def end(self) -> bytes:
        last: dict[str, Any] = self.last or {
            "content": "",
            "stop": True,
            "stop_type": _stop_type(self.finish),
            "tokens_predicted": self.usage.get("completion_tokens", 0),
            "tokens_evaluated": self.usage.get("prompt_tokens", 0),
        }
        return b"data: " + orjson.dumps({**last, "content": "", "model": self.model}) + b"\n\n"

    last: dict[str, Any] | None = None  # a native stream's last event

    def error(self, message: str, *, type: str, code: str | None) -> bytes:
        return b"data: " + orjson.dumps({"error": {"message": message, "type": type, "code": code}}) + b"\n\n"

    # -- native answers, read as OpenAI completions ---------------------------------------------

    def decode_answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        self.original = answer
        return {
            "object": "text_completion",
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "text": answer.get("content") or "",
                    "logprobs": None,
                    "finish_reason": "length" if answer.get("stop_type") == "limit" else "stop",
                }
            ],
            **({"usage": usage} if (usage := _usage(answer)) else {}),
        }

    def decode_event(self, event: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        last = bool(event.get("stop"))
        choice = {"index": 0, "text": event.get("content") or "", "logprobs": None, "finish_reason": None}
        chunk: dict[str, Any] = {"object": "text_completion", "model": self.model, "choices": [choice], "llama": event}
        if last:
            self.last = event
            choice["finish_reason"] = "length" if event.get("stop_type") == "limit" else "stop"
            usage = _usage(event)
            if usage:
                chunk["usage"] = usage
        return chunk, last


# What would tell the generated text token by token: kept only while the text goes out as generated.
_TOKEN_DETAIL = ("completion_probabilities", "tokens", "stopping_word", "probs")


def _as_filtered(raw: dict[str, Any], text: str) -> dict[str, Any]:
    """A native answer or event with the text the filters let through. When they changed it (redacted, refused),
    the token ids and probabilities of what was generated go too: they would tell the text that was withheld."""
    if raw.get("content") == text:
        return raw
    return {k: v for k, v in raw.items() if k not in _TOKEN_DETAIL} | {"content": text}


def _usage(answer: dict[str, Any]) -> dict[str, int] | None:
    """llama.cpp's counts as OpenAI's usage; None when it gave none (the gateway then charges what it can show)."""
    prompt, completion = answer.get("tokens_evaluated"), answer.get("tokens_predicted")
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return None
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
