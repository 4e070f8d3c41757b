from __future__ import annotations

import pytest

from portcullis.errors import ServiceUnavailable
from portcullis.routing.balancer import pick
from portcullis.routing.catalog import Replica, ReplicaState


def _replica(
    name: str,
    *,
    slots: int = 1,
    in_flight: int = 0,
    state: ReplicaState = ReplicaState.READY,
    kind: str = "llama_cpp",
    weight: int = 1,
) -> Replica:
    return Replica(
        model="m",
        name=name,
        url=f"http://{name}",
        kind=kind,
        upstream_model=None,
        weight=weight,
        state=state,
        in_flight=in_flight,
        slots=slots,
    )


def test_most_free_slots_relative_to_capacity_wins() -> None:
    big = _replica("big", slots=8, in_flight=4)  # half busy
    small = _replica("small", slots=2, in_flight=0)  # idle
    assert pick([big, small]) is small
    small.in_flight = 2  # now full: big (4/8) has room
    assert pick([big, small]) is big


def test_ties_are_broken_at_random() -> None:
    a, b = _replica("a"), _replica("b")
    chosen = {pick([a, b]).name for _ in range(200)}
    assert chosen == {"a", "b"}


@pytest.mark.parametrize("state", [ReplicaState.DOWN, ReplicaState.WARMING, ReplicaState.UNKNOWN])
def test_never_a_replica_that_is_not_ready(state: ReplicaState) -> None:
    sick = _replica("sick", slots=64, state=state)
    busy = _replica("busy", slots=1, in_flight=5)
    assert all(pick([sick, busy]) is busy for _ in range(50))


def test_no_ready_replica_is_503_and_says_loading_when_warming() -> None:
    with pytest.raises(ServiceUnavailable) as info:
        pick([_replica("w", state=ReplicaState.WARMING)])
    assert info.value.code == "model_loading" and info.value.headers["Retry-After"]
    with pytest.raises(ServiceUnavailable) as info:
        pick([_replica("d", state=ReplicaState.DOWN)])
    assert info.value.code == "no_ready_replica"


def test_generic_backends_use_least_in_flight_by_weight() -> None:
    heavy = _replica("heavy", kind="openai", weight=4, in_flight=3, slots=99)
    light = _replica("light", kind="openai", weight=1, in_flight=1, slots=99)
    assert pick([heavy, light]) is heavy  # 3/4 < 1/1; llama slots are ignored for generic backends
