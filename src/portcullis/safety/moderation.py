"""The moderation stage: named moderators, arranged per model and tier into an input and an output pipeline.

A pipeline runs its local `rules` first, whatever their place in the list: they cost microseconds, and
their redactions must be in place before any text leaves the gateway (a hosted moderation API never
sees the e-mail address a rule redacts). Then the remote moderators (an OpenAI-compatible moderation
endpoint, a guard model) in the listed order, stopping at the first that blocks. Each remote moderator has
its own timeout and `on_error`: fail_open lets the content through, fail_closed refuses it (503
moderation_unavailable: the content was not judged bad, it could not be judged).

Input (`screen`, one `async with` in the chat and completions handlers, around cache and upstream):
user and tool messages, or the prompt. `sequential`: judged before anything else happens. `parallel`:
the upstream call starts while the remote moderators run; the first byte to the client waits for their
verdict (`Request.hold`), and a block cancels the upstream call at once, so moderation adds latency only
when it is slower than the upstream. Output is checked by an `OutputGuard` (output.py) set on the exchange.

A violation is refused with 400 content_policy_violation naming the categories (never the matched
text), counted in `portcullis_moderation_violations_total{moderator,category,stage,action}`, logged with
a SHA-256 of the content (never the content), and marked in the usage record (`moderation` column).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from portcullis.config import Config, GuardModelConfig, ModerationPolicy, OpenAIModerationConfig, RulesConfig
from portcullis.errors import GatewayError, InvalidRequest, NotFound, ServiceUnavailable
from portcullis.exchange import Abort, Exchange
from portcullis.http import Request
from portcullis.safety.moderators import (
    OPENAI_CATEGORIES,
    OPENAI_EQUIVALENT,
    GuardModel,
    ModeratorError,
    OpenAIModeration,
    RemoteModerator,
    Turns,
)
from portcullis.safety.rules import ACTION_RANK, Match, Rules, merge, redact

if TYPE_CHECKING:
    from portcullis.identity.principal import Principal
    from portcullis.obs.metrics import Metrics
    from portcullis.routing.admission import Admission, Target
    from portcullis.routing.catalog import Catalog, SideCall

# Texts up to this many characters are checked by the rules on the event loop (a few milliseconds at
# most: a full PII set runs at 1-4 MB/s here), longer ones on the rules' worker thread, so that one large
# input never stalls every other request: four 1 MB inputs held /healthz for 1-2.6 s on the loop, and one
# megabyte dense with e-mail addresses for minutes (rules.py). Chat messages are mostly far shorter: their
# cost is unchanged.
RULES_ON_LOOP_CHARS = 8_192


@dataclass(frozen=True, slots=True)
class Finding:
    moderator: str
    category: str
    action: str  # block | redact | flag
    score: float | None = None


class ContentPolicyViolation(InvalidRequest):
    code = "content_policy_violation"


class ModerationUnavailable(ServiceUnavailable):
    code = "moderation_unavailable"


def refusal(findings: list[Finding], *, output: bool = False) -> ContentPolicyViolation:
    categories = ", ".join(sorted({f.category for f in findings if f.action == "block"}))
    what = "The response" if output else "The request"
    return ContentPolicyViolation(
        f"{what} was refused by the content policy (categories: {categories}).",
        param=None if output else "messages",
    )


def unavailable(moderator: str) -> ModerationUnavailable:
    return ModerationUnavailable(
        f"The content could not be checked: the moderator '{moderator}' is unavailable; try again shortly.",
        headers={"Retry-After": "1"},
    )


class Pipeline:
    """Moderators in order: local rules, then remote moderators."""

    def __init__(self, rules: list[Rules], remote: list[RemoteModerator], moderation: Moderation) -> None:
        self.rules = rules
        self.remote = remote
        self.moderation = moderation
        self.fingerprint = _fingerprint(self)

    def scan(self, text: str) -> list[Match]:
        """The rules' matches in `text`, without overlaps (an earlier moderator's match wins)."""
        if len(self.rules) == 1:
            return self.rules[0].scan(text)
        found: list[Match] = []
        for rules in self.rules:
            found = merge(found, rules.scan(text))
        return found

    def examine(self, text: str) -> tuple[list[Finding], str]:
        """The rules' findings in `text`, and the text with their redactions."""
        matches = self.scan(text)
        if not matches:
            return [], text
        return findings_of(matches), redact(text, matches)

    async def examine_off_loop(self, text: str) -> tuple[list[Finding], str]:
        """`examine` for a long text, on the rules' worker thread (the loop serves everyone else meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self.moderation.rules_pool(), self.examine, text)

    async def judge(
        self,
        turns: Turns,
        judged: str,
        stage: str,
        slots: GuardSlots | None = None,
        failed_open: Callable[[], None] | None = None,
    ) -> tuple[list[Finding], str | None]:
        """The remote moderators' findings for the `judged` role's turns, and the name of a fail_closed
        moderator that could not answer (None when all did or failed open). `slots`: guard-model calls
        take a slot of the guard model's gate first (POST /v1/moderations). `failed_open` is called when a
        fail_open moderator could not answer (the content passes unjudged by it)."""
        turns = _newest(turns, self.moderation.max_chars)
        metrics = self.moderation.metrics
        findings: list[Finding] = []
        for moderator in self.remote:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(moderator.timeout_s):
                    hits = await moderator.categories(turns, judged, slots)
            except (TimeoutError, ModeratorError) as exc:
                outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
                metrics.moderation_checks.labels(moderator.name, stage, outcome).inc()
                self.moderation.log.warning(
                    "moderator_failed",
                    moderator=moderator.name,
                    stage=stage,
                    error=f"no answer within {moderator.timeout_s:g} s" if outcome == "timeout" else str(exc),
                    policy=moderator.on_error,
                )
                if moderator.on_error == "fail_closed":
                    return findings, moderator.name
                if failed_open is not None:
                    failed_open()
                continue
            metrics.moderation_seconds.labels(moderator.name).observe(time.perf_counter() - t0)
            metrics.moderation_checks.labels(moderator.name, stage, "flagged" if hits else "pass").inc()
            findings += [Finding(moderator.name, c, moderator.action, s) for c, s in hits.items()]
            if hits and moderator.action == "block":
                break
        return findings, None


def _fingerprint(pipeline: Pipeline) -> str:
    """The output policy a pipeline applies, as the cache keys on it (cache/exact.py says why): its
    moderators' names and settings, and the settings that decide what text they are shown (how much of an
    answer a remote moderator reads, the windows a stream is judged in). Computed once per pipeline (the
    moderation stage keeps one per list of moderators for its lifetime)."""
    config = pipeline.moderation.config
    specs = config.moderators
    names = [m.name for m in pipeline.rules] + [m.name for m in pipeline.remote]
    described: list[Any] = [[name, specs[name].model_dump(mode="json") if name in specs else None] for name in names]
    described.append([config.max_chars, config.stream_window_chars, config.stream_context_chars])
    return hashlib.blake2b(orjson.dumps(described, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def _newest(turns: Turns, max_chars: int) -> Turns:
    """At most `max_chars` characters of the turns, the newest kept (the last turn is the one judged)."""
    total = sum(len(t) for _, t in turns)
    if total <= max_chars:
        return turns
    out: Turns = []
    room = max_chars
    for role, text in reversed(turns):
        if room <= 0:
            break
        out.append((role, text[-room:]))
        room -= len(text)
    out.reverse()
    return out


def findings_of(matches: list[Match], end: int | None = None) -> list[Finding]:
    """One finding per moderator, category and action, in the order first seen: a text holding a hundred
    thousand addresses is one finding (one metric increment, one entry of the log line), not a hundred
    thousand."""
    seen: dict[tuple[str, str, str], None] = {}
    for m in matches:
        if end is None or m.start < end:
            seen[(m.moderator, m.category, m.action)] = None
    return [Finding(moderator, category, action) for moderator, category, action in seen]


class _NoClient:
    """The request a guard call takes its admission slot for: the call answers nobody directly (the
    headers admission would add go nowhere), and the client's own disconnect is its handler's business."""

    __slots__ = ("response_headers",)

    def __init__(self) -> None:
        self.response_headers: list[tuple[bytes, bytes]] = []

    def on_disconnect(self, callback: Callable[[], None] | None) -> bool:
        return True  # (nobody to go away: nothing to watch)

    async def wait_disconnect(self) -> None:
        await asyncio.Event().wait()  # never


class GuardSlots:
    """Guard-model calls made for one client request take a slot of the guard model's gate, as a request
    of that client to the guard model would (its tier's priority, its key's turn in the queue, 503 when the
    queue is full): a request of many inputs can send the guard no more calls than it has slots."""

    __slots__ = ("admission", "principal")

    def __init__(self, admission: Admission, principal: Principal | None) -> None:
        self.admission = admission
        self.principal = principal

    @contextlib.asynccontextmanager
    async def __call__(self, model: str) -> AsyncIterator[tuple[Target, Exchange]]:
        # An exchange of its own: the slot's release reads it (service time once a replica was asked).
        ex = Exchange(route="(guard)", task=None, started_at=time.perf_counter(), principal=self.principal)
        ex.model = model
        try:
            async with self.admission.slot(_NoClient(), ex, model, {}) as target:  # type: ignore[arg-type]
                yield target, ex
        finally:
            ex.stop_watching()


@dataclass(frozen=True, slots=True)
class Policy:
    input: Pipeline | None
    output: Pipeline | None
    parallel: bool


class Moderation:
    def __init__(self, config: Config, catalog: Catalog, metrics: Metrics, log: Any, call: SideCall) -> None:
        self.config = config.moderation
        self.models = config.models
        self.tiers = config.tiers
        self.metrics = metrics
        self.log = log
        self.max_chars = self.config.max_chars
        self.enabled = bool(self.config.moderators)
        self.rules: dict[str, Rules] = {}
        self.remote: dict[str, RemoteModerator] = {}
        for name, spec in self.config.moderators.items():
            if isinstance(spec, RulesConfig):
                self.rules[name] = Rules(name, spec)
            elif isinstance(spec, OpenAIModerationConfig):
                self.remote[name] = OpenAIModeration(name, spec)
            elif isinstance(spec, GuardModelConfig):
                self.remote[name] = GuardModel(name, spec, catalog, call)
        self._policies: dict[tuple[str, str | None, str], Policy] = {}
        self._pipelines: dict[tuple[str, ...], Pipeline | None] = {}
        self.endpoint = self.pipeline(self.config.endpoint if self.config.endpoint is not None else self.config.input)
        self._rules_pool: ThreadPoolExecutor | None = None

    def rules_pool(self) -> ThreadPoolExecutor:
        """One worker thread for the rules over long texts: they hold the GIL while they run, so more
        threads would not finish sooner, only take the loop's turns more often."""
        if self._rules_pool is None:
            self._rules_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portcullis-rules")
        return self._rules_pool

    async def start(self) -> None:
        for moderator in self.remote.values():
            await moderator.start()

    async def close(self) -> None:
        for moderator in self.remote.values():
            await moderator.close()
        if self._rules_pool is not None:
            self._rules_pool.shutdown(wait=False, cancel_futures=True)

    def pipeline(self, names: list[str]) -> Pipeline | None:
        key = tuple(names)
        if key not in self._pipelines:
            rules = [self.rules[n] for n in names if n in self.rules]
            remote = [self.remote[n] for n in names if n in self.remote]
            self._pipelines[key] = Pipeline(rules, remote, self) if rules or remote else None
        return self._pipelines[key]

    def policy(self, model: str, tier: str | None, principal: Principal | None = None) -> Policy:
        """The model's own setting, else the principal's team's, else its organisation's (identity/tenancy.py), else
        its tier's, else the `moderation` section's, field by field."""
        levels = principal.levels_key if principal is not None else ""
        key = (model, tier, levels)
        policy = self._policies.get(key)
        if policy is None:
            if len(self._policies) >= 10_000:  # (one per model, tier and levels' settings: bounded all the same)
                self._policies.clear()
            model_conf = self.models[model].moderation if model in self.models else None
            tier_conf = self.tiers[tier].moderation if tier in self.tiers else None
            team_conf, org_conf = (
                ModerationPolicy.model_validate(p) if p else None
                for p in (
                    principal.team_moderation if principal is not None else None,
                    principal.org_moderation if principal is not None else None,
                )
            )

            def pick(field: str) -> Any:
                for source in (model_conf, team_conf, org_conf, tier_conf):
                    value = getattr(source, field) if source is not None else None
                    if value is not None:
                        return value
                return getattr(self.config, field)

            policy = Policy(self.pipeline(pick("input")), self.pipeline(pick("output")), pick("mode") == "parallel")
            self._policies[key] = policy
        return policy

    # -- input --------------------------------------------------------------------------------

    def screen(
        self, req: Request, ex: Exchange, payload: dict[str, Any], model: str, *, chat: bool
    ) -> Screen | _NoScreen:
        """Moderate the request's input around the rest of the handler (`async with`)."""
        if ex.trace is not None:
            ex.trace.stage("moderation")
        if not self.enabled:
            return _NO_SCREEN
        principal = ex.principal
        policy = self.policy(model, principal.tier if principal is not None else None, principal)
        if policy.output is not None:
            from portcullis.safety.output import OutputGuard

            ex.output_policy = policy.output.fingerprint
            ex.filters.append(OutputGuard(self, policy.output, req, ex, chat=chat, payload=payload))
        if policy.input is None:
            return _NO_SCREEN
        return Screen(self, policy.input, policy.parallel, req, ex, payload, chat)

    # -- what a violation leaves behind ---------------------------------------------------------

    def note(self, req: Request, ex: Exchange, stage: str, findings: list[Finding], content: str) -> None:
        """Count, log (a hash of the content, never the content) and mark the exchange for the usage record."""
        if not findings:
            return
        counter = self.metrics.moderation_violations
        for f in findings:
            counter.labels(f.moderator, f.category, stage, f.action).inc()
        strongest = max((f.action for f in findings), key=ACTION_RANK.__getitem__)
        mark = f"{stage}:{strongest}"
        if ex.moderation is None:
            ex.moderation = mark
        elif mark not in ex.moderation.split(","):
            ex.moderation = f"{ex.moderation},{mark}"
        principal = ex.principal
        self.log.warning(
            "moderation_violation",  # (request_id, key_id and model: the request's log context)
            user=principal.user if principal else None,
            stage=stage,
            action=strongest,
            findings=[{"moderator": f.moderator, "category": f.category, "action": f.action} for f in findings],
            content_sha256=hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest(),
            content_chars=len(content),
        )

    # -- POST /v1/moderations -----------------------------------------------------------------

    def answering(self, model: str | None) -> Pipeline:
        """The pipeline that answers POST /v1/moderations: the moderator the request names as its `model`,
        else the `endpoint` pipeline (404 when there is none)."""
        pipeline = self.pipeline([model]) if model is not None and model in self.config.moderators else self.endpoint
        if pipeline is None:
            raise NotFound("No moderators are configured on this gateway.", code="moderation_not_configured")
        return pipeline

    async def evaluate(
        self, texts: list[str], model: str | None, *, slots: GuardSlots | None = None
    ) -> list[dict[str, Any]]:
        """OpenAI's moderation results, one per text, from the endpoint's pipeline (or the moderator the
        request names as its `model`). At most `endpoint_concurrency` texts of the request are judged at
        once; with `slots`, every guard-model call also waits for a slot of the guard model's gate."""
        pipeline = self.answering(model)
        room = asyncio.Semaphore(self.config.endpoint_concurrency)

        async def one(text: str) -> dict[str, Any]:
            async with room:
                if not pipeline.rules:
                    findings: list[Finding] = []
                elif len(text) <= RULES_ON_LOOP_CHARS:
                    findings, text = pipeline.examine(text)
                else:
                    findings, text = await pipeline.examine_off_loop(text)
                if pipeline.remote:
                    judged, failed = await pipeline.judge([("user", text)], "user", "endpoint", slots)
                    if failed is not None:
                        raise unavailable(failed)
                    findings = findings + judged
                return moderation_result(findings)

        tasks = [asyncio.ensure_future(one(t)) for t in texts]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # One text's failure (503) answers the request: the others' moderator calls stop with it.
            for task in tasks:
                task.cancel()


