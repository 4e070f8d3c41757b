"""Goodput under overload: the gateway's admission control against llama-server's silent queue.

    .venv/bin/python bench/overload.py            # 3 runs, about 4 minutes; writes bench/RESULTS-overload.md
    .venv/bin/python bench/overload.py --runs 1 --seconds 10   # a look

One simulator replica (4 slots, 50 ms to first token, 100 tokens/s, 20 tokens an answer: ~0.25 s a
request) stands in for llama-server: like it, it takes every request and queues beyond its slots
without bound. Its capacity is measured first (4 closed-loop clients, exactly its slots). Then
open-loop Poisson arrivals at 2x and 4x that capacity are sent for --seconds, once straight to the
simulator and once through the gateway (admission: queue, max_wait_s = deadline - 1.5 x service time). Every
client waits for its answer; a request counts as goodput when it completed with 200 within the
deadline (default 2 s, an interactive client's patience) and finished inside the measured window.
Reported: goodput in requests/s and as a
share of capacity, latency of the answers that were served (p50, p99), refusals. Medians of --runs.
Server processes are pinned: the gateway to CPU 0, the simulator and this load generator to CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from harness import embed, free_port, logger, pyplot, start_portcullis, wait_http

HERE = Path(__file__).resolve().parent
PY = sys.executable
SIM_ARGS = ["--slots", "4", "--ttft-ms", "50", "--tokens-per-s", "100", "--default-max-tokens", "64"]
BODY = orjson.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 20, "temperature": 0}
)


log = logger("overload")


async def closed_loop(url: str, clients: int, seconds: float) -> float:
    """Completed requests per second with exactly `clients` always in flight."""
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with s.post(url + "/v1/chat/completions", data=BODY, headers=_HEADERS) as r:
                    await r.read()
                    done += r.status == 200

        start_t = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.monotonic() - start_t)


_HEADERS = {"content-type": "application/json"}


async def open_loop(url: str, rate: float, seconds: float, deadline_s: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    latencies: list[float] = []
    good = 0  # answered 200 within the deadline, and finished inside the measured window
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            nonlocal good
            t0 = time.perf_counter()
            try:
                async with s.post(url + "/v1/chat/completions", data=BODY, headers=_HEADERS) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, OSError):
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latency = time.perf_counter() - t0
                latencies.append(latency)
                if latency <= deadline_s and time.monotonic() - begin <= seconds:
                    good += 1

        tasks = []
        begin = time.monotonic()  # goodput counts answers finished between here and begin + seconds
        t = 0.0
        while t < seconds:
            t += rng.expovariate(rate)
            delay = begin + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        # Answers later than this can no longer count: stop waiting for the silent queue to drain.
        _, pending = await asyncio.wait(tasks, timeout=deadline_s + 1)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        statuses[-1] = len(pending)  # still waiting when the run ended
    latencies.sort()
    return {
        "sent": len(tasks),
        "goodput": good / seconds,
        "served": len(latencies),
        "p50": statistics.median(latencies) if latencies else None,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--deadline", type=float, default=2.0)
    parser.add_argument("--factors", default="2,4")
    parser.add_argument("--out", default=str(HERE / "RESULTS-overload.md"))
    parser.add_argument("--from-json", default=None, help="re-render the report from a results-overload.json")
    args = parser.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        args.runs = 1 + max(r["run"] for r in saved["rows"])
        report(saved["rows"], saved["capacity"], args, factors)
        return 0
    work = Path(tempfile.mkdtemp(prefix="pc-overload-"))
    sim_port, gw_port = free_port(), free_port()
    sim = start_portcullis(["sim", "--port", str(sim_port), *SIM_ARGS], 1, work / "sim.log")
    sim_url = f"http://127.0.0.1:{sim_port}"
    wait_http(sim_url + "/health")
    procs = [sim]
    try:
        capacity = asyncio.run(closed_loop(sim_url, 4, 8))
        service_s = 4 / capacity
        log(f"capacity {capacity:.1f} requests/s (service time {service_s * 1000:.0f} ms with 4 slots)")
        config = {
            "server": {"access_log": False, "drain_grace_s": 0.1},
            "store": {"database_url": f"sqlite+aiosqlite:///{work}/gw.db", "auto_migrate": True},
            "auth": {"api_keys": False, "allow_anonymous": True},
            # No rate limits: this measures capacity, not quotas.
            "tiers": {"free": {"priority": 0}, "premium": {"priority": 1}, "enterprise": {"priority": 2}},
            "admission": {
                "when_full": "queue",
                "max_queue": 256,
                "max_wait_s": round(args.deadline - 1.5 * service_s, 2),
            },
            "models": {"m": {"deployments": [{"url": sim_url}]}},
        }
        (work / "gw.yaml").write_text(yaml.safe_dump(config))
        gw = start_portcullis(["serve", "--config", str(work / "gw.yaml"), "--port", str(gw_port)], 0, work / "gw.log")
        procs.append(gw)
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_http(gw_url + "/readyz")
        rows: list[dict[str, Any]] = []
        total = args.runs * len(factors) * 2
        n = 0
        for run in range(args.runs):
            for factor in factors:
                # Alternate which target goes first, so drift in the machine's speed does not favour one.
                order = [("direct", sim_url), ("gateway", gw_url)]
                if run % 2:
                    order.reverse()
                for target, url in order:
                    n += 1
                    log(f"[{n}/{total}] run {run + 1}, {factor:g}x capacity, {target}")
                    result = asyncio.run(open_loop(url, factor * capacity, args.seconds, args.deadline, seed=run))
                    result.update(target=target, factor=factor, run=run)
                    rows.append(result)
                    log(
                        f"    goodput {result['goodput']:.1f}/s ({result['goodput'] / capacity:.0%} of capacity), "
                        f"p99 {result['p99'] or 0:.2f} s, statuses {result['statuses']}"
                    )
                    time.sleep(2)  # let the silent queue drain before the next case
        report(rows, capacity, args, factors)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return 0


def report(rows: list[dict[str, Any]], capacity: float, args: argparse.Namespace, factors: list[float]) -> None:
    out = Path(args.out)
    lines = [
        "# Goodput under overload",
        "",
        f"Command: `.venv/bin/python bench/overload.py --runs {args.runs} --seconds {args.seconds:g} "
        f"--deadline {args.deadline:g}` ({time.strftime('%Y-%m-%d')}, 2-core VM; medians of {args.runs} runs).",
        "",
        f"One simulator replica with llama-server's silent queue: 4 slots, measured capacity "
        f"**{capacity:.1f} requests/s**. Open-loop Poisson arrivals for {args.seconds:g} s; goodput = answers "
        f"completed within {args.deadline:g} s, per second. The gateway queues with "
        f"`max_wait_s` = deadline - 1.5 x service time and answers the rest 503 with Retry-After at once.",
        "",
        "| offered | target | goodput (req/s) | share of capacity | served p50 | served p99 | refused (503) |",
        "|---|---|---|---|---|---|---|",
    ]
    summary: dict[tuple[float, str], dict[str, float]] = {}
    for factor in factors:
        for target in ("direct", "gateway"):
            mine = [r for r in rows if r["factor"] == factor and r["target"] == target]
            med = {
                "goodput": statistics.median(r["goodput"] for r in mine),
                "p50": statistics.median(r["p50"] or 0 for r in mine),
                "p99": statistics.median(r["p99"] or 0 for r in mine),
                "refused": statistics.median(r["statuses"].get("503", 0) for r in mine),
            }
            summary[(factor, target)] = med
            lines.append(
                f"| {factor:g}x | {target} | {med['goodput']:.1f} | **{med['goodput'] / capacity:.0%}** | "
                f"{med['p50']:.2f} s | {med['p99']:.2f} s | {med['refused']:.0f} |"
            )
    lines += [
        "",
        "Straight to the simulator every request is accepted and waits in its queue: latency grows for as long "
        "as the overload lasts and almost nothing finishes within the deadline (congestion collapse). Through "
        "the gateway the slots stay busy with requests that can still make their deadline; the rest are told "
        "at once when to come back.",
        "",
        "![goodput](results-overload.png)",
        "",
    ]
    out.write_text("\n".join(lines))
    embed(HERE / "RESULTS.md", "overload", "Overload: goodput (bench/overload.py)", lines[1:])
    (HERE / "results-overload.json").write_text(json.dumps({"capacity": capacity, "rows": rows}, indent=1))
    plot(summary, capacity, factors)
    log(f"wrote {out}")


def plot(summary: dict[tuple[float, str], dict[str, float]], capacity: float, factors: list[float]) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.35
    xs = range(len(factors))
    for i, target in enumerate(("direct", "gateway")):
        ax1.bar(
            [x + (i - 0.5) * width for x in xs],
            [summary[(f, target)]["goodput"] for f in factors],
            width,
            label=target,
        )
        ax2.bar(
            [x + (i - 0.5) * width for x in xs], [summary[(f, target)]["p99"] for f in factors], width, label=target
        )
    ax1.axhline(capacity, color="grey", linestyle="--", label="capacity")
    ax1.axhline(0.9 * capacity, color="grey", linestyle=":", label="90% of capacity")
    for ax, title in ((ax1, "goodput (answers within the deadline / s)"), (ax2, "p99 latency of answers (s)")):
        ax.set_xticks(list(xs), [f"{f:g}x overload" for f in factors])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "results-overload.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
