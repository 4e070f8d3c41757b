"""The route stage: the name a client sent → the model that serves the request, and why.

    resolve    an alias becomes its model or router; an unknown or switched-off name is 404;
    constrain  the client's limits: `x-portcullis-max-cost` (quota.currency per request),
               `x-portcullis-latency-budget-ms`, `x-portcullis-priority: low`, or the same as a
               `portcullis` object in the body ({"max_cost", "latency_budget_ms", "priority"}), which
               is taken out before the request goes upstream;
    choose     a router (`routers.<name>`, strategy cost_aware) scores the request's complexity
               (complexity.py) and picks the cheapest candidate whose quality covers it, within the
               client's cost cap and latency budget, skipping candidates that cannot hold the request or
               have no usable replica; when that candidate's slots are all taken it spills to the next
               one with a free slot. A plain model is its own choice;
    fit        the serving model's replicas that can hold the prompt plus max_tokens (context.py); none:
               400 context_length_exceeded before any upstream call;
    place      for models with several llama-server replicas, the prompt's prefix keys, so the upstream
               stage can prefer the replica that holds that prefix (affinity.py).

The decision is returned in `x-portcullis-route` (routers, spills) and logged with the access line.
`decide()` is the same choice without touching the request: `GET /admin/route`'s and `portcullis route
explain`'s answer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portcullis.config import Config, RouterConfig
from portcullis.errors import ContextLengthExceeded, InvalidRequest, ServiceUnavailable, retry_after_headers
from portcullis.identity.auth import require_model
from portcullis.identity.principal import Principal
from portcullis.obs.logging import bind_model
from portcullis.offpeak import OffPeak
from portcullis.routing.affinity import Affinity
from portcullis.routing.balancer import choose, unavailable
from portcullis.routing.catalog import Catalog, Replica, SideCall
from portcullis.routing.complexity import Scorer, features, load_scorer
from portcullis.routing.context import TokenCounter, completion_need, fits, token_id_prompt

if TYPE_CHECKING:
    from portcullis.exchange import Exchange
    from portcullis.http import Request
    from portcullis.obs.metrics import Metrics
    from portcullis.routing.admission import Admission

ROUTE_HEADER = b"x-portcullis-route"


@dataclass(frozen=True, slots=True)
class Constraints:
    max_cost: float | None = None
    latency_budget_s: float | None = None
    low_priority: bool = False


_NO_CONSTRAINTS = Constraints()


@dataclass(slots=True)
class Candidate:
    """One candidate model as the router saw it."""

    model: str
    quality: float
    usable: bool = False
    need: int = 0  # tokens the request needs (0: fits every replica)
    fits: bool = True
    cost: float = 0.0  # estimated, quota.currency
    free_slot: bool = False
    wait_s: float = 0.0
    latency_s: float | None = None  # estimated; None without observations
    excluded: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "quality": round(self.quality, 3),
            "usable": self.usable,
            "fits": self.fits,
            "need_tokens": self.need or None,
            "estimated_cost": round(self.cost, 8),
            "free_slot": self.free_slot,
            "estimated_wait_s": round(self.wait_s, 3),
            "estimated_latency_s": round(self.latency_s, 3) if self.latency_s is not None else None,
            "excluded": self.excluded,
        }


@dataclass(slots=True)
class Decision:
    asked: str
    model: str  # the model that serves
    reason: str
    router: str | None = None
    complexity: float | None = None
    prompt_tokens: int = 0  # estimated (or exact, when counted)
    need: int = 0
    estimated_cost: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    # The prompt's (UTF-8 bytes, framing tokens), as measured for the estimates (None: token ids).
    measured: tuple[int, int] | None = None

    def header(self) -> bytes:
        parts = [f"model={self.model}"]
        if self.router is not None:
            parts.append(f"router={self.router}")
        if self.complexity is not None:
            parts.append(f"complexity={self.complexity:.2f}")
        if self.estimated_cost is not None:
            parts.append(f"est_cost={self.estimated_cost:.6g}")
        parts.append(f"reason={self.reason}")
        return "; ".join(parts).encode("ascii", "replace")

    def public(self) -> dict[str, Any]:
        return {
            "asked": self.asked,
            "model": self.model,
            "router": self.router,
            "reason": self.reason,
            "complexity": round(self.complexity, 4) if self.complexity is not None else None,
            "prompt_tokens_estimate": self.prompt_tokens,
            "need_tokens": self.need or None,
            "estimated_cost": self.estimated_cost,
            "candidates": [c.public() for c in self.candidates],
        }


class Router:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        admission: Admission,
        affinity: Affinity,
        metrics: Metrics | None = None,
        call: SideCall | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.catalog = catalog
        self.admission = admission
        self.affinity = affinity
        self.offpeak = OffPeak(config.scheduling.off_peak)
        self.tokens = TokenCounter(config.routing.context, config.quota.chars_per_token, call)
        self.scorers: dict[str, Scorer] = {name: load_scorer(r.scorer) for name, r in config.routers.items()}
        # Models whose requests get prefix keys: two or more llama-server replicas.
        self.placed = {
            name
            for name, replicas in catalog.models.items()
            if config.routing.affinity.enabled and sum(r.kind == "llama_cpp" for r in replicas) >= 2
        }

    # -- the stage ------------------------------------------------------------------------------

    async def route(self, req: Request, ex: Exchange, payload: dict[str, Any], *, generates: bool = True) -> str:
        """Resolve, constrain, choose, fit, place: the model that serves this request (also in ex.model)."""
        if ex.trace is not None:
            ex.trace.stage("route")
        asked = payload["model"]
        name = self.catalog.resolve(asked)
        require_model(ex.principal, asked, name)
        bind_model(name)
        header = req.header
        if (
            "portcullis" in payload
            or header(b"x-portcullis-max-cost") is not None
            or header(b"x-portcullis-latency-budget-ms") is not None
            or header(b"x-portcullis-priority") is not None
        ):
            constraints = self.constraints(req, payload)
        else:
            constraints = _NO_CONSTRAINTS  # (the usual request: nothing parsed, nothing allocated)
        if constraints.low_priority:
            ex.low_priority = True
            self._hold_to_off_peak(name)
        if not generates:  # embeddings: a name, not a choice
            if name in self.catalog.routers:
                raise InvalidRequest(
                    f"'{asked}' is a router for chat and completions; embeddings need a model.",
                    param="model",
                    code="model_not_supported",
                )
            ex.model = name
            return name
        if name in self.catalog.routers:
            decision = await self.decide(name, payload, constraints, ex.principal, asked=asked)
            name = ex.model = decision.model
            bind_model(name)
            ex.need = decision.need
            ex.route_reason = decision.reason
            req.response_headers.append((ROUTE_HEADER, decision.header()))
            if self.metrics is not None:
                self.metrics.route_decisions.labels(decision.router, decision.model).inc()
            ex.prompt_size = decision.measured
        else:
            ex.model = name
            if self.config.routing.context.enabled and not self._fits_everywhere(name, payload, ex):
                estimate = self.tokens.estimate(payload, name)
                ex.need, _ = await self._need(name, self.catalog.models[name], payload, estimate, time.monotonic())
        if name in self.placed:
            ex.affinity = self.affinity.keys(name, payload)
        return name

    def _fits_everywhere(self, model: str, payload: dict[str, Any], ex: Exchange) -> bool:
        """A plain model's context fit on the hot path, without a coroutine: True when the request fits every
        replica whatever its real token count (the usual case); False: the full check must decide."""
        smallest = None
        for r in self.catalog.models[model]:
            context = r.context
            if context is not None and (smallest is None or context < smallest):
                smallest = context
        if smallest is None:
            return True  # no limit known anywhere
        if self.config.routing.context.tokenize == "always":
            return False
        if "messages" in payload or (ids := token_id_prompt(payload)) is None:
            ex.prompt_size = size, framing = self.tokens.measure(payload)
            high = math.ceil(self.tokens.sized(size, framing, model) * (1 + self.config.routing.context.margin))
        else:
            high = ids
        return high + completion_need(payload) <= smallest

    def constraints(self, req: Request, payload: dict[str, Any]) -> Constraints:
        found: dict[str, float] = {}
        body = payload.pop("portcullis", None)
        if body is not None and not isinstance(body, dict):
            raise InvalidRequest("'portcullis' must be an object.", param="portcullis", code="invalid_value")
        body = body or {}
        for field_name, header, unit in (
            ("max_cost", b"x-portcullis-max-cost", 1.0),
            ("latency_budget_ms", b"x-portcullis-latency-budget-ms", 0.001),  # (kept in seconds)
        ):
            raw = body.get(field_name)
            where = f"portcullis.{field_name}"
            if raw is None:
                text = req.header(header)
                raw, where = (text.decode("latin-1"), header.decode()) if text is not None else (None, where)
            if raw is None:
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = -1.0
            if not math.isfinite(value) or value <= 0 or isinstance(raw, bool):
                raise InvalidRequest(f"'{where}' must be a positive number.", param=where, code="invalid_value")
            found[field_name] = value * unit
        priority = body.get("priority")
        if priority is None:
            text = req.header(b"x-portcullis-priority")
            priority = text.decode("latin-1").strip().lower() if text is not None else None
        if priority not in (None, "low", "normal"):
            raise InvalidRequest(
                "The priority must be 'low' or 'normal'.", param="x-portcullis-priority", code="invalid_value"
            )
        return Constraints(found.get("max_cost"), found.get("latency_budget_ms"), priority == "low")

    def _hold_to_off_peak(self, model: str) -> None:
        if self.config.scheduling.low_priority.in_peak != "refuse" or self.offpeak.active():
            return
        wait = self.offpeak.seconds_until_start()
        raise ServiceUnavailable(
            f"Low-priority requests to '{model}' are served off-peak; retry after the time in Retry-After.",
            code="off_peak_only",
            headers=retry_after_headers(wait if wait is not None else 3600.0),
        )

    # -- the choice -----------------------------------------------------------------------------

    async def decide(
        self,
        name: str,
        payload: dict[str, Any],
        constraints: Constraints,
        principal: Principal | None,
        *,
        asked: str | None = None,
    ) -> Decision:
        now = time.monotonic()
        router = self.catalog.routers.get(name)
        if router is None:
            estimate = self.tokens.estimate(payload, name)
            need, _ = await self._need(name, self.catalog.models[name], payload, estimate, now)
            return Decision(asked or name, name, "direct", prompt_tokens=estimate, need=need)
        return await self._cost_aware(name, router, payload, constraints, principal, now, asked or name)

    async def _need(
        self, model: str, replicas: list[Replica], payload: dict[str, Any], estimate: int, now: float
    ) -> tuple[int, int]:
        """(tokens the request needs where it matters, else 0; the prompt count used). 400 if it fits nowhere."""
        contexts = [r.context for r in replicas]
        known = [c for c in contexts if c is not None]
        settings = self.config.routing.context
        if not settings.enabled or not known:
            return 0, estimate
        completion = completion_need(payload)
        low, high = self.tokens.bounds(estimate, payload)
        largest = math.inf if None in contexts else max(known)
        if high + completion <= min(known) and settings.tokenize != "always":
            return 0, estimate  # fits every replica whatever the real count
        prompt = None
        if settings.tokenize != "never" and low + completion <= largest:
            prompt = await self.tokens.exact(model, replicas, payload, now)
        if prompt is None:
            prompt = low  # without an exact count, exclude only what cannot fit even at the low bound
        need = prompt + completion
        if need > largest:
            error = ContextLengthExceeded(
                f"This model's maximum context length is {largest} tokens per request; the request needs about "
                f"{need} ({prompt} in the prompt, {completion} for the completion). Shorten the prompt or lower "
                "max_tokens.",
                param="messages" if "messages" in payload else "prompt",
            )
            error.extra = {"n_prompt_tokens": prompt, "n_ctx": largest}  # as llama-server tells its own overflow
            raise error
        return need, prompt

    async def _cost_aware(
        self,
        name: str,
        router: RouterConfig,
        payload: dict[str, Any],
        constraints: Constraints,
        principal: Principal | None,
        now: float,
        asked: str,
    ) -> Decision:
        ids = token_id_prompt(payload)
        measured = self.tokens.measure(payload) if ids is None else (0, 0)
        estimate = ids if ids is not None else self.tokens.sized(*measured, None)  # (each candidate's: below)
        complexity = float(self.scorers[name](features(payload, estimate)))
        asked_completion = payload.get("max_completion_tokens") or payload.get("max_tokens")
        completion = asked_completion if isinstance(asked_completion, int) else router.expected_completion_tokens
        priority = self.admission.priority_of(principal, low=constraints.low_priority)
        budget = constraints.latency_budget_s
        if budget is None and router.latency_budget_ms is not None:
            budget = router.latency_budget_ms / 1000
        qualities = router.default_quality or _spread(len(router.candidates))
        candidates: list[Candidate] = []
        prompt_tokens = 0
        for i, model in enumerate(router.candidates):
            replicas = self.catalog.models[model]
            rated = [r.quality for r in replicas if r.quality is not None]
            c = Candidate(model, min(rated) if rated else qualities[i])
            candidates.append(c)
            if model in self.catalog.disabled:
                c.excluded = "switched off"
                continue
            try:
                own = ids if ids is not None else self.tokens.sized(*measured, model)
                c.need, counted = await self._need(model, replicas, payload, own, now)
                prompt_tokens = max(prompt_tokens, counted)
            except ContextLengthExceeded:
                c.fits, c.excluded = False, "context too small"
                continue
            usable = [r for r in replicas if r.usable(now) and fits(r, c.need)]
            c.usable = bool(usable)
            if not usable:
                c.excluded = "no usable replica"
                continue
            p = sum(r.prompt_per_1k for r in usable) / len(usable)
            q = sum(r.completion_per_1k for r in usable) / len(usable)
            c.cost = (counted * p + completion * q) / 1000
            c.free_slot = self.admission.free_slot(model)
            c.wait_s = 0.0 if c.free_slot else self.admission.expected_wait(model, priority)
            c.latency_s = _latency(usable, counted, completion, c.wait_s)
            if constraints.max_cost is not None and c.cost > constraints.max_cost:
                c.excluded = f"over max_cost {constraints.max_cost:g}"
        eligible = [c for c in candidates if c.excluded is None]
        prompt_tokens = prompt_tokens or estimate
        if not eligible:
            raise self._none_eligible(name, candidates, constraints, prompt_tokens, completion)
        eligible.sort(key=lambda c: (c.cost, -c.quality))
        qualified = [c for c in eligible if c.quality >= complexity - 1e-9]
        if qualified:
            pool, why = qualified, f"cheapest covering complexity {complexity:.2f}"
        else:
            best = max(c.quality for c in eligible)
            pool = [c for c in eligible if c.quality == best]
            why = f"no candidate covers complexity {complexity:.2f}: most capable"
        if budget is not None:
            in_time = [c for c in pool if c.latency_s is None or c.latency_s <= budget]
            if in_time:
                if in_time[0] is not pool[0]:
                    why = f"{why}; {pool[0].model} over the latency budget"
                pool = in_time
            else:
                faster = [c for c in eligible if c.latency_s is None or c.latency_s <= budget]
                if faster:
                    pool = sorted(faster, key=lambda c: (-c.quality, c.cost))
                    why = f"latency budget {budget * 1000:g} ms: the most capable in time"
                else:
                    pool = sorted(eligible, key=lambda c: c.latency_s or 0.0)
                    why = f"latency budget {budget * 1000:g} ms met by none: the fastest"
        chosen = pool[0]
        if not chosen.free_slot and router.spill_when_full:
            roomy = next((c for c in pool if c.free_slot), None)
            if roomy is None:
                roomy = next((c for c in eligible if c.free_slot and c.quality >= chosen.quality), None)
            if roomy is not None:
                why = f"{why}; {chosen.model} full, spilled"
                chosen = roomy
            else:
                chosen = min(pool, key=lambda c: c.wait_s)
        return Decision(
            asked,
            chosen.model,
            why,
            router=name,
            complexity=complexity,
            prompt_tokens=prompt_tokens,
            need=chosen.need,
            estimated_cost=chosen.cost,
            candidates=candidates,
            measured=measured if ids is None else None,
        )

    def _none_eligible(
        self, name: str, candidates: list[Candidate], constraints: Constraints, prompt: int, completion: int
    ) -> Exception:
        if all(not c.fits for c in candidates if c.excluded != "switched off"):
            return ContextLengthExceeded(
                f"No model behind '{name}' can hold this request (about {prompt} prompt tokens plus {completion} "
                "for the completion).",
                param="messages",
            )
        over_cost = [c for c in candidates if c.excluded and c.excluded.startswith("over max_cost")]
        if over_cost:
            cheapest = min(c.cost for c in over_cost)
            return InvalidRequest(
                f"No model behind '{name}' can serve this request within max_cost {constraints.max_cost:g} "
                f"{self.config.quota.currency}; the cheapest would cost about {cheapest:.6g}. Raise the cap or lower "
                "max_tokens.",
                param="x-portcullis-max-cost",
                code="max_cost_exceeded",
            )
        replicas = [r for c in candidates for r in self.catalog.models[c.model]]
        return unavailable(replicas)

    def learn(self, ex: Exchange) -> None:
        """A whole answer: how many tokens its prompt really had teaches the model's tokens per byte."""
        if ex.prompt_size is not None and ex.prompt_tokens and ex.model is not None and not ex.cache_hit:
            size, framing = ex.prompt_size
            self.tokens.learn(ex.model, size, framing, ex.prompt_tokens)

    def explain_replica(self, decision: Decision, payload: dict[str, Any]) -> Replica | None:
        """The replica the upstream stage would try first for this decision, now."""
        replicas = self.catalog.models[decision.model]
        now = time.monotonic()
        if decision.model in self.placed:
            keys = self.affinity.keys(decision.model, payload)
            if keys:
                picked = self.affinity.pick(replicas, keys, (), now, decision.need, count=False)
                if picked is not None:
                    return picked
        return choose(replicas, (), now, decision.need)


def _spread(n: int) -> list[float]:
    """Default qualities for n candidates listed from cheap to capable: evenly over [0.3, 1]."""
    if n == 1:
        return [1.0]
    return [0.3 + 0.7 * i / (n - 1) for i in range(n)]


def _latency(replicas: list[Replica], prompt: int, completion: int, wait_s: float) -> float | None:
    """Queue wait + prompt processing + decoding, from what the replicas' answers showed (None: no data)."""
    estimates = [prompt / r.prefill_tps if r.prefill_tps else r.ttft_s for r in replicas]
    first = [f for f in estimates if f is not None]
    speeds = [r.stream_tps for r in replicas if r.stream_tps]
    if not first and not speeds:
        return None
    ttft = sum(first) / len(first) if first else 0.0
    decode = completion / (sum(speeds) / len(speeds)) if speeds else 0.0
    return wait_s + ttft + decode