def moderation_result(findings: list[Finding]) -> dict[str, Any]:
    """One result of OpenAI's moderation shape: every OpenAI category present, ours added beside them."""
    categories = dict.fromkeys(OPENAI_CATEGORIES, False)
    scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    for f in findings:
        for name in {f.category, OPENAI_EQUIVALENT.get(f.category, f.category)}:
            categories[name] = True
            scores[name] = max(scores.get(name, 0.0), f.score if f.score is not None else 1.0)
    return {
        "flagged": bool(findings),
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": {name: ["text"] if on else [] for name, on in categories.items()},
    }


# -- the input screen ---------------------------------------------------------------------------


def input_texts(payload: dict[str, Any], chat: bool) -> list[tuple[Any, Any, str]]:
    """Where the moderated input is: (container, key, text) for each user or tool text, so that a
    redaction can be written back in place."""
    found: list[tuple[Any, Any, str]] = []
    if chat:
        for message in payload.get("messages") or ():
            if not isinstance(message, dict) or message.get("role") not in ("user", "tool"):
                continue
            content = message.get("content")
            if isinstance(content, str):
                found.append((message, "content", content))
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                        found.append((part, "text", part["text"]))
        return found
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        found.append((payload, "prompt", prompt))
    elif isinstance(prompt, list):
        found += [(prompt, i, p) for i, p in enumerate(prompt) if isinstance(p, str)]
    suffix = payload.get("suffix")  # (the other half of a fill-in-the-middle request: /infill, `suffix`)
    if isinstance(suffix, str):
        found.append((payload, "suffix", suffix))
    return found


