"""Warm restarts: the gateway keeps the KV cache of a model's most used system prompt on the replica's disk (the
server's --slot-save-path), and when the replica comes back after a restart it restores it into a slot, so the
first request with that prompt after the restart takes it from the cache instead of computing it again."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_get, http_post, sim_stats, start_gateway, start_sim, wait_until

SYSTEM = "You are the assistant of the harbour office. " * 30  # long enough to be worth a slot
SIM_ARGS = ("--slots", "2", "--model-alias", "warm.gguf")
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def saves(module_tmp: Path) -> Path:
    folder = module_tmp / "slot-saves"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def sim(saves: Path, module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim(*SIM_ARGS, "--slot-save-path", str(saves), log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    warm = {"prefixes": 1, "save_every_s": 0.5, "min_chars": 200}
    cfg = gateway_config({"m": [{"url": sim.url, "warm_restart": warm}]}, cache={"enabled": False})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def ask(gw: Proc, question: str) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    status, raw = http_post(gw.url + "/v1/chat/completions", {**body, "max_tokens": 2}, headers=ADMIN)
    assert status == 200, raw
    return orjson.loads(raw)


def state(gw: Proc) -> str:
    backends = orjson.loads(http_get(gw.url + "/admin/backends", headers=ADMIN)[1])
    return next(m for m in backends["data"] if m["model"] == "m")["replicas"][0]["state"]


def test_a_restarted_replica_gets_its_system_prompt_back_in_a_slot(
    gw: Proc, sim: Proc, saves: Path, module_tmp: Path
) -> None:
    for i in range(3):
        ask(gw, f"question {i}")
    wait_until(lambda: sim_stats(sim)["slot_saves"] >= 1, timeout=10, what="the system prompt's slot saved")
    assert [p.name for p in saves.iterdir() if p.name.startswith("portcullis-")]
    port = int(sim.url.rsplit(":", 1)[1])
    sim.signal(signal.SIGKILL)
    sim.wait()
    wait_until(lambda: state(gw) == "down", timeout=10, what="the gateway to see it down")
    again = start_sim(*SIM_ARGS, "--slot-save-path", str(saves), log_dir=module_tmp, port=port)
    try:
        wait_until(lambda: sim_stats(again)["slot_restores"] == 1, timeout=15, what="the slot restored")
        answer = ask(gw, "the first question after the restart")
        prompt = answer["usage"]["prompt_tokens"]
        assert answer["timings"]["cache_n"] >= prompt // 2  # the system prompt came from the restored slot
    finally:
        again.stop()


def test_without_warm_restart_the_first_request_after_a_restart_is_cold(module_tmp: Path, saves: Path) -> None:
    cold = start_sim(*SIM_ARGS, "--slot-save-path", str(saves), log_dir=module_tmp)
    gw = start_gateway(gateway_config({"m": [cold.url]}, cache={"enabled": False}), module_tmp, ready_path="/readyz")
    try:
        answer = ask(gw, "the first question")
        assert answer["timings"]["cache_n"] == 0
    finally:
        gw.stop()
        cold.stop()
