"""Moderators that ask a model: an OpenAI-compatible moderation endpoint, or a guard model of the catalog.

Both answer one question: which categories does the judged text violate? They see a conversation as
(role, text) turns and judge the turns of one role (the user's for input, the assistant's for output).
Their failures raise `ModeratorError`; the pipeline (moderation.py) applies the moderator's timeout and
`on_error` policy, so a moderator never decides what a failure means.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from portcullis.config import GuardModelConfig, OpenAIModerationConfig
from portcullis.errors import ServiceUnavailable
from portcullis.routing.balancer import choose
from portcullis.routing.catalog import Catalog, Replica, SideCall
from portcullis.upstream.client import one_shot_session, stale_connection

if TYPE_CHECKING:
    from portcullis.exchange import Exchange
    from portcullis.routing.admission import Target

# OpenAI's moderation categories (omni-moderation); `/v1/moderations` always lists all of them.
OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

# Llama Guard 3's hazard taxonomy (MLCommons): the code the model answers with → the name reported.
LLAMA_GUARD_CATEGORIES = {
    "S1": "violent_crimes",
    "S2": "non_violent_crimes",
    "S3": "sex_related_crimes",
    "S4": "child_sexual_exploitation",
    "S5": "defamation",
    "S6": "specialized_advice",
    "S7": "privacy",
    "S8": "intellectual_property",
    "S9": "indiscriminate_weapons",
    "S10": "hate",
    "S11": "suicide_and_self_harm",
    "S12": "sexual_content",
    "S13": "elections",
    "S14": "code_interpreter_abuse",
}
# So that `/v1/moderations` served by a guard model sets OpenAI's fields too (`result.categories.violence`).
OPENAI_EQUIVALENT = {
    "violent_crimes": "violence",
    "indiscriminate_weapons": "illicit/violent",
    "non_violent_crimes": "illicit",
    "sex_related_crimes": "sexual",
    "child_sexual_exploitation": "sexual/minors",
    "hate": "hate",
    "suicide_and_self_harm": "self-harm",
    "sexual_content": "sexual",
}

GUARD_TEMPLATE = """Task: Check if there is unsafe content in '{role}' messages in conversations according to our \
safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{conversation}

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""

Turns = list[tuple[str, str]]  # (role: "user" | "assistant", text)
# A guard call's admission: `async with slots(model) as (target, exchange)` holds one of the model's slots
# (moderation.GuardSlots); the call goes to the target's replicas and names the one it asked on the exchange.
Slots = Callable[[str], AbstractAsyncContextManager[tuple["Target", "Exchange"]]]


class ModeratorError(Exception):
    """The moderator could not give a verdict (unreachable, an error answer, an answer it cannot parse)."""


class RemoteModerator:
    kind = ""

    def __init__(self, name: str, config: OpenAIModerationConfig | GuardModelConfig) -> None:
        self.name = name
        self.timeout_s = config.timeout_s
        self.on_error = config.on_error
        self.action = config.action

    async def categories(self, turns: Turns, judged: str, slots: Slots | None = None) -> dict[str, float | None]:
        """The violated categories of the `judged` role's turns, with a score where the moderator gives one.
        `slots`: a guard model's call takes a slot of its gate first (an outside endpoint has no gate here)."""
        raise NotImplementedError

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class OpenAIModeration(RemoteModerator):
    kind = "openai_moderation"

    def __init__(self, name: str, config: OpenAIModerationConfig) -> None:
        super().__init__(name, config)
        self.url = config.url + "/v1/moderations"
        self.model = config.model
        self.thresholds = dict(config.thresholds)
        self.known = set(OPENAI_CATEGORIES) | set(self.thresholds)
        key = config.api_key()
        self.headers = {"content-type": "application/json"}
        if key:
            self.headers["authorization"] = f"Bearer {key}"
        self.session: aiohttp.ClientSession | None = None
        self.fresh: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Idle connections are not reused after 4 s: servers (uvicorn, llama-server) close theirs after 5.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=4),
            skip_auto_headers=("User-Agent",),
        )
        self.fresh = one_shot_session()

    async def close(self) -> None:
        for session in (self.session, self.fresh):
            if session is not None:
                await session.close()

    async def categories(self, turns: Turns, judged: str, slots: Slots | None = None) -> dict[str, float | None]:
        texts = [text for role, text in turns if role == judged and text]
        if not texts:
            return {}
        body: dict[str, Any] = {"input": texts}
        if self.model:
            body["model"] = self.model
        assert self.session is not None, "start() first"
        data = orjson.dumps(body)
        try:
            try:
                async with self.session.post(self.url, data=data, headers=self.headers) as resp:
                    raw = await resp.read()
                    status = resp.status
            except Exception as exc:
                if not stale_connection(exc) or self.fresh is None:
                    raise
                # The pooled connection had been closed by the server: once more, on a fresh one.
                async with self.fresh.post(self.url, data=data, headers=self.headers) as resp:
                    raw = await resp.read()
                    status = resp.status
        except (aiohttp.ClientError, OSError) as exc:
            raise ModeratorError(f"unreachable ({type(exc).__name__})") from exc
        if status != 200:
            raise ModeratorError(f"answered with status {status}")
        try:
            results = orjson.loads(raw)["results"]
            assert isinstance(results, list)
        except Exception as exc:
            raise ModeratorError("answered without a results list") from exc
        hits: dict[str, float | None] = {}
        for result in results:
            if not isinstance(result, dict):
                continue
            flags = result.get("categories") or {}
            scores = result.get("category_scores") or {}
            for category in set(flags) | set(scores):
                score = scores.get(category)
                score = float(score) if isinstance(score, int | float) else None
                threshold = self.thresholds.get(category)
                hit = (score is not None and score >= threshold) if threshold is not None else bool(flags.get(category))
                if hit:
                    # Metrics labels stay bounded: a category nobody configured or OpenAI never named is "other".
                    label = category if category in self.known else "other"
                    hits[label] = max(hits.get(label) or 0.0, score or 0.0) if score is not None else hits.get(label)
        return hits