def last_user_text(payload: dict[str, Any], chat: bool, limit: int = 2000) -> str:
    """The prompt an answer replies to (a guard model judges an answer in its context), cut to `limit`."""
    texts = input_texts(payload, chat)
    return texts[-1][2][-limit:] if texts else ""


class Screen:
    """Input moderation around the cache and upstream stages of one request."""

    __slots__ = (
        "chat",
        "ex",
        "inside",
        "moderation",
        "parallel",
        "payload",
        "pipeline",
        "places",
        "req",
        "settled",
        "task",
    )

    def __init__(
        self,
        moderation: Moderation,
        pipeline: Pipeline,
        parallel: bool,
        req: Request,
        ex: Exchange,
        payload: dict[str, Any],
        chat: bool,
    ) -> None:
        self.moderation = moderation
        self.pipeline = pipeline
        self.parallel = parallel
        self.req = req
        self.ex = ex
        self.payload = payload
        self.chat = chat
        self.places: list[tuple[Any, Any, str]] = []
        self.task: asyncio.Task[tuple[list[Finding], str | None]] | None = None
        self.inside = False  # parallel: the handler is between the screen's start and end, not at its hold
        self.settled = False  # the verdict has been applied (refused, or let through)

    async def __aenter__(self) -> Screen:
        self.places = places = input_texts(self.payload, self.chat)
        if not places:
            return self
        turns: Turns = []
        found: list[Finding] = []
        rules = self.pipeline.rules
        for container, key, text in places:
            if rules:
                if len(text) <= RULES_ON_LOOP_CHARS:
                    findings, checked = self.pipeline.examine(text)
                else:
                    findings, checked = await self.pipeline.examine_off_loop(text)
                if findings:
                    found += findings
                    text = checked
                    container[key] = text
            turns.append(("user", text))
        if found:
            self.moderation.note(self.req, self.ex, "input", found, _joined(places))
            if any(f.action == "block" for f in found):
                raise refusal(found)
        if not self.pipeline.remote:
            return self
        judging = self.pipeline.judge(turns, "user", "input")
        if not self.parallel:
            self._settle(*await judging)
            return self
        self.task = asyncio.ensure_future(judging)
        self.task.add_done_callback(self._judged)
        self.req.hold = self._hold
        self.inside = True
        return self

    def _settle(self, findings: list[Finding], failed: str | None) -> None:
        self.settled = True
        self.moderation.note(self.req, self.ex, "input", findings, _joined(self.places))
        if failed is not None:
            raise unavailable(failed)
        if any(f.action == "block" for f in findings):
            raise refusal(findings)

    def _judged(self, task: asyncio.Task[tuple[list[Finding], str | None]]) -> None:
        """Parallel mode: a refusing verdict cancels the upstream call at once (the handler is then
        somewhere in the cache, admission or upstream stage; at its hold it sees the verdict itself)."""
        if not self.inside or task.cancelled() or task.exception() is not None:
            return
        findings, failed = task.result()
        if failed is not None or any(f.action == "block" for f in findings):
            if self.ex.abort_reason is None:
                self.ex.abort(Abort.MODERATION)
                if self.ex.abort_reason is Abort.MODERATION:
                    self.moderation.metrics.moderation_cancelled_upstream.inc()

    async def _hold(self) -> None:
        """Before the first byte to the client: the verdict, or the refusal."""
        assert self.task is not None
        self.inside = False
        self._settle(*await self.task)

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        task = self.task
        if task is None:
            return False
        self.inside = False
        self.req.hold = None
        if self.settled:
            return False  # the answer (or the refusal) already went through the hold
        if isinstance(exc, asyncio.CancelledError):
            if not self.ex.resume(Abort.MODERATION):
                task.cancel()
                return False  # the client left, or the shutdown: not ours to answer
        elif not isinstance(exc, GatewayError):
            task.cancel()  # finished without the hold (nothing was sent), or an unexpected failure
            return False
        # The request failed (or the verdict cancelled it) before its answer: a refusal is the answer then;
        # if the input passes, the original error stands.
        self._settle(*await task)
        return False


def _joined(places: list[tuple[Any, Any, str]]) -> str:
    return "\n".join(text for _, _, text in places)


class _NoScreen:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> bool:
        return False


_NO_SCREEN = _NoScreen()
