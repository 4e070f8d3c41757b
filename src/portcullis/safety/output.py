"""Output moderation: a whole answer, or a stream checked window by window before it reaches the client.

Streams: content chunks are held per choice until `stream_window_chars` of text have gathered (or the
choice ends), then the window is judged: rules on the window, remote moderators on the window preceded by
the last `stream_context_chars` already sent (so a phrase split across two windows is seen whole) and
the prompt it answers. A window that passes is released; a window that fails is never sent: the stream
ends with a `finish_reason: "content_filter"` chunk and an error event (content_policy_violation), and the
upstream generation is cancelled. With rules in the pipeline the last `stream_context_chars` of a window
stay held until more text follows (or the end), so a match is never cut in two by a window's edge:
its first half can neither escape redaction nor pass unseen.

Released chunks are the upstream's own, unchanged, unless a redaction rewrote their text: then the
window's chunks are sent as one chunk carrying the rewritten text. Tool calls are not moderated.
Non-streamed answers: each choice's text is judged whole; a refused choice is returned with
`finish_reason: "content_filter"` and no content, a redacted one with its rewritten text.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from portcullis.exchange import Exchange, Filter
from portcullis.http import Request
from portcullis.safety.moderation import Finding, Pipeline, findings_of, last_user_text, refusal, unavailable
from portcullis.safety.rules import redact

if TYPE_CHECKING:
    from portcullis.safety.moderation import Moderation


class _Held:
    """One choice's chunks not yet sent, and the end of what was sent."""

    __slots__ = ("chunks", "sent_tail", "size", "texts")

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.size = 0
        self.sent_tail = ""


