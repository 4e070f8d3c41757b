"""Placement verified by the cache: the prompt-cache hit rate of follow-up turns with learned placement
(`routing.affinity.learn`, each replica's retention of its prefixes learned from the answers' cache_n) against
today's (affinity that assumes a replica still holds every prefix it served).

    .venv/bin/python bench/placement.py             # the simulator, about 3 minutes

Fleet: two llama-server simulators unlike each other, as fleets are: one with 8 slots, one with 2 (a smaller
GPU); each keeps its slots' last prompts (llama-server's prompt cache; 0.4 ms per prompt token not found there).
Workload (bench/affinity.py's): conversations with their own long system prompt, several turns each, a few at once,
a trickle of one-off requests. The replica with 2 slots cannot keep as many conversations as the gateway's index
believes it holds: its promises break, and with `learn` it is given fewer new conversations.

Rounds alternate learned and today's placement (--runs); medians. Writes bench/RESULTS-placement.md,
results-placement.json and results-placement.png, and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from affinity import workload
from harness import embed, free_port, logger, pyplot, serve_gateway, wait_http

HERE = Path(__file__).resolve().parent
PY = sys.executable
SHAPE = {
    "conversations": 30,
    "turns": 4,
    "at_once": 8,
    "system_words": 1200,
    "max_tokens": 8,
    "think_s": 0.4,
}
SLOTS = [8, 2]
log = logger("placement")


def start_gateway(work: Path, name: str, urls: list[str], learn: bool) -> tuple[subprocess.Popen[bytes], str]:
    replicas = [{"url": u, "name": f"r{i}-{s}slots"} for i, (u, s) in enumerate(zip(urls, SLOTS, strict=True))]
    config = {
        "server": {"access_log": False},
        "store": {"database_url": f"sqlite+aiosqlite:///{work}/{name}.db", "auto_migrate": True},
        "auth": {"api_keys": False, "allow_anonymous": True},
        "tiers": {"free": {"priority": 0}},
        "cache": {"enabled": False},
        "routing": {"affinity": {"enabled": True, "learn": learn}},
        "models": {"m": {"deployments": replicas}},
    }
    return serve_gateway(work, name, config)


def start_sims(work: Path, tag: str) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, urls = [], []
    for i, slots in enumerate(SLOTS):
        port = free_port()
        args = ["--slots", str(slots), "--ttft-ms", "5", "--prompt-ms-per-token", "0.4", "--tokens-per-s", "200"]
        procs.append(
            subprocess.Popen(
                [PY, "-m", "portcullis", "sim", "--port", str(port), *args],
                stdout=(work / f"sim-{tag}-{i}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(url + "/health")
    return procs, urls


def promises(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("portcullis_affinity_retention{"):
            out["retention " + line.split('replica="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith("portcullis_affinity_promises_total{"):
            out[line.split('result="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pc-placement-") as tmp:
        work = Path(tmp)
        for run in range(args.runs):
            for learn in [True, False] if run % 2 == 0 else [False, True]:
                name = f"{'learned' if learn else 'today'}-{run}"
                sims, urls = start_sims(work, name)  # fresh caches for each round
                proc, url = start_gateway(work, name, urls, learn)
                try:
                    result = asyncio.run(workload(url, SHAPE, seed=1000 * run))
                    result.update(promises(url), learn=learn, run=run)
                finally:
                    for p in (proc, *sims):
                        p.terminate()
                        p.wait(10)
                log(
                    f"run {run + 1}/{args.runs} {'learned' if learn else 'today  '}: cached share "
                    f"{result['cached_share']:.1%}, follow-up TTFT p50 {result['follow_p50'] * 1000:.0f} ms, "
                    f"p95 {result['follow_p95'] * 1000:.0f} ms"
                )
                rows.append(result)
    (HERE / "results-placement.json").write_text(json.dumps({"rows": rows}, indent=1))
    report(rows, args)
    return 0


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def med(learn: bool, key: str) -> float:
        values = [r[key] for r in rows if r["learn"] == learn and r.get(key) is not None]
        return statistics.median(values) if values else 0.0

    lines = [
        "",
        f"Command: `.venv/bin/python bench/placement.py --runs {args.runs}` ({time.strftime('%Y-%m-%d')}, 2-core VM; "
        f"two simulated replicas with {SLOTS[0]} and {SLOTS[1]} slots; {SHAPE['conversations']} conversations of "
        f"{SHAPE['turns']} turns, {SHAPE['at_once']} at once; medians of {args.runs} alternating rounds, fresh caches "
        "each round).",
        "",
        "| placement | follow-up prompt tokens from the cache | follow-up TTFT p50 | p95 | promises kept / broken |",
        "|---|---:|---:|---:|---:|",
    ]
    for learn in (True, False):
        lines.append(
            f"| {'learned (`learn: true`)' if learn else 'today (`learn: false`)'} | {med(learn, 'cached_share'):.1%} "
            f"| {med(learn, 'follow_p50') * 1000:.0f} ms | {med(learn, 'follow_p95') * 1000:.0f} ms "
            f"| {med(learn, 'kept'):.0f} / {med(learn, 'broken'):.0f} |"
        )
    learned = [r for r in rows if r["learn"]]
    retention = {k: statistics.median(r[k] for r in learned if k in r) for k in learned[0] if k.startswith("retention")}
    if retention:
        lines += [
            "",
            "Learned retention at the end (median): " + ", ".join(f"{k[10:]} {v:.2f}" for k, v in retention.items()),
        ]
    lines += ["", "![placement](results-placement.png)", ""]
    (HERE / "RESULTS-placement.md").write_text("# Placement verified by the cache\n" + "\n".join(lines))
    embed(HERE / "RESULTS.md", "placement", "Placement verified by the cache (bench/placement.py)", lines)
    plt = pyplot(log)
    if plt is not None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
        names = ["learned", "today"]
        left.bar(names, [med(True, "cached_share") * 100, med(False, "cached_share") * 100], color=["#4f81bd", "#999"])
        left.set_ylabel("follow-up prompt tokens from the cache (%)")
        right.bar(
            [0, 1],
            [med(True, "follow_p50") * 1000, med(False, "follow_p50") * 1000],
            0.35,
            label="p50",
            color="#9bbb59",
        )
        right.bar(
            [0.35, 1.35],
            [med(True, "follow_p95") * 1000, med(False, "follow_p95") * 1000],
            0.35,
            label="p95",
            color="#c0504d",
        )
        right.set_xticks([0.17, 1.17], names)
        right.set_ylabel("follow-up TTFT (ms)")
        right.legend()
        fig.tight_layout()
        fig.savefig(HERE / "results-placement.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
