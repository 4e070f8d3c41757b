"""A llama-server in router mode behind the gateway, simulated (portcullis sim --router-models): one server, three
models, one loaded at a time. The simulator evicts as the weakness of ggml-org/llama.cpp#21678 does (the least
recently used model, even while it serves, failing its requests), so only the gateway's scheduler keeps requests
from failing: it loads a model only when nothing is in flight on the one it replaces, batches the loaded model's
requests, and switches when a request has waited `max_wait_s`.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from procs import (
    ADMIN_KEY,
    Proc,
    gateway_config,
    http_get,
    http_post,
    new_key,
    openai_client,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_until,
)
from swaptrace import naive_swaps, run_trace

MODELS = ["a", "b", "c"]
LOAD_S = 0.4
MAX_WAIT_S = 3.0
SIM_ARGS = ("--models-max", "1", "--load-s", str(LOAD_S), "--evict-busy", "--tokens-per-s", "80", "--slots", "4")
SCHEDULING = {"max_wait_s": MAX_WAIT_S, "idle_s": 0.3, "load_s": 0.5, "failed_retry_s": 2}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def router(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--router-models", ",".join(MODELS), *SIM_ARGS, log_dir=module_tmp)
    yield proc
    proc.stop()


def peak_now() -> dict[str, Any]:
    """scheduling.off_peak with one hour, twelve hours from now: it is peak time for the whole module."""
    hour = (datetime.now(UTC).hour + 12) % 24
    return {"off_peak": [{"from": f"{hour:02d}:00", "to": f"{hour + 1:02d}:00", "tz": "UTC"}]}


@pytest.fixture(scope="module")
def gw(router: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {m: [{"host": "gpu"}] for m in MODELS},
        hosts={"gpu": {"kind": "router", "url": router.url, "scheduling": SCHEDULING}},
        resilience={"breaker": {"failures": 1000}},
        scheduling=peak_now(),
        batch={"poll_s": 0.2, "retry_delay_s": 0.2, "in_peak": "always"},  # (the host, not the runner, holds them)
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def hosts(gw: Proc) -> dict[str, Any]:
    status, raw = http_get(gw.url + "/admin/hosts", headers=ADMIN)
    assert status == 200, raw
    return {m["model"]: m for m in orjson.loads(raw)["data"][0]["models"]}


def server_states(router: Proc) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in orjson.loads(http_get(router.url + "/models")[1])["data"]}


def test_the_gateway_learns_the_routers_room_and_states(gw: Proc, router: Proc) -> None:
    raw = http_get(gw.url + "/admin/hosts", headers=ADMIN)[1]
    host = orjson.loads(raw)["data"][0]
    assert host["kind"] == "router" and host["max_models"] == 1  # the server's --models-max, from its /props
    assert {m["model"]: m["state"] for m in host["models"]} == {m: "unloaded" for m in MODELS}
    # A model loaded behind the gateway's back (the router's own API) is seen from its events.
    assert http_post(router.url + "/models/load", {"model": "c"})[0] == 200
    wait_until(lambda: hosts(gw)["c"]["state"] == "loaded", timeout=10, what="the gateway to see c loaded")
    assert http_post(router.url + "/models/unload", {"model": "c"})[0] == 200
    wait_until(lambda: hosts(gw)["c"]["state"] == "unloaded", timeout=10, what="the gateway to see c unloaded")


def test_an_interleaved_stream_under_load_loses_nothing_and_swaps_less_than_arrival_order(
    gw: Proc, router: Proc, module_tmp: Path
) -> None:
    sequence = list("abaac" * 12)
    before = sim_stats(router)
    outcomes = run_trace(gw.url + "/v1", ADMIN_KEY, sequence, gap_s=0.04, max_tokens=12)
    after = sim_stats(router)
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:3]
    assert after["failed_by_eviction"] == before["failed_by_eviction"]
    assert after["evicted_busy"] == before["evicted_busy"]  # nothing was ever unloaded under a request
    assert after["max_loaded"] <= 1
    swaps = after["loads"] - before["loads"] - 1
    naive = naive_swaps(sequence)
    assert swaps < naive / 4, (swaps, naive, after["load_order"][len(before["load_order"]) :])
    # No request waited past the bound plus one load (the unload before it, the scheduler's reaction: 0.3 s).
    load_s = max(m["load_s"] or LOAD_S for m in hosts(gw).values())
    longest = max(o.wait_ms for o in outcomes) / 1000
    assert longest <= MAX_WAIT_S + load_s + 0.3, (longest, load_s)
    print(f"swaps {swaps} against {naive} in arrival order; longest wait {longest:.2f} s (bound {MAX_WAIT_S} s)")

    # The same trace straight to the router (no gateway scheduling): it evicts models under their requests.
    direct = start_sim("--router-models", ",".join(MODELS), *SIM_ARGS, log_dir=module_tmp)
    try:
        outcomes = run_trace(direct.url + "/v1", "none", sequence, gap_s=0.04, max_tokens=12)
        stats = sim_stats(direct)
    finally:
        direct.stop()
    assert stats["failed_by_eviction"] > 0 and any(o.status != 200 for o in outcomes)


def test_a_load_nobody_waits_for_is_cancelled(gw: Proc, router: Proc) -> None:
    sim_control(router, load_s=3.0)
    try:
        loads = sim_stats(router)["loads"]
        client = openai_client(gw, timeout=0.5)
        target = next(m for m in MODELS if hosts(gw)[m]["state"] == "unloaded")
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model=target, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        wait_until(
            lambda: hosts(gw)[target]["state"] == "unloaded" and server_states(router)[target] == "unloaded",
            timeout=10,
            what="the load to be cancelled",
        )
        time.sleep(3.5)  # past when the load would have ended
        assert server_states(router)[target] == "unloaded"
        assert sim_stats(router)["loads"] == loads
    finally:
        sim_control(router, load_s=LOAD_S)


def test_a_failed_load_is_a_503_with_retry_after_and_is_not_retried_at_once(gw: Proc, router: Proc) -> None:
    sim_control(router, fail_models=["b"])
    try:
        client = openai_client(gw)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "model_load_failed"  # type: ignore[index]
        assert int(info.value.response.headers["retry-after"]) >= 1
        # A second request in the retry window fails at once: the model is not loaded again and again.
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as again:
            client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert again.value.status_code == 503 and time.monotonic() - started < LOAD_S
        assert hosts(gw)["b"]["state"] == "failed" and hosts(gw)["b"]["load_failures"] == 1
    finally:
        sim_control(router, fail_models=[])
    # Mended, it loads again once the retry window (failed_retry_s: 2) is over.
    time.sleep(2.0)
    client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert hosts(gw)["b"]["state"] == "loaded"


def test_higher_tiers_models_load_first_and_metrics_tell_the_swaps(gw: Proc, router: Proc) -> None:
    free = openai_client(gw, new_key(gw, tier="free"))
    enterprise = openai_client(gw, new_key(gw, tier="enterprise"))
    # a loaded and busy with a long answer; then b (free tier) and c (enterprise) wait for the switch.
    enterprise.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    first, low, high = "a", "b", "c"
    done: dict[str, float] = {}

    def ask(client: openai.OpenAI, model: str, tokens: int) -> None:
        messages = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=tokens, extra_body={"ignore_eos": True}
        )
        done[model] = time.monotonic()

    long = threading.Thread(target=ask, args=(enterprise, first, 80))  # about a second at 80 tokens/s
    long.start()
    wait_until(lambda: hosts(gw)[first]["in_flight"] == 1 and hosts(gw)[first]["state"] == "loaded", timeout=10)
    waiting = [threading.Thread(target=ask, args=(free, low, 4))]
    waiting[0].start()
    wait_until(lambda: hosts(gw)[low]["waiting"] == 1, timeout=5)
    waiting.append(threading.Thread(target=ask, args=(enterprise, high, 4)))
    waiting[1].start()
    for t in (long, *waiting):
        t.join(timeout=30)
    assert done[high] < done[low]  # the enterprise request's model loaded first, though it came second
    metrics = http_get(gw.url + "/metrics")[1].decode()
    assert 'portcullis_host_swaps_total{host="gpu"}' in metrics
    assert f'portcullis_host_model_state{{host="gpu",model="{low}",state="loaded"}} 1.0' in metrics
    assert 'portcullis_host_model_load_seconds{host="gpu",model="a"}' in metrics


def test_batch_lines_never_swap_models_in_peak_hours(gw: Proc, router: Proc) -> None:
    client = openai_client(gw)
    client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    loads = sim_stats(router)["load_order"]
    content = b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            }
        )
        + b"\n"
        for i in range(3)
    )
    file = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    # The runner tries its lines (a is idle: any interactive request for b would switch now); each is refused.
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", timeout=10)
    time.sleep(3)
    assert sim_stats(router)["load_order"] == loads  # b never loaded, a never unloaded
    assert hosts(gw)["a"]["state"] == "loaded" and hosts(gw)["b"]["state"] == "unloaded"
    assert client.batches.retrieve(batch.id).request_counts.completed == 0  # type: ignore[union-attr]
    # An interactive request for b does switch (the batch's lines then run on it, b being loaded).
    client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", timeout=30, what="the batch")


def test_the_dashboard_shows_each_models_state_load_time_and_swaps(gw: Proc) -> None:
    from browser import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for model in ("a", "c"):  # (c replaces a: a swap)
        openai_client(gw).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    browser = chromium()
    try:
        browser.get(gw.url + "/dashboard")
        browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
        browser.find_element(By.ID, "sign-in").click()

        def row(model: str) -> list[str]:
            return browser.execute_script(
                "const r = document.querySelector(`#hosts tr[data-host-model='${arguments[0]}']`);"
                "return r ? [...r.querySelectorAll('td')].map((td) => td.textContent.trim()) : [];",
                model,
            )

        wait = WebDriverWait(browser, 20, poll_frequency=0.2)
        wait.until(lambda _: row("c")[2:3] == ["loaded"])
        cells = row("c")
        assert cells[0] == "gpu" and cells[5].endswith(" s") and float(cells[5][:-2]) > 0  # its learned load time
        assert int(cells[6]) >= 1  # swaps in the last hour
        assert row("a")[2] == "unloaded"
    finally:
        browser.quit()
