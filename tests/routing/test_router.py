"""The cost-aware router's choices for a table of requests and constraints, with the live signals set by
hand (replica health, observed speeds, slots taken), and the complexity scorer's cues.

The router here is the real one over a real catalog and admission gates; only the replicas' live state
is written directly instead of coming from probes and answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from portcullis.config import build_config
from portcullis.errors import ContextLengthExceeded, InvalidRequest, ServiceUnavailable
from portcullis.obs.metrics import Metrics
from portcullis.routing.admission import Admission
from portcullis.routing.affinity import Affinity
from portcullis.routing.catalog import Catalog, ReplicaState
from portcullis.routing.complexity import features, heuristic
from portcullis.routing.router import Constraints, Decision, Router


def _deployment(host: str, prompt: float, completion: float, quality: float, n_ctx: int) -> dict[str, Any]:
    return {
        "url": f"http://{host}:8080",
        "cost": {"prompt_per_1k": prompt, "completion_per_1k": completion},
        "quality": quality,
        "n_ctx": n_ctx,
    }


CONFIG = {
    "models": {
        "small": {"deployments": [_deployment("10.0.0.1", 0.0001, 0.0002, 0.3, 4096)]},
        "medium": {"deployments": [_deployment("10.0.0.2", 0.001, 0.002, 0.6, 8192)]},
        "large": {"deployments": [_deployment("10.0.0.3", 0.01, 0.02, 0.95, 32768)]},
    },
    "routers": {"auto": {"candidates": ["small", "medium", "large"]}},
    "routing": {"context": {"tokenize": "never"}},
}


def _router(**changes: Any) -> Router:
    config = build_config({**CONFIG, **changes}, source="test", environ={})
    catalog = Catalog.from_config(config)
    for replica in catalog.all_replicas():
        replica.state, replica.slots = ReplicaState.READY, 2
    admission = Admission(config, catalog, Metrics(catalog))
    return Router(config, catalog, admission, Affinity(config.routing.affinity))


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


def _decide(router: Router, payload: dict[str, Any], **constraints: Any) -> Decision:
    return asyncio.run(router.decide("auto", payload, Constraints(**constraints), None))


SIMPLE = _chat("Hi! What's the capital of France?")
CODE = _chat(
    "Explain why this Python function is slow and design a faster one, step by step:\n"
    "```python\ndef total(xs):\n    return sum([x for x in xs])\n```",
    max_tokens=512,
)
HARD = {
    "model": "auto",
    "messages": [
        {"role": "system", "content": "You are a careful mathematician."},
        *[
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: let us continue the proof."}
            for i in range(12)
        ],
        {
            "role": "user",
            "content": "Prove step by step that the integral of x^2 from 0 to 1 is 1/3, then write "
            "```python\nimport sympy\n``` code to check the derivative.",
        },
    ],
    "max_tokens": 4096,
    "tools": [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}],
}


@pytest.mark.parametrize(
    ("payload", "constraints", "expected", "reason_starts"),
    [
        (SIMPLE, {}, "small", "cheapest covering"),
        (CODE, {}, "medium", "cheapest covering"),
        (HARD, {}, "large", "cheapest covering"),
        # A cost cap that rules the capable ones out: the simple question still goes to small ...
        (SIMPLE, {"max_cost": 0.0005}, "small", "cheapest covering"),
        # ... a hard one gets the most capable model within the cap, and is told it is below its need.
        (HARD, {"max_cost": 0.01}, "medium", "no candidate covers"),
    ],
)
def test_router_choices(
    payload: dict[str, Any], constraints: dict[str, Any], expected: str, reason_starts: str
) -> None:
    decision = _decide(_router(), payload, **constraints)
    assert decision.model == expected, decision.public()
    assert decision.reason.startswith(reason_starts), decision.reason
    assert decision.router == "auto"
    header = decision.header().decode()
    assert header.startswith(f"model={expected}; router=auto; complexity=") and "reason=" in header


def test_complexity_orders_the_table() -> None:
    scores = [heuristic(features(p, 50)) for p in (SIMPLE, CODE, HARD)]
    assert scores[0] < 0.3 <= scores[1] < 0.6 <= scores[2] <= 1.0


def test_cues() -> None:
    assert features(_chat("```js\nconst x = () => 1;\n```"), 10).code
    assert features(_chat("What is the derivative of x^3?"), 10).math
    assert features(_chat("Compare the trade-offs of these two designs"), 10).reasoning
    plain = features(_chat("Tell me a story about a cat."), 10)
    assert not (plain.code or plain.math or plain.reasoning)


def test_max_cost_below_every_candidate_is_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        _decide(_router(), SIMPLE, max_cost=1e-9)
    assert info.value.code == "max_cost_exceeded" and "cheapest would cost" in info.value.message


def test_a_prompt_too_long_for_the_small_context_goes_to_one_that_holds_it() -> None:
    decision = _decide(_router(), _chat("word " * 8000))  # ~10k tokens estimated: more than small's 4096
    assert decision.model == "medium"
    small = next(c for c in decision.candidates if c.model == "small")
    assert not small.fits and small.excluded == "context too small"
    assert decision.need > 4096


def test_a_prompt_no_candidate_can_hold_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded):
        _decide(_router(), _chat("word " * 40000))


def test_a_latency_budget_skips_a_slow_candidate() -> None:
    router = _router()
    router.catalog.models["small"][0].stream_tps = 10.0  # observed: 100 tokens take 10 s here
    router.catalog.models["medium"][0].stream_tps = 200.0
    payload = _chat("Hi", max_tokens=100)
    assert _decide(router, payload).model == "small"  # no budget: the cheapest
    decision = _decide(router, payload, latency_budget_s=2.0)
    assert decision.model == "medium" and "small over the latency budget" in decision.reason


def test_a_full_candidate_spills_to_the_next_with_a_free_slot() -> None:
    router = _router()
    router.admission.gates["small"].holding = 2  # both of small's slots are taken
    decision = _decide(router, SIMPLE)
    assert decision.model == "medium" and decision.reason.endswith("small full, spilled")


def test_without_spill_a_full_candidate_is_still_chosen() -> None:
    router = _router(routers={"auto": {"candidates": ["small", "medium", "large"], "spill_when_full": False}})
    router.admission.gates["small"].holding = 2
    assert _decide(router, SIMPLE).model == "small"


def test_unusable_candidates_are_skipped_and_none_usable_is_503() -> None:
    router = _router()
    router.catalog.models["small"][0].state = ReplicaState.DOWN
    decision = _decide(router, SIMPLE)
    assert decision.model == "medium"
    assert next(c for c in decision.candidates if c.model == "small").excluded == "no usable replica"
    for replica in router.catalog.all_replicas():
        replica.state = ReplicaState.DOWN
    with pytest.raises(ServiceUnavailable):
        _decide(router, SIMPLE)


def test_hourly_priced_deployments_price_tokens_by_measured_throughput() -> None:
    config = build_config(
        {
            "models": {
                "m": {"deployments": [{"url": "http://10.0.0.9:8080", "cost": {"gpu_hour": 3.6, "tokens_per_s": 100}}]}
            }
        },
        source="test",
        environ={},
    )
    replica = Catalog.from_config(config).models["m"][0]
    # Assumed 100 tokens/s: 3.6 per hour is 0.001 a second, so 0.01 per 1,000 completion tokens.
    assert replica.completion_per_1k == pytest.approx(0.01)
    assert replica.prompt_per_1k == pytest.approx(0.001)
    # Measured: 2,000 tokens in 4 busy seconds (500/s) → five times cheaper.
    replica.mark_throughput(0.0)
    replica.begin(0.0)
    replica.end(4.0)
    replica.observe(ttft_s=None, prefill_tps=None, stream_tps=None, completion_tokens=2000)
    replica.mark_throughput(4.0)
    assert replica.measured_tps == pytest.approx(500)
    assert replica.completion_per_1k == pytest.approx(0.002)
