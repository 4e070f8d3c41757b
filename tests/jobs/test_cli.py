"""`portcullis batch ...` and `portcullis route explain` against a running gateway (and offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml
from procs import ADMIN_KEY, Proc, gateway_config, start_gateway, start_sim


@pytest.fixture(scope="module")
def gw(module_tmp: Path) -> Iterator[Proc]:
    sim = start_sim("--slots", "4", "--tokens-per-s", "100", log_dir=module_tmp)
    cheap, dear = {"prompt_per_1k": 0.001, "completion_per_1k": 0.001}, {"prompt_per_1k": 0.1, "completion_per_1k": 0.1}
    cfg = gateway_config(
        {"small": [{"url": sim.url, "cost": cheap}], "large": [{"url": sim.url, "cost": dear}]},
        routers={"auto": {"candidates": ["small", "large"]}},
        batch={"poll_s": 0.1, "reserve_slots": 0},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()
    sim.stop()


def portcullis(*args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORTCULLIS_API_KEY": ADMIN_KEY}
    if url is not None:
        env["PORTCULLIS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "portcullis", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_batch_submit_wait_shows_progress_and_writes_the_output(gw: Proc, module_tmp: Path) -> None:
    requests = module_tmp / "requests.jsonl"
    requests.write_text(
        "".join(
            orjson.dumps(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
                }
            ).decode()
            + "\n"
            for i in range(60)
        )
    )
    out = module_tmp / "out.jsonl"
    done = portcullis("batch", "submit", str(requests), "--wait", "-o", str(out), url=gw.url)
    assert done.returncode == 0, done.stderr
    progress = [x for x in done.stderr.splitlines() if x.startswith("[")]
    assert progress and progress[-1].startswith("[" + "#" * 30 + "] 60/60 (0 failed)")
    assert "completed" in progress[-1]
    batch_id = done.stdout.split(":")[0]
    assert batch_id.startswith("batch_") and "60/60 completed" in done.stdout
    assert sorted(orjson.loads(x)["custom_id"] for x in out.read_text().splitlines()) == sorted(
        f"c{i}" for i in range(60)
    )
    status = portcullis("batch", "status", batch_id, "--json", url=gw.url)
    assert orjson.loads(status.stdout)["status"] == "completed"
    downloaded = portcullis("batch", "download", batch_id, url=gw.url)
    assert downloaded.stdout == out.read_text()
    no_errors = portcullis("batch", "download", batch_id, "--errors", url=gw.url)
    assert no_errors.returncode == 1 and "has no error file" in no_errors.stderr
    assert batch_id in portcullis("batch", "list", url=gw.url).stdout


def test_batch_submit_of_a_bad_file_says_which_lines(gw: Proc, module_tmp: Path) -> None:
    bad = module_tmp / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n')
    done = portcullis("batch", "submit", str(bad), url=gw.url)
    assert done.returncode == 1 and "line 1: invalid_method" in done.stdout


def test_route_explain_online_and_offline(gw: Proc, module_tmp: Path) -> None:
    request = module_tmp / "request.json"
    request.write_text(orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "Hi"}]}).decode())
    online = portcullis("route", "explain", str(request), url=gw.url)
    assert online.returncode == 0, online.stderr
    assert online.stdout.startswith("auto -> model small, replica ")
    assert "reason: cheapest covering complexity" in online.stdout
    config = module_tmp / "offline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "small": {"deployments": [{"url": "http://10.0.0.1:8080", "n_ctx": 100, "quality": 0.2}]},
                    "large": {"deployments": [{"url": "http://10.0.0.2:8080", "n_ctx": 100000, "quality": 0.9}]},
                },
                "routers": {"auto": {"candidates": ["small", "large"]}},
            }
        )
    )
    request.write_text(
        orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "long " * 400}]}).decode()
    )
    offline = portcullis("route", "explain", str(request), "--config", str(config), "--json")
    assert offline.returncode == 0, offline.stderr
    explained = orjson.loads(offline.stdout)
    assert explained["model"] == "large" and explained["replica"] == "10.0.0.2:8080"
    assert explained["candidates"][0]["excluded"] == "context too small"
    too_big = portcullis("route", "explain", str(request), "--config", str(config), "--max-cost", "1e-12")
    assert too_big.returncode == 0  # every price is 0 here: any cap holds
    bad = portcullis("route", "explain", str(request), "--config", str(module_tmp / "missing.yaml"))
    assert bad.returncode == 1 and "missing.yaml" in bad.stderr
