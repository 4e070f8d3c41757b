"""The catalog: logical model names → their replicas (one per configured deployment), with live state.

A `Replica` is shared data: the prober writes its health and capacity, the balancer reads them, the
upstream stage counts its in-flight requests. Nobody else mutates it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from portcullis.config import BreakerConfig, Config, DeploymentConfig
from portcullis.errors import NotFound
from portcullis.routing.breaker import Breaker

if TYPE_CHECKING:
    from portcullis.upstream.client import UpstreamClient


class ReplicaState(StrEnum):
    UNKNOWN = "unknown"  # not probed yet
    READY = "ready"
    WARMING = "warming"  # llama-server answers 503 "Loading model": alive, not serving yet
    DOWN = "down"  # no answer, or an unexpected one


@dataclass(eq=False, slots=True)
class Replica:
    model: str
    name: str
    url: str
    kind: str  # "llama_cpp" | "openai"
    upstream_model: str | None
    weight: int
    api_key: str | None = field(default=None, repr=False)
    state: ReplicaState = ReplicaState.UNKNOWN
    in_flight: int = 0
    # llama-server's parallel slots (/props total_slots); for other backends the configured weight.
    slots: int = 1
    n_ctx: int | None = None  # context per slot, when the upstream tells
    last_error: str | None = None
    client: UpstreamClient | None = None
    # Price per 1,000 tokens in quota.currency (budgets and usage records).
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    max_in_flight: int | None = None  # configured; None: the slots (llama-server) or unlimited
    breaker: Breaker = field(default_factory=lambda: Breaker("", BreakerConfig()))
    # After an upstream 429 with Retry-After, the replica gets nothing new until then (monotonic time).
    cooldown_until: float = 0.0

    @property
    def capacity(self) -> int:
        """The balancing weight: llama-server's slots, or a generic backend's configured weight."""
        return self.slots if self.kind == "llama_cpp" else self.weight

    @property
    def limit(self) -> int | None:
        """Requests the gateway may have in flight here at once (None: no limit, no queueing)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return self.slots if self.kind == "llama_cpp" else None

    def usable(self, now: float) -> bool:
        """Ready (prober), let through by its breaker, not cooling down after a 429."""
        return self.state is ReplicaState.READY and self.breaker.allows(now) and now >= self.cooldown_until

    @classmethod
    def from_config(cls, model: str, index: int, dep: DeploymentConfig, breaker: BreakerConfig) -> Replica:
        parts = urlsplit(dep.url)
        name = dep.name or f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        return cls(
            model=model,
            name=name,
            url=dep.url,
            kind=dep.kind,
            upstream_model=dep.upstream_model,
            weight=dep.weight,
            api_key=dep.api_key(),
            prompt_per_1k=dep.cost.prompt_per_1k,
            completion_per_1k=dep.cost.completion_per_1k,
            max_in_flight=dep.max_in_flight,
            breaker=Breaker(f"{model}/{name}", breaker),
        )


class Catalog:
    def __init__(self, models: dict[str, list[Replica]], fallbacks: dict[str, list[str]] | None = None) -> None:
        self.models = models
        # Models a request may fail over to, in order (models.<m>.fallbacks).
        self.fallbacks = fallbacks or {}
        # Models switched off at run time (DELETE /v1/models/{id}); persisted, shared by every process.
        self.disabled: set[str] = set()

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        breaker = config.resilience.breaker
        return cls(
            {
                name: [Replica.from_config(name, i, dep, breaker) for i, dep in enumerate(model.deployments)]
                for name, model in config.models.items()
            },
            {name: list(model.fallbacks) for name, model in config.models.items()},
        )

    def replicas_for(self, model: str) -> list[Replica]:
        replicas = self.models.get(model)
        if replicas is None or model in self.disabled:
            raise NotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return replicas

    def enabled(self) -> list[str]:
        return [name for name in self.models if name not in self.disabled]

    def all_replicas(self) -> list[Replica]:
        return [r for replicas in self.models.values() for r in replicas]

    def unready_models(self) -> list[str]:
        """Enabled models with no replica that is ready and let through by its breaker."""
        now = time.monotonic()
        return [
            name
            for name, replicas in self.models.items()
            if name not in self.disabled
            and not any(r.state is ReplicaState.READY and r.breaker.allows(now) for r in replicas)
        ]
