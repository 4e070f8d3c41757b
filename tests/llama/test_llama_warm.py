"""Warm restarts against a real llama-server (LLAMA_SERVER_BIN) started with --slot-save-path: the gateway primes
a slot with the most used system prompt (`id_slot`), has llama-server save it, and restores it into the server that
replaces the first on the same port, whose first request with that prompt then takes it from the cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from llama_proc import serve_llama
from procs import ADMIN_KEY, Proc, gateway_config, http_get, http_post, start_gateway, wait_until

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(not os.environ.get("LLAMA_SERVER_BIN"), reason="LLAMA_SERVER_BIN is not set"),
]
SYSTEM = "You answer questions about the harbour. " * 12  # ~480 tokens with the byte vocabulary
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CTX = 4096  # 2048 per slot


def ask(gw: Proc, question: str) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    status, raw = http_post(gw.url + "/v1/chat/completions", {**body, "max_tokens": 2}, headers=ADMIN, timeout=60)
    assert status == 200, raw
    return orjson.loads(raw)


def restores(gw: Proc) -> float:
    text = http_get(gw.url + "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("portcullis_warm_restored"))


@pytest.fixture(scope="module")
def saves(module_tmp: Path) -> Path:
    folder = module_tmp / "slot-saves"
    folder.mkdir()
    return folder


def test_a_restarted_llama_server_gets_its_system_prompt_back(module_tmp: Path, saves: Path) -> None:
    args = ["--slot-save-path", str(saves)]
    first: Iterator[str] = serve_llama(module_tmp, args=args, name="warm", ctx=CTX)
    url = next(first)
    port = int(url.rsplit(":", 1)[1])
    warm = {"prefixes": 1, "save_every_s": 0.5, "min_chars": 200}
    cfg = gateway_config({"m": [{"url": url, "warm_restart": warm}]}, cache={"enabled": False})
    gw = start_gateway(cfg, module_tmp)
    try:
        for i in range(3):
            ask(gw, f"question {i}")
        wait_until(lambda: any(saves.glob("portcullis-*.bin")), timeout=20, what="llama-server to save the slot")
        next(first, None)  # the generator's end: SIGTERM, waited for
        wait_until(lambda: _state(gw) != "ready", timeout=15, what="the gateway to see it gone")
        second = serve_llama(module_tmp, args=args, name="warm", ctx=CTX, port=port)
        next(second)
        try:
            wait_until(lambda: restores(gw) >= 1, timeout=20, what="the slot restored")
            answer = ask(gw, "the first question after the restart")
            assert answer["timings"]["cache_n"] >= answer["usage"]["prompt_tokens"] // 2
        finally:
            next(second, None)
    finally:
        gw.stop()
        next(first, None)


def _state(gw: Proc) -> str:
    backends = orjson.loads(http_get(gw.url + "/admin/backends", headers=ADMIN)[1])
    return str(backends["data"][0]["replicas"][0]["state"])
