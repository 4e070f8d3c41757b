"""Batch backfill: how much batch work runs in the idle capacity, and what it costs interactive traffic.

    .venv/bin/python bench/batch.py              # 3 rounds, about 4 minutes
    .venv/bin/python bench/batch.py --runs 1 --seconds 15

One simulator replica (4 slots, 100 ms to first token, 100 tokens/s, 20-token answers: ~0.3 s a request).
Its capacity is measured first (4 closed-loop clients). Then interactive traffic, open-loop Poisson
arrivals at --load of that capacity, streamed, is sent for --seconds through the gateway twice per
round, alone and while a large batch (more lines than the window can finish) runs on the same model, in
alternating order. The client measures each request's time to first token. Reported: interactive TTFT
p50/p95/p99 with and without the batch, the batch lines finished in the window (the backfill) and as a
share of the capacity the interactive traffic left idle, and the preemptions. The batch runs with the
defaults (`reserve_slots` 1, preempted when an interactive request would wait). Writes
bench/RESULTS-batch.md, results-batch.json, results-batch.png and a section of bench/RESULTS.md.
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
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from harness import embed, free_port, logger, percentile, pyplot, start_portcullis, wait_http

HERE = Path(__file__).resolve().parent
PY = sys.executable
SIM_ARGS = ["--slots", "4", "--ttft-ms", "100", "--tokens-per-s", "100", "--default-max-tokens", "64"]
BODY = {"model": "m", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 20, "temperature": 0.7}
log = logger("batch")


async def capacity(url: str, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:

        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with s.post(url + "/v1/chat/completions", data=orjson.dumps(BODY)) as r:
                    await r.read()
                    done += r.status == 200

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(4)))
        return done / (time.monotonic() - t0)


async def interactive(url: str, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ttfts: list[float] = []
    statuses: dict[int, int] = {}
    body = orjson.dumps({**BODY, "stream": True})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            t0 = time.perf_counter()
            first = None
            async with s.post(url + "/v1/chat/completions", data=body) as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                async for raw in r.content:
                    if first is None and raw.startswith(b"data: {") and b'"content":"' in raw:
                        first = time.perf_counter() - t0
            if r.status == 200 and first is not None:
                ttfts.append(first)

        tasks = []
        begin = time.monotonic()
        t = 0.0
        while t < seconds:
            t += rng.expovariate(rate)
            delay = begin + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return {
        "sent": len(tasks),
        "p50": statistics.median(ttfts),
        "p95": percentile(ttfts, 0.95),
        "p99": percentile(ttfts, 0.99),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def _call(url: str, method: str, path: str, body: Any = None, form: bytes | None = None) -> Any:
    headers = {"content-type": "application/json"}
    data = orjson.dumps(body) if body is not None else None
    if form is not None:
        boundary = "benchboundary"
        headers["content-type"] = f"multipart/form-data; boundary={boundary}"
        data = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"\r\n'
                "Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            + form
            + f"\r\n--{boundary}--\r\n".encode()
        )
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as resp:
        return orjson.loads(resp.read())


def submit_batch(url: str, lines: int) -> str:
    content = b"".join(
        orjson.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": BODY}) + b"\n"
        for i in range(lines)
    )
    file = _call(url, "POST", "/v1/files", form=content)
    batch = _call(
        url,
        "POST",
        "/v1/batches",
        {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    return str(batch["id"])


def batch_done(url: str, batch_id: str) -> int:
    return int(_call(url, "GET", f"/v1/batches/{batch_id}")["request_counts"]["completed"])


def preempted(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("portcullis_background_preempted_total"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--load", type=float, default=0.5, help="interactive arrivals as a share of capacity")
    parser.add_argument("--out", default=str(HERE / "RESULTS-batch.md"))
    parser.add_argument("--from-json", default=None)
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved["rows"], saved["capacity"], args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="pc-batch-"))
    sim_port, gw_port = free_port(), free_port()
    sim_url, gw_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
    procs = [start_portcullis(["sim", "--port", str(sim_port), *SIM_ARGS], 1, work / "sim.log")]
    try:
        wait_http(sim_url + "/health")
        cap = asyncio.run(capacity(sim_url, 8))
        log(f"capacity {cap:.1f} requests/s")
        config = {
            "server": {"access_log": False, "drain_grace_s": 0.1},
            "store": {"database_url": f"sqlite+aiosqlite:///{work}/gw.db", "auto_migrate": True},
            "auth": {"api_keys": False, "allow_anonymous": True},
            "tiers": {"free": {"priority": 0}},
            "cache": {"enabled": False},
            "batch": {"poll_s": 0.2},
            "models": {"m": {"deployments": [{"url": sim_url}]}},
        }
        (work / "gw.yaml").write_text(yaml.safe_dump(config))
        procs.append(
            start_portcullis(["serve", "--config", str(work / "gw.yaml"), "--port", str(gw_port)], 0, work / "gw.log")
        )
        wait_http(gw_url + "/readyz")
        rows: list[dict[str, Any]] = []
        total = args.runs * 2
        for run in range(args.runs):
            order = [False, True] if run % 2 == 0 else [True, False]
            for with_batch in order:
                log(
                    f"[{len(rows) + 1}/{total}] run {run + 1}: interactive at {args.load:.0%} of capacity, "
                    f"{'with' if with_batch else 'without'} a batch"
                )
                batch_id = None
                before_preempted = preempted(gw_url)
                if with_batch:
                    # More lines than the idle capacity can finish in the window: the backfill never runs dry.
                    batch_id = submit_batch(gw_url, int(cap * args.seconds * 1.5) + 100)
                    time.sleep(1.0)  # the runner has found the batch and fills the idle slots
                    done_before = batch_done(gw_url, batch_id)
                result = asyncio.run(interactive(gw_url, args.load * cap, args.seconds, seed=run))
                result.update(run=run, with_batch=with_batch)
                if batch_id is not None:
                    result["batch_lines"] = batch_done(gw_url, batch_id) - done_before
                    _call(gw_url, "POST", f"/v1/batches/{batch_id}/cancel")
                    time.sleep(2.0)  # its lines stop before the next case
                result["preempted"] = preempted(gw_url) - before_preempted
                rows.append(result)
                extra = (
                    f", batch lines {result['batch_lines']} ({result['batch_lines'] / args.seconds:.1f}/s), "
                    f"preempted {result['preempted']:.0f}"
                    if with_batch
                    else ""
                )
                log(f"    TTFT p50 {result['p50'] * 1000:.0f} ms, p95 {result['p95'] * 1000:.0f} ms{extra}")
        (HERE / "results-batch.json").write_text(json.dumps({"capacity": cap, "rows": rows}, indent=1))
        report(rows, cap, args)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return 0


def report(rows: list[dict[str, Any]], cap: float, args: argparse.Namespace) -> None:
    runs = 1 + max(r["run"] for r in rows)
    alone = [r for r in rows if not r["with_batch"]]
    mixed = [r for r in rows if r["with_batch"]]
    med = {
        name: {k: statistics.median(r[k] for r in group) for k in ("p50", "p95", "p99")}
        for name, group in (("alone", alone), ("with batch", mixed))
    }
    lines_per_s = statistics.median(r["batch_lines"] for r in mixed) / args.seconds
    idle = cap * (1 - args.load)
    ratio = med["with batch"]["p95"] / med["alone"]["p95"]
    lines = [
        "",
        f"Command: `.venv/bin/python bench/batch.py --runs {runs} --seconds {args.seconds:g} --load {args.load:g}` "
        f"({time.strftime('%Y-%m-%d')}, 2-core VM; medians of {runs} rounds, the two cases alternating).",
        "",
        f"One simulator replica, 4 slots, capacity **{cap:.1f} requests/s**; interactive streams arrive at "
        f"{args.load:.0%} of it (Poisson) for {args.seconds:g} s; the batch has more lines than the window can finish.",
        "",
        "| interactive traffic | TTFT p50 | TTFT p95 | TTFT p99 |",
        "|---|---:|---:|---:|",
    ]
    for name in ("alone", "with batch"):
        m = med[name]
        lines.append(f"| {name} | {m['p50'] * 1000:.0f} ms | {m['p95'] * 1000:.0f} ms | {m['p99'] * 1000:.0f} ms |")
    lines += [
        "",
        f"- interactive p95 time to first token with the batch running: **{ratio:.0%}** of the same load without it "
        f"(target: within 110%)",
        f"- backfill: **{lines_per_s:.1f} batch lines/s** ran in the capacity the interactive traffic left idle "
        f"(~{idle:.1f} requests/s): {lines_per_s / idle:.0%} of it, with `reserve_slots` 1 of 4 kept free",
        f"- preemptions (a batch line giving its slot to an interactive request, run again later): median "
        f"{statistics.median(r['preempted'] for r in mixed):.0f} per run",
        "",
        "![batch backfill](results-batch.png)",
        "",
    ]
    Path(args.out).write_text("# Batch backfill\n" + "\n".join(lines))
    embed(HERE / "RESULTS.md", "batch", "Batch backfill (bench/batch.py)", lines)
    plot(med, lines_per_s, idle)
    log(f"wrote {args.out}")


def plot(med: dict[str, dict[str, float]], lines_per_s: float, idle: float) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    keys = ["p50", "p95", "p99"]
    xs = range(len(keys))
    for i, name in enumerate(("alone", "with batch")):
        ax1.bar([x + (i - 0.5) * 0.35 for x in xs], [med[name][k] * 1000 for k in keys], 0.35, label=name)
    ax1.set_xticks(list(xs), keys)
    ax1.set_ylabel("interactive time to first token (ms)")
    ax1.legend()
    ax2.bar(["idle capacity", "batch lines run"], [idle, lines_per_s], color=["lightgrey", "tab:green"])
    ax2.set_ylabel("requests / s")
    ax2.set_title("backfill")
    fig.tight_layout()
    fig.savefig(HERE / "results-batch.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
