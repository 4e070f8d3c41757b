"""What input moderation adds to a request's latency: a guard model judged before the upstream call
(`sequential`) or beside it (`parallel`), against no moderation and against local rules only.

    .venv/bin/python bench/moderation.py                 # 3 rounds, about 5 minutes
    .venv/bin/python bench/moderation.py --runs 1 --requests 20

Two simulators: the upstream (100 ms to first token, 200 tokens/s, 16-token streamed answers) and a guard
model (answers 'safe' after a first-token delay set per case: 30 ms, faster than the upstream's first
token, and 250 ms, slower). One gateway serves the same upstream as four models that differ only in their
moderation policy: none, rules (PII detectors and a keyword list), the guard sequential, the guard
parallel. One client sends streamed requests one at a time, the models in rotation (so the machine's
drift hits all alike), and measures the time to the first content chunk and to the end. Reported:
medians over the rounds of each case's p50/p95, and what each policy adds to the p50 of no moderation.
Also the local rules' own cost per prompt, timed in-process. Writes bench/RESULTS-moderation.md,
results-moderation.json, results-moderation.png and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from harness import embed, free_port, logger, percentile, pyplot, start_portcullis, wait_http

HERE = Path(__file__).resolve().parent
PY = sys.executable
POLICIES = ("none", "rules", "sequential", "parallel")
GUARD_MS = (30, 250)
UPSTREAM_TTFT_MS = 100
PROMPT = (
    "I am planning a small garden behind the house and would like advice on which vegetables grow well "
    "together, how often to water them in a dry summer, and whether raised beds are worth the effort. "
)
log = logger("moderation")


def control(url: str, **changes: Any) -> None:
    req = urllib.request.Request(url + "/sim/control", data=orjson.dumps(changes), method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


async def one(session: aiohttp.ClientSession, url: str, model: str) -> tuple[float, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
        "temperature": 0.7,
        "stream": True,
    }
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if ttft is None and line.startswith(b"data: {") and b'"content":"' in line:
                ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return ttft if ttft is not None else total, total


async def measure(url: str, requests: int) -> dict[str, dict[str, list[float]]]:
    """Requests to every policy's model in rotation: {policy: {"ttft": [...], "total": [...]}}."""
    out: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "total": []} for p in POLICIES}
    async with aiohttp.ClientSession() as session:
        for policy in POLICIES:  # warm connections and the guard path
            await one(session, url, policy)
        for i in range(requests):
            for policy in POLICIES[i % len(POLICIES) :] + POLICIES[: i % len(POLICIES)]:
                ttft, total = await one(session, url, policy)
                out[policy]["ttft"].append(ttft)
                out[policy]["total"].append(total)
    return out


def rules_cost_us() -> float:
    """The local rules of the `rules` policy on this bench's prompt, per prompt, in-process."""
    from portcullis.config import RulesConfig
    from portcullis.safety.rules import Rules

    rules = Rules("pii", RulesConfig.model_validate(RULES))
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        rules.scan(PROMPT)
    return (time.perf_counter() - t0) / n * 1e6


RULES = {
    "kind": "rules",
    "pii": {"email": "redact", "phone": "redact", "card": "block", "iban": "redact", "national_id": "flag"},
    "keywords": [{"name": "secret", "words": ["project nightshade", "blue moon"]}],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="per policy, guard speed and round")
    parser.add_argument("--out", default=str(HERE / "RESULTS-moderation.md"))
    parser.add_argument("--from-json", default=None)
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved["rows"], saved["rules_us"], args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="pc-moderation-"))
    up_port, guard_port, gw_port = free_port(), free_port(), free_port()
    up_url, guard_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{guard_port}"
    gw_url = f"http://127.0.0.1:{gw_port}"
    sim_args = ["--slots", "8", "--ttft-ms", str(UPSTREAM_TTFT_MS), "--tokens-per-s", "200"]
    procs = [
        start_portcullis(["sim", "--port", str(up_port), *sim_args], 1, work / "upstream.log"),
        start_portcullis(["sim", "--port", str(guard_port), "--slots", "8"], 1, work / "guard.log"),
    ]
    try:
        wait_http(up_url + "/health")
        wait_http(guard_url + "/health")
        models: dict[str, Any] = {p: {"deployments": [{"url": up_url}]} for p in POLICIES}
        models["guard"] = {"deployments": [{"url": guard_url}]}
        models["rules"]["moderation"] = {"input": ["pii"]}
        models["sequential"]["moderation"] = {"input": ["guard"], "mode": "sequential"}
        models["parallel"]["moderation"] = {"input": ["guard"], "mode": "parallel"}
        config = {
            "server": {"access_log": False, "drain_grace_s": 0.1},
            "store": {"database_url": f"sqlite+aiosqlite:///{work}/gw.db", "auto_migrate": True},
            "auth": {"api_keys": False, "allow_anonymous": True},
            "tiers": {"free": {"priority": 0}},  # no limits: the bench sends hundreds of requests a minute
            "cache": {"enabled": False},
            "models": models,
            "moderation": {
                "moderators": {"pii": RULES, "guard": {"kind": "guard_model", "model": "guard", "timeout_s": 5}},
            },
        }
        (work / "gw.yaml").write_text(yaml.safe_dump(config))
        procs.append(
            start_portcullis(["serve", "--config", str(work / "gw.yaml"), "--port", str(gw_port)], 0, work / "gw.log")
        )
        wait_http(gw_url + "/readyz")
        rows: list[dict[str, Any]] = []
        step = 0
        for run in range(args.runs):
            for guard_ms in GUARD_MS if run % 2 == 0 else GUARD_MS[::-1]:
                step += 1
                log(f"[{step}/{args.runs * len(GUARD_MS)}] run {run + 1}: guard answers in {guard_ms} ms")
                control(guard_url, ttft_ms=guard_ms)
                samples = asyncio.run(measure(gw_url, args.requests))
                for policy, got in samples.items():
                    row = {"run": run, "guard_ms": guard_ms, "policy": policy}
                    for kind, values in got.items():
                        row[f"{kind}_p50"] = percentile(values, 0.5)
                        row[f"{kind}_p95"] = percentile(values, 0.95)
                    rows.append(row)
                    p50, p95 = row["ttft_p50"] * 1000, row["ttft_p95"] * 1000
                    log(f"    {policy:<10} TTFT p50 {p50:6.1f} ms  p95 {p95:6.1f} ms")
        rules_us = rules_cost_us()
        (HERE / "results-moderation.json").write_text(json.dumps({"rules_us": rules_us, "rows": rows}, indent=1))
        report(rows, rules_us, args)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return 0


