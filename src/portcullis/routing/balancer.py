"""Balancing: pick the ready replica with the most free capacity.

llama-server has a fixed number of slots and queues silently beyond them, so the load of a replica is
its in-flight count relative to its slots (learned from /props); a generic backend's capacity is its
configured weight. Ties are broken at random so equal replicas share the load.
"""

from __future__ import annotations

import random

from portcullis.errors import ServiceUnavailable
from portcullis.routing.catalog import Replica, ReplicaState


def pick(replicas: list[Replica]) -> Replica:
    best: list[Replica] = []
    best_load = 0.0
    for replica in replicas:
        if replica.state is not ReplicaState.READY:
            continue
        load = replica.in_flight / replica.capacity
        if not best or load < best_load:
            best = [replica]
            best_load = load
        elif load == best_load:
            best.append(replica)
    if not best:
        model = replicas[0].model if replicas else "?"
        warming = any(r.state is ReplicaState.WARMING for r in replicas)
        if warming:
            raise ServiceUnavailable(
                f"The model '{model}' is loading; try again shortly.",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        raise ServiceUnavailable(
            f"No replica of the model '{model}' is available right now.",
            code="no_ready_replica",
            headers={"Retry-After": "5"},
        )
    return best[0] if len(best) == 1 else random.choice(best)
