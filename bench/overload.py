"""Goodput under overload: the gateway's admission control against llama-server's silent queue, and the
admission defaults chosen from it.

    .venv/bin/python bench/overload.py            # 3 runs, about 9 minutes; writes bench/RESULTS-overload.md
    .venv/bin/python bench/overload.py --runs 1 --seconds 10   # a look

One simulator replica (4 slots, 50 ms to first token, 100 tokens/s, 20 tokens an answer: ~0.25 s a
request) stands in for llama-server: like it, it takes every request and queues beyond its slots
without bound. Its capacity is measured first (4 closed-loop clients, exactly its slots). Then
open-loop Poisson arrivals at 2x and 4x that capacity are sent for --seconds to each target in turn:
straight to the simulator, and through gateways that differ only in admission (`--admission`: the
shipped defaults, the defaults before issue 16, and one tuned to the deadline: max_wait_s = deadline -
1.5 x service time). Every client waits for its answer; a request counts as goodput for a deadline when
it completed with 200 within it and finished inside the measured window. Reported per deadline
(`--deadlines`): goodput in requests/s and as a share of capacity; latency of the answers that were
served (p50, p99) and refusals. Medians of --runs. Server processes are pinned: the gateways to CPU 0,
the simulator and this load generator to CPU 1.
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

from portcullis.config import AdmissionConfig

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


async def open_loop(url: str, rate: float, seconds: float, patience_s: float, seed: int) -> dict[str, Any]:
    """Poisson arrivals for `seconds`; each client waits at most `patience_s` after the window ends."""
    rng = random.Random(seed)
    answers: list[tuple[float, bool]] = []  # (latency, finished inside the measured window) of each 200
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with s.post(url + "/v1/chat/completions", data=BODY, headers=_HEADERS) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, OSError):
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                answers.append((time.perf_counter() - t0, time.monotonic() - begin <= seconds))

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
        _, pending = await asyncio.wait(tasks, timeout=patience_s + 1)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        statuses[-1] = len(pending)  # still waiting when the run ended
    latencies = sorted(latency for latency, _ in answers)
    return {
        "sent": len(tasks),
        "answers": answers,
        "served": len(latencies),
        "p50": statistics.median(latencies) if latencies else None,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def goodput(row: dict[str, Any], deadline_s: float, seconds: float) -> float:
    return sum(1 for latency, inside in row["answers"] if inside and latency <= deadline_s) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--deadline", type=float, default=2.0, help="the deadline the tuned gateway is set for")
    parser.add_argument("--deadlines", default="2,5,10", help="deadlines goodput is reported for")
    parser.add_argument("--factors", default="2,4")
    parser.add_argument(
        "--admission",
        default="defaults,before=256/30,tuned",
        help="gateways to compare: 'defaults' (the shipped admission), NAME=MAX_QUEUE/MAX_WAIT_S, 'tuned'",
    )
    parser.add_argument("--out", default=str(HERE / "RESULTS-overload.md"))
    parser.add_argument("--from-json", default=None, help="re-render the report from a results-overload.json")
    args = parser.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    deadlines = [float(d) for d in args.deadlines.split(",")]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        args.runs = 1 + max(r["run"] for r in saved["rows"])
        report(saved["rows"], saved["capacity"], saved["settings"], args, factors, deadlines)
        return 0
    work = Path(tempfile.mkdtemp(prefix="pc-overload-"))
    sim_port = free_port()
    sim = start_portcullis(["sim", "--port", str(sim_port), *SIM_ARGS], 1, work / "sim.log")
    sim_url = f"http://127.0.0.1:{sim_port}"
    wait_http(sim_url + "/health")
    procs = [sim]
    try:
        capacity = asyncio.run(closed_loop(sim_url, 4, 8))
        service_s = 4 / capacity
        log(f"capacity {capacity:.1f} requests/s (service time {service_s * 1000:.0f} ms with 4 slots)")
        defaults = AdmissionConfig()
        settings: dict[str, dict[str, Any]] = {}
        for spec in args.admission.split(","):
            if spec == "defaults":
                settings["defaults"] = {"max_queue": defaults.max_queue, "max_wait_s": defaults.max_wait_s}
            elif spec == "tuned":
                settings["tuned"] = {"max_queue": 256, "max_wait_s": round(args.deadline - 1.5 * service_s, 2)}
            else:
                name, _, values = spec.partition("=")
                queue, _, wait = values.partition("/")
                settings[name] = {"max_queue": int(queue), "max_wait_s": float(wait)}
        targets = [("direct", sim_url)]
        for name, admission in settings.items():
            port = free_port()
            config = {
                "server": {"access_log": False, "drain_grace_s": 0.1},
                "store": {"database_url": f"sqlite+aiosqlite:///{work}/{name}.db", "auto_migrate": True},
                "auth": {"api_keys": False, "allow_anonymous": True},
                # No rate limits: this measures capacity, not quotas.
                "tiers": {"free": {"priority": 0}, "premium": {"priority": 1}, "enterprise": {"priority": 2}},
                "admission": {"when_full": "queue", **admission},
                "cache": {"enabled": False},  # every request is the same deterministic one: no cache hits
                "models": {"m": {"deployments": [{"url": sim_url}]}},
            }
            (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
            args_ = ["serve", "--config", str(work / f"{name}.yaml"), "--port", str(port)]
            procs.append(start_portcullis(args_, 0, work / f"{name}.log"))
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/readyz")
            targets.append((name, url))
        patience = max(deadlines)
        rows: list[dict[str, Any]] = []
        total = args.runs * len(factors) * len(targets)
        n = 0
        for run in range(args.runs):
            for factor in factors:
                # Rotate which target goes first, so drift in the machine's speed does not favour one.
                order = targets[run % len(targets) :] + targets[: run % len(targets)]
                for target, url in order:
                    n += 1
                    log(f"[{n}/{total}] run {run + 1}, {factor:g}x capacity, {target}")
                    result = asyncio.run(open_loop(url, factor * capacity, args.seconds, patience, seed=run))
                    result.update(target=target, factor=factor, run=run)
                    rows.append(result)
                    log(
                        f"    goodput within {args.deadline:g} s {goodput(result, args.deadline, args.seconds):.1f}/s, "
                        f"p50 {result['p50'] or 0:.2f} s, p99 {result['p99'] or 0:.2f} s, statuses {result['statuses']}"
                    )
                    time.sleep(2)  # let the silent queue drain before the next case
        report(rows, capacity, settings, args, factors, deadlines)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return 0


def report(
    rows: list[dict[str, Any]],
    capacity: float,
    settings: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    factors: list[float],
    deadlines: list[float],
) -> None:
    out = Path(args.out)
    described = "; ".join(
        f"{name}: max_queue {s['max_queue']}, max_wait_s {s['max_wait_s']:g}" for name, s in settings.items()
    )
    lines = [
        "# Goodput under overload",
        "",
        f"Command: `.venv/bin/python bench/overload.py --runs {args.runs} --seconds {args.seconds:g} "
        f"--deadlines {','.join(f'{d:g}' for d in deadlines)}` ({time.strftime('%Y-%m-%d')}, 2-core VM; medians "
        f"of {args.runs} runs).",
        "",
        f"One simulator replica with llama-server's silent queue: 4 slots, measured capacity "
        f"**{capacity:.1f} requests/s** ({4 / capacity:.2f} s a request). Open-loop Poisson arrivals for "
        f"{args.seconds:g} s; goodput within D = answers completed within D seconds, per second, as a share of "
        f"capacity. Gateways ({described}) queue up to that and answer the rest 503 with Retry-After at once.",
        "",
        "| offered | target | "
        + " | ".join(f"goodput within {d:g} s" for d in deadlines)
        + " | served p50 | served p99 | refused (503) |",
        "|---|---|" + "---|" * len(deadlines) + "---|---|---|",
    ]
    targets = ["direct", *settings]
    summary: dict[tuple[float, str], dict[str, float]] = {}
    for factor in factors:
        for target in targets:
            mine = [r for r in rows if r["factor"] == factor and r["target"] == target]
            if not mine:
                continue
            med = {f"good{d:g}": statistics.median(goodput(r, d, args.seconds) for r in mine) for d in deadlines}
            med.update(
                p50=statistics.median(r["p50"] or 0 for r in mine),
                p99=statistics.median(r["p99"] or 0 for r in mine),
                refused=statistics.median(r["statuses"].get("503", 0) for r in mine),
            )
            summary[(factor, target)] = med
            cells = " | ".join(f"{med[f'good{d:g}'] / capacity:.0%}" for d in deadlines)
            lines.append(
                f"| {factor:g}x | {target} | {cells} | {med['p50']:.2f} s | {med['p99']:.2f} s | {med['refused']:.0f} |"
            )
    lines += [
        "",
        "Straight to the simulator every request is accepted and waits in its queue: latency grows for as long "
        "as the overload lasts and almost nothing finishes within any deadline (congestion collapse). A gateway "
        "keeps the slots busy with requests that can still make their client's deadline when its `max_wait_s` "
        "is below that deadline (less one service time); a long `max_wait_s` keeps a deep queue whose every "
        "request waits about that long, and little is served within a client's patience.",
        "",
        "![goodput](results-overload.png)",
        "",
    ]
    out.write_text("\n".join(lines))
    embed(
        HERE / "RESULTS.md", "overload", "Overload: goodput and the admission defaults (bench/overload.py)", lines[1:]
    )
    (HERE / "results-overload.json").write_text(
        json.dumps({"capacity": capacity, "settings": settings, "rows": rows}, indent=1)
    )
    plot(summary, capacity, factors, targets, deadlines)
    log(f"wrote {out}")


def plot(
    summary: dict[tuple[float, str], dict[str, float]],
    capacity: float,
    factors: list[float],
    targets: list[str],
    deadlines: list[float],
) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(factors), figsize=(5 * len(factors), 4), squeeze=False)
    width = 0.8 / len(targets)
    xs = range(len(deadlines))
    for ax, factor in zip(axes[0], factors, strict=True):
        for i, target in enumerate(targets):
            med = summary.get((factor, target))
            if med is None:
                continue
            ax.bar(
                [x + (i - (len(targets) - 1) / 2) * width for x in xs],
                [100 * med[f"good{d:g}"] / capacity for d in deadlines],
                width,
                label=target,
            )
        ax.axhline(100, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(list(xs), [f"within {d:g} s" for d in deadlines])
        ax.set_ylabel("goodput, % of capacity")
        ax.set_title(f"{factor:g}x overload")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "results-overload.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