def report(rows: list[dict[str, Any]], rules_us: float, args: argparse.Namespace) -> None:
    runs = 1 + max(r["run"] for r in rows)
    med: dict[tuple[int, str], dict[str, float]] = {}
    for guard_ms in GUARD_MS:
        for policy in POLICIES:
            group = [r for r in rows if r["guard_ms"] == guard_ms and r["policy"] == policy]
            med[guard_ms, policy] = {
                k: statistics.median(r[k] for r in group) for k in ("ttft_p50", "ttft_p95", "total_p50")
            }
    lines = [
        "",
        f"Command: `.venv/bin/python bench/moderation.py --runs {runs} --requests {args.requests}` "
        f"({time.strftime('%Y-%m-%d')}, 2-core VM; medians of {runs} rounds).",
        "",
        f"Upstream simulator: {UPSTREAM_TTFT_MS} ms to first token, 200 tokens/s, 16-token streamed answers. Guard "
        "model: a simulator answering 'safe' after the delay in the first column. One client, one request at a "
        "time, the four policies in rotation. *Added* is the policy's TTFT p50 minus that of no moderation.",
        "",
        "| guard answers in | policy | TTFT p50 | TTFT p95 | total p50 | added to TTFT p50 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for guard_ms in GUARD_MS:
        base = med[guard_ms, "none"]["ttft_p50"]
        for policy in POLICIES:
            m = med[guard_ms, policy]
            lines.append(
                f"| {guard_ms} ms | {policy} | {m['ttft_p50'] * 1000:.1f} ms | {m['ttft_p95'] * 1000:.1f} ms | "
                f"{m['total_p50'] * 1000:.1f} ms | {(m['ttft_p50'] - base) * 1000:+.1f} ms |"
            )
    fast, slow = GUARD_MS
    seq_fast = (med[fast, "sequential"]["ttft_p50"] - med[fast, "none"]["ttft_p50"]) * 1000
    par_fast = (med[fast, "parallel"]["ttft_p50"] - med[fast, "none"]["ttft_p50"]) * 1000
    seq_slow = (med[slow, "sequential"]["ttft_p50"] - med[slow, "none"]["ttft_p50"]) * 1000
    par_slow = (med[slow, "parallel"]["ttft_p50"] - med[slow, "none"]["ttft_p50"]) * 1000
    lines += [
        "",
        f"- a guard faster than the upstream's first token ({fast} ms): sequential adds **{seq_fast:.0f} ms**, "
        f"parallel **{par_fast:.0f} ms** (hidden behind the upstream's own {UPSTREAM_TTFT_MS} ms)",
        f"- a slower guard ({slow} ms): sequential adds **{seq_slow:.0f} ms**, parallel **{par_slow:.0f} ms** "
        f"(only what the guard takes beyond the upstream's first token)",
        f"- local rules (5 PII detectors, a keyword list) cost **{rules_us:.0f} µs** per {len(PROMPT)}-character "
        "prompt, timed in-process",
        "",
        "![moderation latency](results-moderation.png)",
        "",
    ]
    Path(args.out).write_text("# Input moderation latency\n" + "\n".join(lines))
    embed(HERE / "RESULTS.md", "moderation", "Input moderation latency (bench/moderation.py)", lines)
    plot(med)
    log(f"wrote {args.out}")


def plot(med: dict[tuple[int, str], dict[str, float]]) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    for i, policy in enumerate(POLICIES):
        xs = [g + (i - 1.5) * width for g in range(len(GUARD_MS))]
        ax.bar(xs, [med[g, policy]["ttft_p50"] * 1000 for g in GUARD_MS], width, label=policy)
    ax.axhline(UPSTREAM_TTFT_MS, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(GUARD_MS)), [f"guard answers in {g} ms" for g in GUARD_MS])
    ax.set_ylabel("time to first token, p50 (ms)")
    ax.set_title(f"input moderation (upstream first token {UPSTREAM_TTFT_MS} ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "results-moderation.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
