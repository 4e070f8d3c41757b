"""Launched servers: the gateway starts one server process per model (here the simulator's, from a command line in
the config with `{port}`), on first use, stops it after its TTL, starts it again after a SIGKILL while the requests
it was serving are retried, and never runs two models of an exclusive group at once.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_get, openai_client, start_gateway, wait_until

MARK = f"launched-{secrets.token_hex(3)}"  # in each process's command line: this module's processes, found in /proc
TTL_S = 3.0
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def command(model: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "portcullis",
        "sim",
        "--port",
        "{port}",
        "--model-alias",
        f"{MARK}-{model}",
        "--tokens-per-s",
        "40",
        "--slots",
        "4",
    ]


@pytest.fixture(scope="module")
def gw(module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {m: [{"host": "box", "command": command(m)}] for m in ("a", "b", "c")},
        hosts={
            "box": {
                "kind": "launch",
                "max_models": 2,
                "exclusive": [["a", "b"]],
                "ttl_s": TTL_S,
                "start_timeout_s": 30,
                "scheduling": {"max_wait_s": 2.0, "load_s": 2.0},
            }
        },
        resilience={"retries": 3, "breaker": {"failures": 1000}},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def models(gw: Proc) -> dict[str, Any]:
    status, raw = http_get(gw.url + "/admin/hosts", headers=ADMIN)
    assert status == 200, raw
    return {m["model"]: m for m in orjson.loads(raw)["data"][0]["models"]}


def running() -> set[str]:
    """The models whose processes are alive now, read from /proc."""
    alive = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in cmdline:
            if arg.startswith(MARK.encode() + b"-"):
                alive.add(arg.decode().rsplit("-", 1)[1])
    return alive


def ask(client: openai.OpenAI, model: str, tokens: int = 4) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=tokens,
        extra_body={"ignore_eos": True},  # (exactly `tokens` long: the simulator's natural end is shorter)
    )


def test_a_model_starts_on_first_use_and_stops_after_its_ttl(gw: Proc) -> None:
    assert models(gw)["a"]["state"] == "unloaded" and "a" not in running()
    raw = ask(openai_client(gw), "a")
    assert raw.status_code == 200 and int(raw.headers["x-portcullis-model-wait-ms"]) > 0
    info = models(gw)["a"]
    assert info["state"] == "loaded" and info["pid"] and "a" in running()
    assert http_get(info["url"] + "/health")[0] == 200  # on the port the gateway chose
    assert int(ask(openai_client(gw), "a").headers.get("x-portcullis-model-wait-ms", "0")) == 0  # warm now
    wait_until(lambda: models(gw)["a"]["state"] == "unloaded", timeout=TTL_S + 10, what="the TTL to stop it")
    wait_until(lambda: "a" not in running(), timeout=10, what="its process to end")


def test_a_killed_server_is_started_again_and_its_requests_retried(gw: Proc) -> None:
    client = openai_client(gw)
    ask(client, "c")
    pid = models(gw)["c"]["pid"]
    results: list[Any] = []

    def slow() -> None:
        try:
            raw = ask(client, "c", tokens=60)  # 1.5 s at 40 tokens/s
            results.append((raw.status_code, int(raw.headers["x-portcullis-attempts"])))
        except openai.APIError as exc:
            results.append((repr(exc), 0))

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: models(gw)["c"]["in_flight"] == 3, timeout=10, what="three requests in flight")
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    assert [status for status, _ in results] == [200, 200, 200], results
    assert all(attempts >= 2 for _, attempts in results), results  # each was retried after the crash
    info = models(gw)["c"]
    assert info["state"] == "loaded" and info["pid"] not in (None, pid)


def test_two_models_of_an_exclusive_group_never_run_at_once(gw: Proc) -> None:
    seen: list[set[str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(running())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    client = openai_client(gw)
    failures: list[str] = []

    def one(model: str) -> None:
        try:
            ask(client, model)
        except openai.APIError as exc:
            failures.append(repr(exc))

    threads = []
    try:
        for model in "abcabab":
            thread = threading.Thread(target=one, args=(model,))
            thread.start()
            threads.append(thread)
            time.sleep(0.2)
        for thread in threads:
            thread.join(timeout=90)
    finally:
        stop.set()
        sampler.join()
    assert not failures, failures
    assert not [s for s in seen if {"a", "b"} <= s]  # never both members of the group
    assert [s for s in seen if {"a", "c"} <= s or {"b", "c"} <= s]  # while two models did run together
    assert {"a", "b"} <= set().union(*seen)
    host = orjson.loads(http_get(gw.url + "/admin/hosts", headers=ADMIN)[1])["data"][0]
    assert host["swaps"] >= 1 and host["exclusive"] == [["a", "b"]]
