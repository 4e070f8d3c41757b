"""A llama-server stand-in: same endpoints, same wire format, same habits, no model.

What it reproduces from llama.cpp's tools/server:
  - N parallel slots; requests beyond them wait silently and without bound (llama-server's queue);
  - a context of `n_ctx` tokens per slot: a longer prompt is refused with its
    `exceed_context_size_error` (400, with n_prompt_tokens and n_ctx), generation stops at the end;
  - `/health` 503 `{"error": {"message": "Loading model", ...}}` during a loading phase (every other
    endpoint answers the same, as the real server does);
  - streams of `data: {...}` chunks: a role chunk, content deltas, a finish chunk, the usage chunk
    (`choices: []`) only with `stream_options.include_usage`, `timings` on the last chunk, `[DONE]`;
    optional `:` keep-alive pings; a mid-stream error as `data: {"error": ...}` without `[DONE]`;
  - `/props` (total_slots, default_generation_settings.n_ctx), `/slots`, `/metrics` (llamacpp:*),
    `/v1/models`, `/tokenize`, `/v1/embeddings`;
  - the prompt cache: each slot keeps the tokens of its last request (prompt and answer); a new request
    takes the idle slot whose cache shares the longest prefix with its prompt (at least
    `slot_similarity` of it, else the least recently used slot) and only the rest of the prompt costs
    `prompt_ms_per_token`; `timings.cache_n` and `usage.prompt_tokens_details.cached_tokens` say how
    many tokens were reused;
  - the answer's length from `n_predict`, else `max_completion_tokens`, else `max_tokens`, a value of
    the wrong type (a string) ignored as llama-server's json_value ignores it.
Output is deterministic for `temperature: 0` (and for a given `seed`). Faults can be injected by
probability, or exactly (`fail_next`: the next N completion requests answer a chosen status, with
Retry-After if set), at start-up or at run time through `POST /sim/control`; `GET /sim/stats` counts what
happened (tests use it to see, for instance, that a client disconnect cancelled the generation).
`fixed` mode answers every completion at once with a canned body: an upstream that is never the
bottleneck of a benchmark.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

Scope = dict[str, Any]

_WORDS = (
    "the quick brown fox jumps over a lazy dog while llamas graze on quiet hills and servers hum "
    "softly through the night as tokens flow from slot to slot in patient order every answer "
    "finds its way home"
).split()
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


DEFAULT_MODERATION_TRIGGERS = {"build a bomb": "illicit/violent", "hurt someone": "violence"}
DEFAULT_GUARD_TRIGGERS = {"build a bomb": "S9", "hurt someone": "S1"}
_GUARD_MARK = "<BEGIN CONVERSATION>"
_MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
    "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip


@dataclass
class SimSettings:
    slots: int = 4
    n_ctx: int = 4096
    model_alias: str = "sim-model.gguf"
    ttft_ms: float = 0.0
    # Prompt processing: this long per prompt token not found in the slot's cache (0: free).
    prompt_ms_per_token: float = 0.0
    prompt_cache: bool = True
    slot_similarity: float = 0.5  # llama-server's --slot-prompt-similarity
    tokens_per_s: float = 0.0  # 0 = no delay between tokens
    default_max_tokens: int = 32
    embedding_dim: int = 64
    # "hash": a random unit vector per text; "words": the normalised sum of a random vector per word, so
    # texts sharing most words are close (what a semantic cache needs to be tested)
    embedding_mode: str = "hash"
    loading_s: float = 0.0
    ping_interval_s: float = 0.0
    # fault injection, each a probability per request
    error_rate: float = 0.0  # 500 before anything is sent
    unavailable_rate: float = 0.0  # 503 before anything is sent
    hang_rate: float = 0.0  # accept, then never answer
    drop_rate: float = 0.0  # streams: cut the connection after `fault_after_tokens`
    stream_error_rate: float = 0.0  # streams: a `data: {"error": ...}` event after `fault_after_tokens`
    fault_after_tokens: int = 2
    # the next `fail_next` completion requests answer `fail_status` (with Retry-After when set), then normal
    fail_next: int = 0
    fail_status: int = 503
    fail_retry_after: float | None = None
    fixed: bool = False
    stamp_chunks: bool = False  # add `sim_emitted_at` (time.time()) to every chunk
    echo_request: bool = False  # add `sim_request` (the JSON received) to non-streamed answers
    # Every completion answers this text (word by word, up to max_tokens) instead of random words.
    reply: str | None = None
    # Moderation: /v1/moderations flags a text containing a phrase with its category; a chat request
    # holding a Llama-Guard-style prompt (<BEGIN CONVERSATION>) is answered 'safe', or 'unsafe' and the
    # codes of the phrases found in the conversation. Phrases match case-insensitively.
    moderation_triggers: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MODERATION_TRIGGERS))
    guard_triggers: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_GUARD_TRIGGERS))
    moderation_delay_ms: float = 0.0
    # Keep-alive as llama-server (cpp-httplib) keeps it: a connection idle `keep_alive_s` is dead (0: never),
    # and the 100th request on one is answered with `Connection: close`. A request that arrives on a dead
    # connection finds it closed without an answer: what a client sees when the server's idle timer fires
    # as its request crosses the wire. With a real server that takes a loaded event loop or bad luck; here
    # every reuse of a connection idle that long meets it (the HTTP server's own timer, 5 s later, frees
    # connections nobody came back to), so tests see the worst case every time.
    keep_alive_s: float = 5.0
    max_requests_per_connection: int = 100
    # The next N requests that arrive on a connection used before find it closed, however long it was idle.
    drop_reused_next: int = 0
    # llama-server's own APIs: /v1/messages, /v1/responses and their token counts, /apply-template, /detokenize
    # (False: a server that answers them 404, so that the gateway's translation is what serves them).
    native: bool = True
    # A thinking model: this many words of reasoning (`reasoning_content`) before the answer.
    reasoning_words: int = 0
    # llama-server's --slot-save-path: POST /slots/{id}?action=save|restore write and read a slot's cached tokens there.
    slot_save_path: str | None = None


_VOCAB: dict[int, str] = {}  # the pieces seen, by id (/detokenize)


def tokenize(text: str) -> list[int]:
    ids = []
    for piece in _TOKEN_RE.findall(text):
        token = int.from_bytes(hashlib.blake2b(piece.encode(), digest_size=2).digest(), "big")
        if len(_VOCAB) < 100_000:
            _VOCAB.setdefault(token, piece)
        ids.append(token)
    return ids


def detokenize(ids: list[Any]) -> str:
    return " ".join(_VOCAB.get(t, "") for t in ids if isinstance(t, int))


def chat_template(messages: list[Any]) -> str:
    """The prompt a chat template would make (a ChatML-like one)."""
    parts = [
        f"<|im_start|>{m.get('role')}\n{_text_of(m.get('content'))}<|im_end|>\n"
        for m in messages
        if isinstance(m, dict)
    ]
    return "".join(parts) + "<|im_start|>assistant\n"


def _tool_call(req: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
    """The call a tool-using model makes: the chosen (or first) function, each required argument a word. None when
    the last message is a tool's result (the model answers from it) or no tool may be called."""
    tools: list[dict[str, Any]] = [
        t["function"] for t in req.get("tools") or () if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    messages = req.get("messages") or []
    choice = req.get("tool_choice")
    if (
        not tools
        or choice == "none"
        or (messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool")
    ):
        return None
    tool = tools[0]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tool = next((t for t in tools if t.get("name") == name), tool)
    params: dict[str, Any] = tool["parameters"] if isinstance(tool.get("parameters"), dict) else {}
    props: dict[str, Any] = params["properties"] if isinstance(params.get("properties"), dict) else {}
    required: list[Any] = params["required"] if isinstance(params.get("required"), list) else list(props)
    args: dict[str, Any] = {}
    for key in required:
        kind = (props.get(key) or {}).get("type") if isinstance(props.get(key), dict) else None
        args[key] = rng.randint(1, 9) if kind in ("integer", "number") else rng.choice(_WORDS)
    return {
        "id": "call_" + rng.randbytes(8).hex(),
        "type": "function",
        "function": {"name": tool.get("name", ""), "arguments": orjson.dumps(args).decode()},
    }


_ROLE_IDS = {"system": 11, "developer": 12, "user": 13, "assistant": 14, "tool": 15}


def chat_ids(messages: list[Any]) -> list[int]:
    """A chat prompt as token ids: per message a 4-token role header and its text, then 3 to open the answer."""
    ids: list[int] = []
    for m in messages:
        if isinstance(m, dict):
            ids += [_ROLE_IDS.get(str(m.get("role")), 10), 1, 2, 3, *tokenize(_text_of(m.get("content")))]
    return [*ids, 4, 5, 6]


def _json_int(req: dict[str, Any], key: str, default: int | None) -> int | None:
    """llama-server's json_value for an integer: null or a wrong type (a string) gives the default; a
    number or a boolean converts (nlohmann's get<int>: 8.9 is 8, true is 1)."""
    value = req.get(key)
    if isinstance(value, bool | int | float):
        return int(value)
    return default


def _n_predict(req: dict[str, Any]) -> int | None:
    """The length llama-server obeys (server-task.cpp, params_from_json_cmpl): n_predict, else
    max_completion_tokens, else max_tokens; None, 0 or negative: the answer's natural length (and the context)."""
    return _json_int(req, "n_predict", _json_int(req, "max_completion_tokens", _json_int(req, "max_tokens", None)))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class _Drop(Exception):
    """Raised inside a response to make the server drop the connection."""


class Simulator:
    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = settings or SimSettings()
        self.started = time.monotonic()
        self.loading_until = self.started + self.settings.loading_s
        self._slots = asyncio.Semaphore(self.settings.slots)
        self._slot_busy = [False] * self.settings.slots
        self._slot_cache: list[list[int]] = [[] for _ in range(self.settings.slots)]
        self._slot_used = [0.0] * self.settings.slots
        self._slot_prompt = [0] * self.settings.slots  # the prompt tokens of the request a busy slot serves
        self.stats = {
            "requests": 0,
            "completed": 0,
            "cancelled": 0,
            "active": 0,
            "waiting": 0,
            "max_waiting": 0,
            "max_active": 0,
            "prompt_tokens": 0,
            "prompt_tokens_cached": 0,
            "predicted_tokens": 0,
            "embedding_calls": 0,
            "embedding_inputs": 0,
            "moderation_calls": 0,
            "guard_calls": 0,
            "dropped_reused": 0,
            "slot_saves": 0,
            "slot_restores": 0,
            "native": 0,  # requests to llama-server's own APIs (/v1/messages, /v1/responses, counts, templates)
        }
        self.last_guard_prompt: str | None = None
        # Per client connection (uvicorn's protocol object of it; it goes when the connection does):
        # [requests served, when the last answer ended].
        self._connections: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
        self._fixed_chat = b""
        self._fixed_completion = b""
        self._prepare_fixed()

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._slots = asyncio.Semaphore(self.settings.slots)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        send = self._keep_alive(scope, send)
        if send is None:  # closed under the request: return once the server has seen it go
            await _wait_disconnect(receive)
            return
        path, method = scope["path"], scope["method"]
        if self.settings.fixed and method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._fixed(path, receive, send)
            return
        body = await _read_body(receive)
        if path.startswith("/sim/"):
            await self._control(path, method, body, send)
            return
        if time.monotonic() < self.loading_until:
            await _json(send, 503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
            return
        try:
            if path == "/health" and method == "GET":
                await _json(send, 200, {"status": "ok"})
            elif path == "/props" and method == "GET":
                await _json(send, 200, self._props())
            elif path == "/slots" and method == "GET":
                await _json(send, 200, self._slots_json())
            elif path.startswith("/slots/") and method == "POST":
                await self._slot_file(path, scope.get("query_string", b"").decode(), body, send)
            elif path == "/metrics" and method == "GET":
                await _send(send, 200, self._metrics(), b"text/plain; version=0.0.4")
            elif path in ("/v1/models", "/models") and method == "GET":
                await _json(send, 200, self._models())
            elif path == "/tokenize" and method == "POST":
                req = orjson.loads(body or b"{}")
                await _json(send, 200, {"tokens": tokenize(str(req.get("content", "")))})
            elif self.settings.native and method == "POST" and path in _NATIVE:
                await self._native(path, orjson.loads(body), receive, send)
            elif path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
                await self._completion(orjson.loads(body), receive, send, chat=True)
            elif path in ("/v1/completions", "/completions") and method == "POST":
                await self._completion(orjson.loads(body), receive, send, chat=False)
            elif path in ("/v1/embeddings", "/embeddings") and method == "POST":
                await self._embeddings(orjson.loads(body), send)
            elif path in ("/v1/moderations", "/moderations") and method == "POST":
                await self._moderations(orjson.loads(body), send)
            else:
                await _json(send, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        except orjson.JSONDecodeError:
            await _json(send, 400, {"error": {"code": 400, "message": "invalid JSON", "type": "invalid_request_error"}})

    def _keep_alive(self, scope: Scope, send: Any) -> Any:
        """The connection's keep-alive habits: `send`, wrapped to note when the answer ends (and to add
        Connection: close on the last request allowed), or None when the connection was closed instead."""
        s = self.settings
        transport = getattr(getattr(send, "__self__", None), "transport", None)  # uvicorn's request cycle has it
        if transport is None:
            return send  # not under uvicorn: no connection to speak of
        connection = transport.get_protocol()
        connections = self._connections
        state = connections.get(connection)
        if state is not None:
            idle = s.keep_alive_s and time.monotonic() - state[1] >= s.keep_alive_s
            if idle or s.drop_reused_next > 0:
                if not idle:
                    self.settings = dataclasses.replace(s, drop_reused_next=s.drop_reused_next - 1)
                del connections[connection]
                self.stats["dropped_reused"] += 1
                transport.close()
                return None
        state = connections[connection] = [state[0] + 1 if state is not None else 1, float("inf")]
        last = s.max_requests_per_connection and state[0] >= s.max_requests_per_connection
        if last:
            del connections[connection]

        async def noting(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and last:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state[1] = time.monotonic()

        return noting

    # -- control ------------------------------------------------------------------------------

    async def _control(self, path: str, method: str, body: bytes, send: Any) -> None:
        if path == "/sim/stats":
            await _json(send, 200, self.stats)
            return
        if path == "/sim/last-guard-prompt":
            await _json(send, 200, {"prompt": self.last_guard_prompt})
            return
        if path == "/sim/control" and method == "POST":
            changes = orjson.loads(body or b"{}")
            loading = changes.pop("loading", None)
            names = {f.name for f in dataclasses.fields(SimSettings)}
            unknown = set(changes) - names
            if unknown:
                await _json(send, 400, {"error": f"unknown settings {sorted(unknown)}"})
                return
            self.settings = dataclasses.replace(self.settings, **changes)
            if loading is True:
                self.loading_until = float("inf")
            elif loading is False:
                self.loading_until = 0.0
            self._prepare_fixed()
            await _json(send, 200, dataclasses.asdict(self.settings))
            return
        await _json(send, 404, {"error": "unknown control path"})

    # -- endpoints ------------------------------------------------------------------------------

    def _props(self) -> dict[str, Any]:
        return {
            "default_generation_settings": {"n_ctx": self.settings.n_ctx, "params": {"temperature": 0.8}},
            "total_slots": self.settings.slots,
            "model_alias": self.settings.model_alias,
            "model_path": f"/models/{self.settings.model_alias}",
            "modalities": {"vision": False, "audio": False},
            "build_info": "portcullis-sim",
        }

    async def _slot_file(self, path: str, query: str, body: bytes, send: Any) -> None:
        """POST /slots/{id}?action=save|restore {"filename"}: a slot's cached tokens to or from --slot-save-path."""
        action = dict(p.partition("=")[::2] for p in query.split("&") if p).get("action")
        folder = self.settings.slot_save_path
        try:
            slot = int(path.rsplit("/", 1)[1])
            filename = str(orjson.loads(body or b"{}").get("filename", ""))
        except (ValueError, orjson.JSONDecodeError, AttributeError):
            await _json(send, 400, _invalid("bad request"))
            return
        if folder is None:
            message = "This server does not support slots action. Use --slot-save-path to enable it."
            await _json(send, 501, {"error": {"code": 501, "message": message, "type": "not_supported_error"}})
            return
        if not 0 <= slot < self.settings.slots or not filename or "/" in filename or filename.startswith("."):
            await _json(
                send,
                400,
                {"error": {"code": 400, "message": "invalid slot or filename", "type": "invalid_request_error"}},
            )
            return
        file = Path(folder) / filename
        if action == "save":
            file.write_bytes(orjson.dumps(self._slot_cache[slot]))
            self.stats["slot_saves"] += 1
            await _json(send, 200, {"id_slot": slot, "filename": filename, "n_saved": len(self._slot_cache[slot])})
        elif action == "restore" and file.exists():
            self._slot_cache[slot] = [int(t) for t in orjson.loads(file.read_bytes())]
            self._slot_used[slot] = time.monotonic()
            self.stats["slot_restores"] += 1
            await _json(send, 200, {"id_slot": slot, "filename": filename, "n_restored": len(self._slot_cache[slot])})
        else:
            await _json(
                send, 400, {"error": {"code": 400, "message": "failed to restore", "type": "invalid_request_error"}}
            )

    def _slots_json(self) -> list[dict[str, Any]]:
        # (llama-server's shape: the tokens the slot holds, and what its current request has generated)
        return [
            {
                "id": i,
                "n_ctx": self.settings.n_ctx,
                "is_processing": busy,
                "n_prompt_tokens": self._slot_prompt[i] if busy else len(self._slot_cache[i]),
                "next_token": [{"n_decoded": 0}],
            }
            for i, busy in enumerate(self._slot_busy)
        ]

    def _models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.settings.model_alias,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "llamacpp",
                    "meta": {"n_ctx_train": self.settings.n_ctx, "n_vocab": 1 << 16},
                }
            ],
        }

    def _metrics(self) -> bytes:
        s = self.stats
        lines = [
            "# TYPE llamacpp:prompt_tokens_total counter",
            f"llamacpp:prompt_tokens_total {s['prompt_tokens']}",
            "# TYPE llamacpp:tokens_predicted_total counter",
            f"llamacpp:tokens_predicted_total {s['predicted_tokens']}",
            "# TYPE llamacpp:requests_processing gauge",
            f"llamacpp:requests_processing {s['active']}",
            "# TYPE llamacpp:requests_deferred gauge",
            f"llamacpp:requests_deferred {s['waiting']}",
            "# TYPE llamacpp:n_decode_total counter",
            f"llamacpp:n_decode_total {s['predicted_tokens']}",
        ]
        return ("\n".join(lines) + "\n").encode()

    def _vector(self, text: str) -> list[float]:
        dim = self.settings.embedding_dim
        if self.settings.embedding_mode != "words":
            rng = random.Random(hashlib.sha256(text.encode()).digest())
            return [rng.gauss(0, 1) for _ in range(dim)]
        vec = [0.0] * dim
        for word in re.findall(r"\w+", text.lower()):
            rng = random.Random(hashlib.sha256(word.encode()).digest())
            for i in range(dim):
                vec[i] += rng.gauss(0, 1)
        return vec

    async def _embeddings(self, req: dict[str, Any], send: Any) -> None:
        inputs = req.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        self.stats["embedding_calls"] += 1
        self.stats["embedding_inputs"] += len(inputs) if isinstance(inputs, list) else 0
        if not isinstance(inputs, list) or not inputs:
            await _json(
                send,
                400,
                {"error": {"code": 400, "message": '"input" must be provided', "type": "invalid_request_error"}},
            )
            return
        data, total = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            n = len(tokenize(text)) if isinstance(item, str) else len(item)
            if n > self.settings.n_ctx:
                await _json(send, 400, _context_error(n, self.settings.n_ctx))
                return
            total += n
            vec = self._vector(text)
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            data.append({"object": "embedding", "index": i, "embedding": [v / norm for v in vec]})
        self.stats["prompt_tokens"] += total
        await _json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "model": self.settings.model_alias,
                "usage": {"prompt_tokens": total, "total_tokens": total},
            },
        )

    async def _moderations(self, req: dict[str, Any], send: Any) -> None:
        """OpenAI's moderation endpoint: a text is flagged with the category of each trigger phrase it holds."""
        self.stats["moderation_calls"] += 1
        if self.settings.moderation_delay_ms:
            await asyncio.sleep(self.settings.moderation_delay_ms / 1000)
        inputs = req.get("input")
        items = [inputs] if isinstance(inputs, str) else inputs if isinstance(inputs, list) else []
        texts = [_text_of([i]) if isinstance(i, dict) else str(i) for i in items]
        results = []
        for text in texts:
            low = text.lower()
            hits = {category for phrase, category in self.settings.moderation_triggers.items() if phrase.lower() in low}
            names = [*_MODERATION_CATEGORIES, *sorted(hits - set(_MODERATION_CATEGORIES))]
            results.append(
                {
                    "flagged": bool(hits),
                    "categories": {c: c in hits for c in names},
                    "category_scores": {c: 0.9 if c in hits else 0.01 for c in names},
                }
            )
        await _json(send, 200, {"id": "modr-sim", "model": req.get("model") or "sim-moderation", "results": results})

    def _guard_verdict(self, prompt: str) -> str:
        """What a Llama Guard model would answer, from the trigger phrases in the conversation part."""
        start = prompt.find(_GUARD_MARK)
        end = prompt.find("<END CONVERSATION>", start)
        low = prompt[start : end if end > start else None].lower()
        codes = sorted({code for phrase, code in self.settings.guard_triggers.items() if phrase.lower() in low})
        return "unsafe\n" + ",".join(codes) if codes else "safe"

    async def _completion(self, req: dict[str, Any], receive: Any, send: Any, *, chat: bool) -> None:
        s = self.settings
        self.stats["requests"] += 1
        if chat:
            messages = req.get("messages") or []
            prompt_text = "\n".join(
                f"{m.get('role')}: {_text_of(m.get('content'))}" for m in messages if isinstance(m, dict)
            )
            prompt_ids = chat_ids(messages)
        else:
            prompt = req.get("prompt", "")
            prompt_text = prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
            prompt_ids = tokenize(prompt_text) if isinstance(prompt, str) else [0] * (len(prompt_text) // 3)
        n_prompt = len(prompt_ids)
        if s.fail_next > 0:
            self.settings = s = dataclasses.replace(s, fail_next=s.fail_next - 1)
            headers = [(b"retry-after", f"{s.fail_retry_after:g}".encode())] if s.fail_retry_after is not None else []
            body = {"error": {"code": s.fail_status, "message": "simulated failure", "type": "server_error"}}
            await send(
                {
                    "type": "http.response.start",
                    "status": s.fail_status,
                    "headers": [(b"content-type", b"application/json"), *headers],
                }
            )
            await send({"type": "http.response.body", "body": orjson.dumps(body)})
            return
        roll = random.random()
        if roll < s.error_rate:
            await _json(send, 500, {"error": {"code": 500, "message": "simulated failure", "type": "server_error"}})
            return
        if roll < s.error_rate + s.unavailable_rate:
            await _json(
                send, 503, {"error": {"code": 503, "message": "Service Unavailable", "type": "unavailable_error"}}
            )
            return
        if roll < s.error_rate + s.unavailable_rate + s.hang_rate:
            await _wait_disconnect(receive)
            self.stats["cancelled"] += 1
            return
        if n_prompt >= s.n_ctx:
            await _json(send, 400, _context_error(n_prompt, s.n_ctx))
            return
        stream_fault = None
        fault_roll = random.random()
        if fault_roll < s.drop_rate:
            stream_fault = "drop"
        elif fault_roll < s.drop_rate + s.stream_error_rate:
            stream_fault = "error"

        max_tokens = _n_predict(req)
        temperature = req.get("temperature", 0.8)
        seed = req.get("seed")
        if temperature == 0:
            rng = random.Random(hashlib.sha256(f"{prompt_text}|{max_tokens}".encode()).digest())
        elif isinstance(seed, int):
            rng = random.Random(f"{seed}|{prompt_text}")
        else:
            rng = random.Random()
        natural = rng.randint(max(1, s.default_max_tokens // 2), max(1, s.default_max_tokens))
        limit = min(max_tokens if max_tokens is not None and max_tokens > 0 else natural, s.n_ctx - n_prompt)
        if req.get("ignore_eos") is True and max_tokens is not None and max_tokens > 0:
            natural = limit + 1  # (llama-server's ignore_eos: no natural end, the length limit decides)
        n_gen = min(natural, limit)
        finish = "stop" if n_gen == natural else "length"
        words = [(" " if i else "") + rng.choice(_WORDS) for i in range(n_gen)]
        guard = chat and _GUARD_MARK in prompt_text
        if guard or s.reply is not None:
            if guard:
                self.stats["guard_calls"] += 1
                self.last_guard_prompt = prompt_text  # tests read it: what a guard model was shown
            script = [self._guard_verdict(prompt_text)] if guard else re.findall(r"\s*\S+", s.reply or "")
            words = script[: max(0, limit)]
            finish = "stop" if len(words) == len(script) else "length"

        call = _tool_call(req, rng) if chat else None
        if call is not None:
            words, finish = [], "tool_calls"
        elif chat and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
            script = re.findall(r"\s*\S+", "The tool answered: " + _text_of(messages[-1].get("content")))
            words = script[: max(0, limit)]
            finish = "stop" if len(words) == len(script) else "length"
        thoughts = [(" " if i else "") + rng.choice(_WORDS) for i in range(s.reasoning_words)] if chat else []
        stopped_by = None
        if call is None:
            words, stopped_by = _cut_at_stop(words, req.get("stop"))
            finish = "stop" if stopped_by else finish

        stream = bool(req.get("stream"))
        disconnected = asyncio.Event()
        watcher = asyncio.ensure_future(_wait_disconnect(receive, disconnected))
        self.stats["waiting"] += 1
        if self._slots.locked():  # every slot busy: this one waits in the silent queue
            self.stats["max_waiting"] = max(self.stats["max_waiting"], self.stats["waiting"])
        try:
            async with self._slots:
                self.stats["waiting"] -= 1
                slot, cached = self._take_slot(prompt_ids, req.get("id_slot"))
                self._slot_busy[slot] = True
                self._slot_prompt[slot] = len(prompt_ids)
                self.stats["active"] += 1
                self.stats["max_active"] = max(self.stats["max_active"], self.stats["active"])
                try:
                    ok = await self._generate(
                        req,
                        send,
                        disconnected,
                        chat=chat,
                        stream=stream,
                        words=words,
                        n_prompt=n_prompt,
                        cached=cached,
                        finish=finish,
                        fault=stream_fault,
                        call=call,
                        thoughts=thoughts,
                        stopped_by=stopped_by,
                    )
                    # The slot's cache now holds this prompt and its answer (llama-server keeps them).
                    self._slot_cache[slot] = prompt_ids + [t for w in words for t in tokenize(w)]
                finally:
                    self._slot_used[slot] = time.monotonic()
                    self._slot_busy[slot] = False
                    self.stats["active"] -= 1
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        finally:
            watcher.cancel()
        self.stats["completed" if ok else "cancelled"] += 1

    def _take_slot(self, prompt: list[int], wanted: Any = None) -> tuple[int, int]:
        """The idle slot for a prompt (llama-server's choice: the longest cached prefix if similar enough,
        else the least recently used; `id_slot` when the request names an idle one) and how many of its tokens that
        slot has cached."""
        s = self.settings
        idle = [i for i, busy in enumerate(self._slot_busy) if not busy]
        if isinstance(wanted, int) and wanted in idle:
            idle = [wanted]
        best, best_common = None, 0
        if s.prompt_cache:
            for i in idle:
                common = _common_prefix(self._slot_cache[i], prompt)
                if common > best_common:
                    best, best_common = i, common
        if best is None or best_common < s.slot_similarity * len(prompt):
            best = min(idle, key=lambda i: self._slot_used[i])
            best_common = _common_prefix(self._slot_cache[best], prompt) if s.prompt_cache else 0
        # At least one prompt token is always computed (its logits start the answer).
        return best, min(best_common, max(0, len(prompt) - 1))

    async def _generate(
        self,
        req: dict[str, Any],
        send: Any,
        disconnected: asyncio.Event,
        *,
        chat: bool,
        stream: bool,
        words: list[str],
        n_prompt: int,
        cached: int,
        finish: str,
        fault: str | None,
        call: dict[str, Any] | None = None,
        thoughts: list[str] = (),  # type: ignore[assignment]
        stopped_by: str | None = None,
    ) -> bool:
        s = self.settings
        cid = ("chatcmpl-" if chat else "cmpl-") + random.randbytes(12).hex()
        created = int(time.time())
        t0 = time.perf_counter()
        prefill_s = (s.ttft_ms + (n_prompt - cached) * s.prompt_ms_per_token) / 1000
        if prefill_s and await _sleep_or_gone(prefill_s, disconnected):
            return False
        t_prompt = time.perf_counter()
        self.stats["prompt_tokens"] += n_prompt
        self.stats["prompt_tokens_cached"] += cached
        delay = 1.0 / s.tokens_per_s if s.tokens_per_s > 0 else 0.0
        base = {"id": cid, "created": created, "model": s.model_alias, "system_fingerprint": "b0-portcullis-sim"}

        def timings(n: int) -> dict[str, Any]:
            gen_ms = (time.perf_counter() - t_prompt) * 1000
            prompt_ms = (t_prompt - t0) * 1000
            processed = n_prompt - cached
            return {
                "cache_n": cached,
                "prompt_n": processed,
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / max(processed, 1),
                "prompt_per_second": processed / (prompt_ms / 1000) if prompt_ms else 0.0,
                "predicted_n": n,
                "predicted_ms": gen_ms,
                "predicted_per_token_ms": gen_ms / max(n, 1),
                "predicted_per_second": n / (gen_ms / 1000) if gen_ms else 0.0,
            }

        def usage(n: int) -> dict[str, Any]:
            return {
                "completion_tokens": n,
                "prompt_tokens": n_prompt,
                "total_tokens": n + n_prompt,
                "prompt_tokens_details": {"cached_tokens": cached},
            }

        if not stream:
            for _ in words:
                if delay and await _sleep_or_gone(delay, disconnected):
                    return False
            self.stats["predicted_tokens"] += len(words)
            text = "".join(words)
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text if call is None else None}
                if call is not None:
                    message["tool_calls"] = [call]
                if thoughts:
                    message["reasoning_content"] = "".join(thoughts)
                choice = {"finish_reason": finish, "index": 0, "message": message}
                obj = {**base, "object": "chat.completion", "choices": [choice]}
            else:
                choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
                obj = {**base, "object": "text_completion", "choices": [choice]}
            if stopped_by:
                choice["stop_reason"] = stopped_by
            spent = len(words) + len(thoughts) + (len(tokenize(call["function"]["arguments"])) if call else 0)
            obj["usage"] = usage(spent)
            obj["timings"] = timings(spent)
            if s.echo_request:
                obj["sim_request"] = req
            await _json(send, 200, obj)
            return True

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )

        async def event(payload: dict[str, Any]) -> None:
            if s.stamp_chunks:
                payload["sim_emitted_at"] = time.time()
            await send(
                {"type": "http.response.body", "body": b"data: " + orjson.dumps(payload) + b"\n\n", "more_body": True}
            )

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            await event(
                {
                    **base,
                    "object": chunk_kind,
                    "choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}],
                }
            )
        last_ping = time.monotonic()
        for thought in thoughts:
            if delay and await _sleep_or_gone(delay, disconnected):
                return False
            thinking = {"finish_reason": None, "index": 0, "delta": {"reasoning_content": thought}}
            await event({**base, "object": chunk_kind, "choices": [thinking]})
        if call is not None:  # the call's name first, then its arguments in two pieces (as llama-server streams them)
            head = {
                "index": 0,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            for part in (
                {"tool_calls": [head]},
                *(
                    {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}
                    for a in (arguments[:half], arguments[half:])
                ),
            ):
                await event(
                    {**base, "object": chunk_kind, "choices": [{"finish_reason": None, "index": 0, "delta": part}]}
                )
        for i, word in enumerate(words):
            if fault and i == s.fault_after_tokens:
                if fault == "drop":
                    raise _Drop
                await send(
                    {
                        "type": "http.response.body",
                        "more_body": False,
                        "body": b"data: "
                        + orjson.dumps(
                            {"error": {"code": 500, "message": "simulated decode failure", "type": "server_error"}}
                        )
                        + b"\n\n",
                    }
                )
                return True
            if delay:
                if s.ping_interval_s and time.monotonic() - last_ping >= s.ping_interval_s:
                    await send({"type": "http.response.body", "body": b":\n\n", "more_body": True})
                    last_ping = time.monotonic()
                if await _sleep_or_gone(delay, disconnected):
                    return False
            if disconnected.is_set():
                return False
            self.stats["predicted_tokens"] += 1
            if chat:
                delta: dict[str, Any] = {"finish_reason": None, "index": 0, "delta": {"content": word}}
            else:
                delta = {"text": word, "index": 0, "logprobs": None, "finish_reason": None}
            await event({**base, "object": chunk_kind, "choices": [delta]})
        final_choice: dict[str, Any] = (
            {"finish_reason": finish, "index": 0, "delta": {}}
            if chat
            else {"text": "", "index": 0, "logprobs": None, "finish_reason": finish}
        )
        if stopped_by:
            final_choice["stop_reason"] = stopped_by
        last: dict[str, Any] = {**base, "object": chunk_kind, "choices": [final_choice]}
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        if include_usage:
            await event(last)
            spent = len(words) + len(thoughts) + (len(tokenize(call["function"]["arguments"])) if call else 0)
            last = {**base, "object": chunk_kind, "choices": [], "usage": usage(spent)}
        last["timings"] = timings(len(words))
        await event(last)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return True

    # -- llama-server's own APIs ----------------------------------------------------------------

    async def _native(self, path: str, req: dict[str, Any], receive: Any, send: Any) -> None:
        """What llama-server answers besides the OpenAI routes. Like llama-server (which converts these APIs to
        its chat handling internally), the Messages and Responses APIs are answered by the chat completion they
        mean, encoded in the API's shape."""
        from portcullis.errors import GatewayError
        from portcullis.surfaces import llama, messages, responses

        if path.startswith("/v1/") or path in ("/completion", "/infill"):  # (not the tokenizer's and template's)
            self.stats["native"] += 1
        try:
            if path == "/detokenize":
                await _json(send, 200, {"content": detokenize(req.get("tokens") or [])})
                return
            if path == "/apply-template":
                await _json(send, 200, {"prompt": chat_template(req.get("messages") or [])})
                return
            if path in ("/v1/rerank", "/rerank"):
                await _json(send, 200, _rerank(req))
                return
            if path in ("/completion", "/infill"):
                infill = path == "/infill"
                completion = llama.to_completion(req, infill=infill)
                encoding = _Encoding(send, llama.Completion(str(req.get("model")), infill=infill))
                if isinstance(req.get("n_probs"), int) and req["n_probs"] > 0:
                    encoding.probabilities = True  # llama-server's completion_probabilities, a token at a time
                await self._completion(completion, receive, encoding, chat=False)
                return
            if path == "/v1/messages/count_tokens":
                chat = messages.count_tokens_chat(req)
                await _json(send, 200, {"input_tokens": len(chat_ids(chat["messages"]))})
                return
            if path in ("/v1/responses/input_tokens", "/v1/chat/completions/input_tokens"):
                chat = responses.to_chat(req, []) if path.startswith("/v1/responses") else req
                kind = "response.input_tokens" if path.startswith("/v1/responses") else "chat.completion.input_tokens"
                await _json(send, 200, {"object": kind, "input_tokens": len(chat_ids(chat.get("messages") or []))})
                return
            if path == "/v1/messages":
                surface = messages.Messages(str(req.get("model")), req.get("stop_sequences"))
                chat = messages.to_chat(req)
            else:
                chat, surface = responses.to_chat(req, []), responses.Responses(req)  # type: ignore[assignment]
        except GatewayError as exc:
            await _json(send, exc.status, {"error": {"code": exc.status, "message": exc.message, "type": exc.type}})
            return
        chat["stream_options"] = {"include_usage": True}
        await self._completion(chat, receive, _Encoding(send, surface), chat=True)

    # -- fixed mode -----------------------------------------------------------------------------

    def _prepare_fixed(self) -> None:
        base = {
            "id": "chatcmpl-fixed",
            "created": 1700000000,
            "model": self.settings.model_alias,
            "system_fingerprint": "b0-portcullis-sim",
            "usage": {"completion_tokens": 9, "prompt_tokens": 12, "total_tokens": 21},
        }
        self._fixed_chat = orjson.dumps(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "finish_reason": "stop",
                        "index": 0,
                        "message": {"role": "assistant", "content": "This is a fixed answer from the simulator."},
                    }
                ],
            }
        )
        self._fixed_completion = orjson.dumps(
            {
                **base,
                "object": "text_completion",
                "choices": [
                    {
                        "text": "This is a fixed answer from the simulator.",
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    async def _fixed(self, path: str, receive: Any, send: Any) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        body = self._fixed_chat if path == "/v1/chat/completions" else self._fixed_completion
        await _send(send, 200, body, b"application/json")


_NATIVE = frozenset(
    {
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/v1/chat/completions/input_tokens",
        "/apply-template",
        "/detokenize",
        "/completion",
        "/infill",
        "/v1/rerank",
        "/rerank",
    }
)


def _cut_at_stop(words: list[str], stop: Any) -> tuple[list[str], str | None]:
    """The words up to the first stop string (which is not sent, as llama-server does), and that string. The
    answer names it as vLLM does, in the choice's `stop_reason` (llama-server's chat completion does not say; its
    own Messages answer does, as `stop_sequence`): so the Messages API's stop_sequence is tested both ways."""
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if isinstance(s, str)]
    text = "".join(words)
    found = min(((text.find(s), s) for s in stops if s and s in text), default=None)
    if found is None:
        return words, None
    at, matched = found
    kept, length = [], 0
    for word in words:
        if length + len(word) > at:
            if at > length:
                kept.append(word[: at - length])
            break
        kept.append(word)
        length += len(word)
    return kept, matched


def _rerank(req: dict[str, Any]) -> dict[str, Any]:
    """llama-server's rerank (--reranking): a document's score is the share of the query's words it holds."""
    query = {w.lower() for w in _TOKEN_RE.findall(str(req.get("query", "")))}
    documents = [str(d) for d in req.get("documents") or []]
    scored = []
    for i, doc in enumerate(documents):
        words = {w.lower() for w in _TOKEN_RE.findall(doc)}
        scored.append({"index": i, "relevance_score": len(query & words) / max(1, len(query))})
    scored.sort(key=lambda r: -r["relevance_score"])
    top_n = req.get("top_n")
    if isinstance(top_n, int) and top_n > 0:
        scored = scored[:top_n]
    tokens = len(tokenize(str(req.get("query", "")))) + sum(len(tokenize(d)) for d in documents)
    return {
        "model": req.get("model"),
        "object": "list",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": scored,
    }


class _Encoding:
    """An ASGI `send` that turns the chat answer (whole or streamed) into another API's (a surface's)."""

    def __init__(self, send: Any, surface: Any) -> None:
        self.send = send
        self.surface = surface
        self.status = 200
        self.sse = False
        self.body = b""
        self.probabilities = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = dict(message.get("headers") or [])
            self.sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            await self.send(message)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.status != 200:
            await self.send(message)
            return
        if not self.sse:
            self.body += body
            if not more:
                answer = await self.surface.answer(orjson.loads(self.body))
                if self.probabilities:
                    answer["completion_probabilities"] = [
                        {"token": piece, "logprob": -0.5, "top_logprobs": [{"token": piece, "logprob": -0.5}]}
                        for piece in re.findall(r"\s*\S+", answer.get("content", ""))
                    ]
                await self.send({"type": "http.response.body", "body": orjson.dumps(answer)})
            return
        out = b""
        for line in body.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                out += await self.surface.end()
                continue
            chunk = orjson.loads(data)
            if "error" in chunk:
                err = chunk["error"]
                out += self.surface.error(err.get("message", ""), type=err.get("type", "server_error"), code=None)
                continue
            out += self.surface.events([chunk])
        await self.send({"type": "http.response.body", "body": out, "more_body": more})


def _invalid(message: str) -> dict[str, Any]:
    return {"error": {"code": 400, "message": message, "type": "invalid_request_error"}}


def _context_error(n_prompt: int, n_ctx: int) -> dict[str, Any]:
    return {
        "error": {
            "code": 400,
            "message": f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), "
            "try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": n_prompt,
            "n_ctx": n_ctx,
        }
    }


async def _read_body(receive: Any) -> bytes:
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _wait_disconnect(receive: Any, event: asyncio.Event | None = None) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if event is not None:
                event.set()
            return


async def _sleep_or_gone(seconds: float, disconnected: asyncio.Event) -> bool:
    """Sleep; True if the client went away meanwhile."""
    if disconnected.is_set():
        return True
    try:
        await asyncio.wait_for(disconnected.wait(), timeout=seconds)
        return True
    except TimeoutError:
        return False


async def _send(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Any, status: int, obj: Any) -> None:
    await _send(send, status, orjson.dumps(obj), b"application/json; charset=utf-8")
