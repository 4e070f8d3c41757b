"""Load signals: each probe of a ready llama-server also reads its /metrics (requests processing, deferred) and
/slots (busy slots, the KV cache they hold). A replica kept busy by another client (requests sent to it directly,
not through the gateway) is full though the gateway has nothing in flight there: its requests go elsewhere, and the
replica's queued / running / KV gauges (the Inference Extension's model-server protocol) say so."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from procs import Proc, gateway_config, http_get, openai_client, sim_stats, start_gateway, start_sim, wait_until


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[list[Proc]]:
    procs = [
        start_sim("--slots", "2", "--tokens-per-s", "20", "--model-alias", f"s{i}.gguf", log_dir=module_tmp)
        for i in range(2)
    ]
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def gw(sims: list[Proc], module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"m": [{"url": s.url, "name": f"r{i}"} for i, s in enumerate(sims)]},
        routing={"affinity": {"enabled": False}},
        cache={"enabled": False},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def gauge(gw: Proc, name: str, replica: str) -> float | None:
    text = http_get(gw.url + "/metrics")[1].decode()
    found = re.search(rf'^{name}{{model="m",replica="{replica}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def test_a_replica_busy_with_another_clients_requests_gets_none_of_ours(gw: Proc, sims: list[Proc]) -> None:
    busy, free = sims
    hog = {"model": "x", "messages": [{"role": "user", "content": "hog"}], "max_tokens": 2000, "ignore_eos": True}
    body = orjson.dumps(hog)
    hogs = []
    for _ in range(4):  # two slots taken, two more waiting inside the server
        conn = http.client.HTTPConnection("127.0.0.1", int(busy.url.rsplit(":", 1)[1]), timeout=60)
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        hogs.append(conn)
    try:
        wait_until(lambda: sim_stats(busy)["active"] == 2 and sim_stats(busy)["waiting"] == 2, timeout=10)
        wait_until(
            lambda: (
                gauge(gw, "portcullis_replica_queued_requests", "r0") == 2.0
                and gauge(gw, "portcullis_replica_running_requests", "r0") == 2.0
            ),
            timeout=10,
            what="the gateway to read the busy server's load",
        )
        assert (gauge(gw, "portcullis_replica_kv_cache_utilization", "r0") or 0) > 0  # its slots hold the hogs' tokens
        assert gauge(gw, "portcullis_replica_queued_requests", "r1") == 0.0
        before = sim_stats(busy)["requests"], sim_stats(free)["completed"]
        client = openai_client(gw)
        for _ in range(6):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert sim_stats(busy)["requests"] == before[0]  # none of ours went where they would have waited
        assert sim_stats(free)["completed"] == before[1] + 6
    finally:
        for conn in hogs:
            conn.close()  # (the simulator cancels a request whose client went away)
    wait_until(lambda: gauge(gw, "portcullis_replica_queued_requests", "r0") == 0.0, timeout=10)