class GuardModel(RemoteModerator):
    """Asks a guard model (Llama Guard or any model told to answer the same way) through the catalog's replicas."""

    kind = "guard_model"

    def __init__(self, name: str, config: GuardModelConfig, catalog: Catalog, call: SideCall) -> None:
        super().__init__(name, config)
        self.model = config.model
        self.catalog = catalog
        self.call = call
        self.codes = dict(config.categories or LLAMA_GUARD_CATEGORIES)
        self.template = config.template or GUARD_TEMPLATE
        self.max_tokens = config.max_tokens
        self.listing = "\n".join(f"{code}: {name.replace('_', ' ').capitalize()}." for code, name in self.codes.items())

    def prompt(self, turns: Turns, judged: str) -> str:
        role = "User" if judged == "user" else "Agent"
        conversation = "\n\n".join(f"{'User' if r == 'user' else 'Agent'}: {text}" for r, text in turns if text)
        return (
            self.template.replace("{role}", role)
            .replace("{categories}", self.listing)
            .replace("{conversation}", conversation)
        )

    async def categories(self, turns: Turns, judged: str, slots: Slots | None = None) -> dict[str, float | None]:
        if slots is None:
            return await self._ask(self.catalog.models[self.model], turns, judged, None)
        try:
            async with slots(self.model) as (target, ex):
                return await self._ask(target.replicas, turns, judged, ex)
        except ServiceUnavailable as exc:  # admission's refusal (queue full, waited too long, no replica)
            raise ModeratorError(f"the guard model '{self.model}' has no free slot ({exc.code})") from exc

    async def _ask(
        self, replicas: list[Replica], turns: Turns, judged: str, ex: Exchange | None
    ) -> dict[str, float | None]:
        replica = choose(replicas)
        if replica is None or replica.client is None:
            raise ModeratorError(f"no replica of the guard model '{self.model}' is available")
        body = {
            "model": replica.upstream_model or self.model,
            "messages": [{"role": "user", "content": self.prompt(turns, judged)}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": False,
        }
        if ex is not None:
            ex.replica = replica
        try:
            status, answer = await self.call(replica, "/v1/chat/completions", body, model=self.model, load=True)
        except Exception as exc:
            raise ModeratorError(f"the guard model could not be reached ({type(exc).__name__})") from exc
        if status != 200:
            raise ModeratorError(f"the guard model answered with status {status}")
        try:
            text = answer["choices"][0]["message"]["content"] or ""
        except Exception as exc:
            raise ModeratorError("the guard model's answer has no message") from exc
        return self.parse(text)

    def parse(self, text: str) -> dict[str, float | None]:
        """'safe' → {}; 'unsafe' and a line of codes → their names (unknown codes are 'unknown')."""
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        verdict = lines[0].lower().rstrip(".") if lines else ""
        if verdict == "safe":
            return {}
        if verdict != "unsafe":
            raise ModeratorError("the guard model answered neither 'safe' nor 'unsafe'")
        codes = [c.strip().upper() for c in (lines[1] if len(lines) > 1 else "").replace(" ", ",").split(",")]
        names: dict[str, float | None] = {self.codes.get(code, "unknown"): None for code in codes if code}
        return names or {"unspecified": None}
