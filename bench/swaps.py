"""Many models on one GPU: swaps per 1,000 requests and latency, for three ways of ordering the same arrivals.

    .venv/bin/python bench/swaps.py                 # the router-mode simulator, about 3 minutes

A llama-server in router mode (simulated: `portcullis sim --router-models`, llama.cpp's queue and LRU eviction of an
idle model, --models-max 1, 0.5 s per load, 4 slots at 60 tokens/s) serves three models. One arrival trace, the same
for every policy: Poisson arrivals at --rate requests/s, models drawn 60/25/15 %, 16 tokens each. Policies:

  naive        no scheduling in the gateway: every request goes to the router at once, which loads its model when
               the loaded one is idle (what llama-server's own queue does);
  fifo         the gateway's host scheduler in strict arrival order (a switch whenever the oldest request wants a
               model that is not loaded);
  swap_aware   the gateway's host scheduler (docs/llama-server.md): the loaded model's requests first, a switch when
               a waiting request nears max_wait_s (4 s) or the loaded model is idle.

Rounds alternate the policies (--runs rounds); each figure is the median over rounds. Writes bench/RESULTS-swaps.md,
results-swaps.json, results-swaps.png and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from harness import embed, free_port, logger, percentile, pyplot, serve_gateway, wait_http

HERE = Path(__file__).resolve().parent
PY = sys.executable
MODELS = {"a": 0.60, "b": 0.25, "c": 0.15}
LOAD_S = 0.5
MAX_WAIT_S = 4.0
POLICIES = ["naive", "fifo", "swap_aware"]
log = logger("swaps")


def trace(n: int, rate: float, seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.choices(list(MODELS), weights=list(MODELS.values()))[0]))
    return out


def start_router(work: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [PY, "-m", "portcullis", "sim", "--port", str(port), "--router-models", ",".join(MODELS)]
    cmd += ["--models-max", "1", "--load-s", str(LOAD_S), "--tokens-per-s", "60", "--slots", "4"]
    proc = subprocess.Popen(cmd, stdout=(work / f"{name}-sim.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", timeout=60)
    return proc, url


def start_gateway(work: Path, name: str, router: str, policy: str) -> tuple[subprocess.Popen[bytes], str]:
    config: dict[str, Any] = {
        "server": {"access_log": False},
        "store": {"database_url": f"sqlite+aiosqlite:///{work}/{name}.db", "auto_migrate": True},
        "auth": {"api_keys": False, "allow_anonymous": True},
        "tiers": {"free": {"priority": 0}},
        "cache": {"enabled": False},
        "admission": {"max_queue": 10_000, "max_wait_s": 600},
    }
    if policy == "naive":
        # (the router's own /props has no slot count: each model's 4 slots are said here)
        config["models"] = {
            m: {"deployments": [{"url": router, "upstream_model": m, "max_in_flight": 4}]} for m in MODELS
        }
    else:
        sched = {"policy": policy, "max_wait_s": MAX_WAIT_S, "load_s": LOAD_S, "max_queue": 10_000}
        config["hosts"] = {"gpu": {"kind": "router", "url": router, "scheduling": sched}}
        config["models"] = {m: {"deployments": [{"host": "gpu"}]} for m in MODELS}
    return serve_gateway(work, name, config)


async def play(url: str, arrivals: list[tuple[float, str]]) -> dict[str, Any]:
    latencies: list[float] = []
    failed = 0
    errors: dict[int, int] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(at: float, model: str, start: float) -> None:
            nonlocal failed
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
            t0 = time.monotonic()
            async with session.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as r:
                await r.read()
                if r.status != 200:
                    failed += 1
                    errors[r.status] = errors.get(r.status, 0) + 1
                    return
            latencies.append(time.monotonic() - t0)

        start = time.monotonic() + 0.5
        await asyncio.gather(*(one(at, model, start) for at, model in arrivals))
    if errors:
        log(f"failed: {errors} (status: count)")
    return {"latencies": latencies, "failed": failed}


def one_round(work: Path, policy: str, arrivals: list[tuple[float, str]], r: int) -> dict[str, Any]:
    router, router_url = start_router(work, f"{policy}-{r}")
    gateway, url = start_gateway(work, f"{policy}-{r}", router_url, policy)
    try:
        result = asyncio.run(play(url, arrivals))
        with urllib.request.urlopen(router_url + "/sim/stats") as resp:
            stats = orjson.loads(resp.read())
    finally:
        for proc in (gateway, router):
            proc.terminate()
            proc.wait(timeout=30)
    n = len(arrivals)
    lat = result["latencies"]
    swaps = max(0, stats["loads"] - 1)
    return {
        "policy": policy,
        "swaps_per_1000": 1000 * swaps / n,
        "swaps": swaps,
        "p50_s": percentile(lat, 0.50) if lat else None,
        "p95_s": percentile(lat, 0.95) if lat else None,
        "max_s": max(lat) if lat else None,
        "failed": result["failed"],
        "failed_by_eviction": stats["failed_by_eviction"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=12.0, help="arrivals per second")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    arrivals = trace(args.requests, args.rate, args.seed)
    naive_order = sum(1 for i in range(1, len(arrivals)) if arrivals[i][1] != arrivals[i - 1][1])
    rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    with tempfile.TemporaryDirectory(prefix="portcullis-swaps-") as tmp:
        work = Path(tmp)
        for r in range(args.runs):
            order = POLICIES if r % 2 == 0 else list(reversed(POLICIES))
            for policy in order:
                result = one_round(work, policy, arrivals, r)
                rounds[policy].append(result)
                log(
                    f"round {r + 1}/{args.runs} {policy:10s} swaps/1000 {result['swaps_per_1000']:6.1f}  "
                    f"p95 {result['p95_s']:.2f} s  failed {result['failed']}"
                )
    summary = {}
    for policy, results in rounds.items():
        summary[policy] = {
            key: statistics.median(r[key] for r in results if r[key] is not None)
            for key in ("swaps_per_1000", "p50_s", "p95_s", "max_s", "failed", "failed_by_eviction")
        }
    report(args, arrivals, naive_order, summary, rounds)


def report(
    args: argparse.Namespace,
    arrivals: list[tuple[float, str]],
    naive_order: int,
    summary: dict[str, dict[str, float]],
    rounds: dict[str, list[dict[str, Any]]],
) -> None:
    command = f".venv/bin/python bench/swaps.py --requests {args.requests} --rate {args.rate} --runs {args.runs}"
    lines = [
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). One arrival trace of {len(arrivals)} requests "
        f"(Poisson, {args.rate:g}/s, models 60/25/15 %), a router-mode simulator with --models-max 1 and "
        f"{LOAD_S} s per load; medians of {args.runs} interleaved rounds. In arrival order the model changes "
        f"{naive_order} times ({1000 * naive_order / len(arrivals):.0f} per 1,000 requests).",
        "",
        "| policy | swaps per 1,000 requests | p50 latency | p95 latency | slowest | failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for policy in POLICIES:
        s = summary[policy]
        lines.append(
            f"| {policy} | {s['swaps_per_1000']:.1f} | {s['p50_s']:.2f} s | {s['p95_s']:.2f} s | {s['max_s']:.2f} s "
            f"| {s['failed']:.0f} |"
        )
    lines += [
        "",
        f"swap_aware's bound: max_wait_s {MAX_WAIT_S} s (a switch begins by then for the oldest waiting request), "
        "plus one load. Latency is the client's, arrival to answer.",
    ]
    (HERE / "RESULTS-swaps.md").write_text("# Swap-aware scheduling\n\n" + "\n".join(lines) + "\n")
    (HERE / "results-swaps.json").write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=1))
    embed(HERE / "RESULTS.md", "swaps", "Many models on one GPU: swaps and latency by policy", lines)
    plt = pyplot(log)
    if plt is not None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        colours = ["#c0504d", "#9bbb59", "#4f81bd"]
        left.bar(POLICIES, [summary[p]["swaps_per_1000"] for p in POLICIES], color=colours)
        left.set_title("swaps per 1,000 requests")
        x = range(len(POLICIES))
        right.bar([i - 0.2 for i in x], [summary[p]["p50_s"] for p in POLICIES], width=0.4, label="p50", color="#999")
        right.bar([i + 0.2 for i in x], [summary[p]["p95_s"] for p in POLICIES], width=0.4, label="p95", color=colours)
        right.set_xticks(list(x), POLICIES)
        right.set_title("latency (s)")
        right.legend()
        fig.suptitle(f"{len(arrivals)} requests, 3 models, --models-max 1, {LOAD_S} s per load")
        fig.tight_layout()
        fig.savefig(HERE / "results-swaps.png", dpi=110)
    log("\n".join(lines))


if __name__ == "__main__":
    main()
