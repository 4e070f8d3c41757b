"""Balancing: pick the usable replica with the most free capacity.

llama-server has a fixed number of slots and queues silently beyond them, so the load of a replica is
its in-flight count relative to its slots (learned from /props); a generic backend's capacity is its
configured weight. Usable means ready (prober), let through by its breaker and not cooling down after
an upstream 429. Ties are broken at random so equal replicas share the load. A replica whose context
per slot cannot hold the request (`need` tokens, routing/context.py) is never chosen.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection

from portcullis.errors import ServiceUnavailable, retry_after_headers
from portcullis.routing.catalog import Replica, ReplicaState
from portcullis.routing.context import fits

_COLD = 1e6


def choose(
    replicas: list[Replica], avoid: Collection[Replica] = (), now: float | None = None, need: int = 0
) -> Replica | None:
    """The least loaded usable replica not in `avoid` that can hold `need` tokens, or None."""
    now = time.monotonic() if now is None else now
    best: list[Replica] = []
    best_load = 0.0
    for replica in replicas:
        if replica in avoid or not replica.usable(now) or (need and not fits(replica, need)):
            continue
        # (a llama-server's own reading adds what it carries for other clients: a saturated server is full)
        load = (replica.in_flight + replica.external(now)) / replica.capacity
        if not replica.loaded:
            load += _COLD  # a host's model that is not loaded: only when no loaded replica can take it
        if not best or load < best_load:
            best = [replica]
            best_load = load
        elif load == best_load:
            best.append(replica)
    if not best:
        return None
    return best[0] if len(best) == 1 else random.choice(best)


def pick(replicas: list[Replica]) -> Replica:
    replica = choose(replicas)
    if replica is None:
        raise unavailable(replicas)
    return replica


def unavailable(replicas: list[Replica]) -> ServiceUnavailable:
    """The 503 for a model none of whose replicas can take a request now, with an honest Retry-After."""
    model = replicas[0].model if replicas else "?"
    now = time.monotonic()
    if any(r.state is ReplicaState.WARMING for r in replicas):
        return ServiceUnavailable(
            f"The model '{model}' is loading; try again shortly.",
            code="model_loading",
            headers={"Retry-After": "5"},
        )
    # The soonest a replica that is up comes back: its breaker half-opens, or its 429 cool-down ends.
    waits = [max(r.breaker.retry_in(now), r.cooldown_until - now) for r in replicas if r.state is ReplicaState.READY]
    wait = min(waits) if waits else 5.0
    return ServiceUnavailable(
        f"No replica of the model '{model}' is available right now.",
        code="no_ready_replica",
        headers=retry_after_headers(wait),
    )