class OutputGuard(Filter):
    """The moderation stage's response half: judges whole answers and stream windows (see the module's docstring)."""

    answers = streams = True

    def __init__(
        self,
        moderation: Moderation,
        pipeline: Pipeline,
        req: Request,
        ex: Exchange,
        *,
        chat: bool,
        payload: dict[str, Any],
    ) -> None:
        self.moderation = moderation
        self.pipeline = pipeline
        self.req = req
        self.ex = ex
        self.chat = chat
        self.payload = payload  # read when judging: the input's redactions are in it by then
        config = moderation.config
        self.window = config.stream_window_chars
        self.context = config.stream_context_chars
        self.hold_back = self.context if pipeline.rules else 0
        self.held: dict[int, _Held] = {}
        self.closing: bytes | None = None  # the error event that ends a refused stream
        self.delivered = False  # some text has been released to the client

    # -- non-streamed answers --------------------------------------------------------------------

    async def answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        choices = answer.get("choices")
        if not isinstance(choices, list):
            return answer
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            text = _text_of(choice, self.chat, whole=True)
            if not text:
                continue
            verdict = await self._judge(text, "", final=True)
            if verdict is None:  # refused
                choice["finish_reason"] = "content_filter"
                if self.chat:
                    choice["message"] = {**(choice.get("message") or {}), "content": None}
                else:
                    choice["text"] = ""
                self.ex.error_code = "content_policy_violation"  # not cached; marked in the log and usage
            elif verdict[0] != text:
                _set_text(choice, self.chat, verdict[0], whole=True)
        return answer

    # -- streams ----------------------------------------------------------------------------------

    async def event(self, ex: Exchange, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """One upstream chunk → the chunks to send now (none while a window fills)."""
        choices = chunk.get("choices")
        if not choices:  # the usage chunk (or another without choices): whatever is held goes first
            return [*await self.flush(ex), chunk]
        if len(choices) > 1:  # one choice per chunk from here on (OpenAI streams n > 1 that way too)
            out: list[dict[str, Any]] = []
            for choice in choices:
                out += await self.event(ex, {**chunk, "choices": [choice]})
                if self.closing is not None:
                    break
            return out
        choice = choices[0]
        if not isinstance(choice, dict):
            return [chunk]
        index = choice.get("index", 0)
        text = _text_of(choice, self.chat, whole=False)
        held = self.held.get(index)
        if text:
            if held is None:
                held = self.held[index] = _Held()
            held.chunks.append(chunk)
            held.texts.append(text)
            held.size += len(text)
            if _is_content_only(choice, self.chat):
                return await self._release(index, held, final=False) if held.size >= self.window else []
            return await self._release(index, held, final=True)
        if held is not None and held.chunks:  # a finish, tool-call or other chunk: the window closes first
            out = await self._release(index, held, final=True)
            return out if self.closing is not None else [*out, chunk]
        return [chunk]

    async def flush(self, ex: Exchange) -> list[dict[str, Any]]:
        """The end of the stream: every held window, judged."""
        out: list[dict[str, Any]] = []
        for index, held in self.held.items():
            if held.chunks:
                out += await self._release(index, held, final=True)
                if self.closing is not None:
                    break
        return out

    async def _release(self, index: int, held: _Held, *, final: bool) -> list[dict[str, Any]]:
        text = "".join(held.texts)
        verdict = await self._judge(text, held.sent_tail, final=final, sizes=[len(t) for t in held.texts])
        if verdict is None:
            return [self._filtered(held.chunks[0], index)]
        released_text, cut = verdict
        if cut <= 0:
            return []
        covered, held.chunks, held.texts = _split(held.chunks, held.texts, cut, self.chat)
        held.size = len(text) - cut
        if released_text != text[:cut]:  # redacted: the window's chunks become one carrying the new text
            covered = [_with_text(covered[-1], self.chat, released_text)]
        if self.context:
            held.sent_tail = (held.sent_tail + released_text)[-self.context :]
        if not self.delivered:  # the client's time to first token is when text first reaches it
            self.delivered = True
            self.ex.ttft_s = time.perf_counter() - self.ex.started_at
        return covered

    async def _judge(
        self, text: str, before: str, *, final: bool, sizes: list[int] | None = None
    ) -> tuple[str, int] | None:
        """Judge `text` (which follows `before`, already sent; made of chunks of `sizes`): None when refused
        (the stream is closed), else (the text to send now, redacted, and how much of `text` it covers)."""
        pipeline = self.pipeline
        matches = pipeline.scan(text) if pipeline.rules else []
        cut = len(text) if final else max(0, len(text) - self.hold_back)
        if sizes and cut < len(text):  # held back: at a chunk's edge, so the upstream's chunks go out whole
            edge = 0
            for size in sizes:
                if edge + size > cut:
                    break
                edge += size
            cut = edge or cut
        for m in matches:
            if m.start < cut < m.end:
                cut = m.start  # never split a match: it waits for the next window whole
        found = [f for f in findings_of(matches) if f.action == "block"] or findings_of(matches, end=cut)
        if not any(f.action == "block" for f in found) and pipeline.remote:
            judged, failed = await pipeline.judge(
                [("user", last_user_text(self.payload, self.chat)), ("assistant", before + redact(text, matches))],
                "assistant",
                "output",
                failed_open=self._unjudged,
            )
            if failed is not None:
                error = unavailable(failed)
                if not self.ex.stream:
                    self.moderation.note(self.req, self.ex, "output", found, text)
                    raise error
                self._close(found, text, error.message, "moderation_unavailable")
                return None
            found += judged
        if any(f.action == "block" for f in found):
            self._close(found, text, refusal(found, output=True).message)
            return None
        self.moderation.note(self.req, self.ex, "output", found, text)
        return redact(text, matches, cut), cut

    def _unjudged(self) -> None:
        self.ex.unjudged = True

    def _close(self, found: list[Finding], text: str, message: str, code: str = "content_policy_violation") -> None:
        self.moderation.note(self.req, self.ex, "output", found, text)
        self.ex.error_code = code
        if self.ex.stream:
            kind = "invalid_request_error" if code == "content_policy_violation" else "server_error"
            self.closing = self.ex.error_event(message, type=kind, code=code)

    def _filtered(self, template: dict[str, Any], index: int) -> dict[str, Any]:
        chunk = {k: v for k, v in template.items() if k not in ("choices", "usage", "timings")}
        if self.chat:
            chunk["choices"] = [{"index": index, "delta": {}, "finish_reason": "content_filter"}]
        else:
            chunk["choices"] = [{"index": index, "text": "", "logprobs": None, "finish_reason": "content_filter"}]
        return chunk


def _text_of(choice: dict[str, Any], chat: bool, *, whole: bool) -> str:
    if chat:
        part = choice.get("message" if whole else "delta")
        content = part.get("content") if isinstance(part, dict) else None
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _set_text(choice: dict[str, Any], chat: bool, text: str, *, whole: bool) -> None:
    if chat:
        choice["message" if whole else "delta"]["content"] = text
    else:
        choice["text"] = text


def _is_content_only(choice: dict[str, Any], chat: bool) -> bool:
    if choice.get("finish_reason") is not None:
        return False
    if chat:
        delta = choice.get("delta")
        return isinstance(delta, dict) and not delta.get("tool_calls") and not delta.get("function_call")
    return True


def _split(
    chunks: list[dict[str, Any]], texts: list[str], cut: int, chat: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The chunks covering the first `cut` characters (the one straddling it split in two), and the rest."""
    covered: list[dict[str, Any]] = []
    at = 0
    for i, (chunk, text) in enumerate(zip(chunks, texts, strict=True)):
        if at + len(text) <= cut:
            covered.append(chunk)
            at += len(text)
            continue
        rest_chunks, rest_texts = chunks[i:], texts[i:]
        if at < cut:
            k = cut - at
            covered.append(_with_text(chunk, chat, text[:k]))
            rest_chunks[0], rest_texts[0] = _with_text(chunk, chat, text[k:]), text[k:]
        return covered, rest_chunks, rest_texts
    return covered, [], []


def _with_text(chunk: dict[str, Any], chat: bool, text: str) -> dict[str, Any]:
    """A copy of `chunk` carrying `text` (per-token logprobs no longer match it: dropped)."""
    out = copy.deepcopy(chunk)
    choice = out["choices"][0]
    _set_text(choice, chat, text, whole=False)
    if choice.get("logprobs") is not None:
        choice["logprobs"] = None
    return out
