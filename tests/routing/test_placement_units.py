"""Prefix affinity's index and bounded load, off-peak windows, and the token estimate's bounds."""

from __future__ import annotations

from datetime import datetime

import pytest

from portcullis.config import AffinityConfig, ConfigError, ContextFitConfig, OffPeakWindow, build_config
from portcullis.offpeak import OffPeak
from portcullis.routing.affinity import Affinity
from portcullis.routing.affinity import render as render_prompt
from portcullis.routing.catalog import Replica, ReplicaState
from portcullis.routing.context import TokenCounter


def _replicas(n: int, slots: int = 4) -> list[Replica]:
    out = []
    for i in range(n):
        r = Replica(model="m", name=f"r{i}", url=f"http://r{i}", kind="llama_cpp", upstream_model=None, weight=1)
        r.state, r.slots = ReplicaState.READY, slots
        out.append(r)
    return out


def _conversation(system: str, turns: int) -> dict:
    messages = [{"role": "system", "content": system}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return {"messages": [*messages, {"role": "user", "content": "next"}]}


def test_keys_name_prefixes_so_a_longer_conversation_shares_the_shorter_ones_keys() -> None:
    affinity = Affinity(AffinityConfig(block_chars=64))
    short = affinity.keys("m", _conversation("S" * 300, 1))
    longer = affinity.keys("m", _conversation("S" * 300, 5))
    assert len(longer) > len(short) >= 4
    assert longer[: len(short) - 1] == short[: len(short) - 1]  # (the last block of the short one is partial)
    assert affinity.keys("other-model", _conversation("S" * 300, 1))[0] != short[0]
    assert affinity.keys("m", {"messages": [{"role": "user", "content": "hi"}]}) == ()  # shorter than a block


def test_a_known_prefix_goes_back_to_its_replica_and_a_new_one_to_its_hash() -> None:
    affinity = Affinity(AffinityConfig(block_chars=64))
    replicas = _replicas(3)
    keys = affinity.keys("m", _conversation("system prompt " * 20, 1))
    first = affinity.pick(replicas, keys, (), 0.0, 0)
    assert first is not None and affinity.new == 1
    # Every process ranks replicas the same way for a new prefix.
    assert Affinity(AffinityConfig(block_chars=64)).pick(replicas, keys, (), 0.0, 0) is first
    other = next(r for r in replicas if r is not first)
    affinity.remember(keys, other)  # it answered elsewhere (say the first was full): the index follows
    later = affinity.keys("m", _conversation("system prompt " * 20, 3))
    assert affinity.pick(replicas, later, (), 0.0, 0) is other and affinity.hits == 1


def test_bounded_load_moves_on_when_the_prefix_replica_is_full() -> None:
    affinity = Affinity(AffinityConfig(block_chars=64))
    replicas = _replicas(2, slots=2)
    keys = affinity.keys("m", _conversation("shared system prompt " * 10, 1))
    home = affinity.pick(replicas, keys, (), 0.0, 0)
    assert home is not None
    home.in_flight = 2  # every slot taken
    away = affinity.pick(replicas, keys, (), 0.0, 0)
    assert away is not None and away is not home and affinity.overflow == 1
    away.in_flight = 2
    assert affinity.pick(replicas, keys, (), 0.0, 0) is None  # nowhere with room: balance by load


def test_placement_is_checked_against_the_cache_and_new_prefixes_follow_what_replicas_keep() -> None:
    from portcullis.exchange import Exchange

    affinity = Affinity(AffinityConfig(block_chars=64))
    big, small = _replicas(2)
    big.slots, small.slots = 8, 2
    payload = _conversation("system prompt " * 20, 2)
    keys = affinity.keys("m", payload)
    size = len(render_prompt(payload))

    def answered(replica: Replica, cached: int, depth: int) -> None:
        ex = Exchange(route="chat", task=None, started_at=0.0, replica=replica, affinity=keys, affinity_depth=depth)
        ex.prompt_tokens, ex.prompt_size = size // 4, (size, 0)  # 4 characters a token
        ex.timings = {"cache_n": cached, "prompt_n": size // 4 - cached}
        affinity.verify(ex, replica)

    answered(big, cached=len(keys) * 16, depth=len(keys))  # it held all it was promised to hold
    answered(small, cached=0, depth=len(keys))  # its slot had gone to other prompts
    answered(small, cached=5, depth=0)  # no promise made: nothing to learn
    assert (affinity.kept, affinity.broken) == (1, 1)
    assert affinity.retention[big] == 1.0 and affinity.retention[small] == pytest.approx(0.9)
    # New prefixes go by slots times retention: 8 against 1.8, about 82 % to the big one (today's: about half).
    placed = [affinity.pick([big, small], (bytes([i, j]) * 8,), (), 0.0, 0) for i in range(20) for j in range(20)]
    share = placed.count(big) / len(placed)
    assert 0.75 < share < 0.89, share
    today = Affinity(AffinityConfig(block_chars=64, learn=False))
    placed = [today.pick([big, small], (bytes([i, j]) * 8,), (), 0.0, 0) for i in range(20) for j in range(20)]
    assert 0.4 < placed.count(big) / len(placed) < 0.6


def test_the_index_is_bounded() -> None:
    affinity = Affinity(AffinityConfig(block_chars=16, max_entries=50))
    replica = _replicas(1)[0]
    for i in range(100):
        affinity.remember(affinity.keys("m", {"prompt": f"{i:04d}" * 20}), replica)
    assert len(affinity._index) == 50


def _window(**fields: str) -> OffPeakWindow:
    return OffPeakWindow.model_validate(fields)


def _t(*args: int, tz: str = "UTC") -> float:
    from zoneinfo import ZoneInfo

    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


def test_a_window_past_midnight_belongs_to_the_day_it_starts() -> None:
    nights = OffPeak([_window(days="mon-fri", **{"from": "19:00", "to": "07:00"}, tz="Europe/Berlin")])
    friday_noon = _t(2026, 11, 27, 12, 0, tz="Europe/Berlin")
    assert not nights.active(friday_noon)
    assert nights.seconds_until_start(friday_noon) == pytest.approx(7 * 3600)
    assert nights.active(_t(2026, 11, 28, 6, 59, tz="Europe/Berlin"))  # Saturday morning: Friday's night
    assert not nights.active(_t(2026, 11, 28, 20, 0, tz="Europe/Berlin"))  # Saturday evening: no window
    # Friday noon to Monday noon: only Friday night's 12 hours.
    assert nights.seconds_between(friday_noon, friday_noon + 3 * 86400) == pytest.approx(12 * 3600)


def test_windows_keep_local_hours_across_daylight_saving() -> None:
    mornings = OffPeak([_window(days="daily", **{"from": "02:00", "to": "04:00"}, tz="Europe/Berlin")])
    # 2026-03-29: Berlin moves from UTC+1 to UTC+2 at 02:00, so 02:00-03:00 does not exist that day and
    # the window lasts one real hour; on other days two.
    assert mornings.seconds_between(_t(2026, 3, 29, 0, 0), _t(2026, 3, 29, 12, 0)) == pytest.approx(3600)
    assert mornings.seconds_between(_t(2026, 3, 30, 0, 0), _t(2026, 3, 30, 12, 0)) == pytest.approx(7200)
    assert mornings.active(_t(2026, 7, 1, 3, 0, tz="Europe/Berlin"))
    assert not mornings.active(_t(2026, 7, 1, 3, 0, tz="UTC"))  # 05:00 in Berlin


def test_no_window_means_always_off_peak_and_bad_windows_are_config_errors() -> None:
    assert OffPeak([]).active(0.0) and OffPeak([]).seconds_until_start(0.0) == 0.0
    models = {"m": {"deployments": [{"url": "http://127.0.0.1:9"}]}}
    for bad in ({"days": "mon-xyz"}, {"from": "25:00"}, {"tz": "Mars/Olympus"}):
        with pytest.raises(ConfigError) as info:
            build_config({"models": models, "scheduling": {"off_peak": [bad]}}, source="f.yaml", environ={})
        assert "scheduling.off_peak[0]" in str(info.value)


def test_estimate_bounds_and_token_id_prompts() -> None:
    counter = TokenCounter(ContextFitConfig(margin=0.5), chars_per_token=4)
    payload = {"messages": [{"role": "user", "content": "x" * 400}]}
    estimate = counter.estimate(payload)
    assert estimate == 100 + 6 + 5
    low, high = counter.bounds(estimate, payload)
    assert low < estimate < high
    ids = {"prompt": list(range(77))}
    assert counter.estimate(ids) == 77 and counter.bounds(77, ids) == (77, 77)


def test_a_batch_runs_in_peak_hours_only_when_off_peak_time_would_not_suffice() -> None:
    from portcullis.jobs.runner import needed_now

    # 1,000 lines of 2 s on 4 slots need ~500 s (x1.5 = 750 s).
    assert not needed_now(left=1000, service_s=2.0, slots=4, off_peak_left_s=3600, margin_s=1)
    assert needed_now(left=1000, service_s=2.0, slots=4, off_peak_left_s=600, margin_s=1)
    assert needed_now(left=1, service_s=2.0, slots=4, off_peak_left_s=0, margin_s=1)  # no off-peak time left
    assert not needed_now(left=0, service_s=2.0, slots=4, off_peak_left_s=10, margin_s=1)


def test_the_estimate_learns_a_models_tokens_per_byte() -> None:
    counter = TokenCounter(ContextFitConfig(), chars_per_token=4)
    payload = {"prompt": "z" * 1000}
    assert counter.estimate(payload, "bytes") == 250 + 1
    size, framing = counter.measure(payload)
    for _ in range(60):  # a byte-level tokenizer: a token per byte
        counter.learn("bytes", size, framing, prompt_tokens=1001)
    assert 950 <= counter.estimate(payload, "bytes") <= 1001
    assert counter.estimate(payload, "other") == 251  # per model
    counter.learn("small", 100, 1, prompt_tokens=90)  # too small a prompt to learn from
    assert "small" not in counter.ratios
    cjk = {"prompt": "漢" * 300}  # three bytes a character: ~225 tokens by bytes, where chars/4 says 75
    assert counter.estimate(cjk) == 225 + 1
