"""Soak: the gateway at half its capacity for ten minutes, streamed and non-streamed requests mixed; does
its memory grow?

    .venv/bin/python bench/soak.py                     # about 11 minutes
    .venv/bin/python bench/soak.py --minutes 2 --warmup 0.5

One simulator (no generation delay, 16-token answers) on CPU 1, the gateway on CPU 0 with API keys, the
SQLite usage store and the exact cache on (8 MiB, so it is full within the warm-up; half the requests are
deterministic, a tenth of those repeat).
First the gateway's capacity is measured (32 closed-loop clients, 15 s); then requests arrive open-loop at
half of it, half of them streamed, for --minutes. The gateway's resident memory (VmRSS) is read every 5 s.
Reported: RSS at the end of the warm-up and at the end (medians of the last minute), the growth between them
(target: under 5%), requests served, errors, and latency. Writes bench/RESULTS-soak.md, results-soak.json,
results-soak.png and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from harness import embed, free_port, logger, percentile, pyplot, start_portcullis, wait_http

HERE = Path(__file__).resolve().parent
KEY = "pc-00000000000000b5-soak-bench-admin-key-0123456789abcdefghijkl"
SECRET = "soak-bench-key-secret-0123456789abcdef0123456789abcdef"
log = logger("soak")


def body(rng: random.Random, i: int) -> dict[str, Any]:
    deterministic = rng.random() < 0.5
    topic = rng.randrange(10) if deterministic and rng.random() < 0.1 else i
    return {
        "model": "m",
        "messages": [{"role": "user", "content": f"question number {topic}: tell me something"}],
        "max_tokens": 16,
        "temperature": 0 if deterministic else 0.7,
        "stream": rng.random() < 0.5,
    }


async def one(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", data=orjson.dumps(payload)) as resp:
            async for _ in resp.content.iter_any():
                pass
            return resp.status, time.perf_counter() - t0
    except aiohttp.ClientError:
        return 0, time.perf_counter() - t0


async def capacity(url: str, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    rng = random.Random(1)
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {KEY}"}) as session:

        async def client() -> None:
            nonlocal done
            i = 0
            while time.monotonic() < stop:
                status, _ = await one(session, url, body(rng, i))
                done += status == 200
                i += 1

        await asyncio.gather(*[client() for _ in range(32)])
    return done / seconds


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def soak(url: str, pid: int, rate: float, seconds: float) -> dict[str, Any]:
    rng = random.Random(7)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers={"authorization": f"Bearer {KEY}"}) as session:
        pending: set[asyncio.Task[tuple[int, float]]] = set()

        def finished(task: asyncio.Task[tuple[int, float]]) -> None:
            pending.discard(task)
            status, latency = task.result()
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(latency)

        async def sample_rss() -> None:
            last_log = 0.0
            while time.monotonic() - start < seconds:
                now = time.monotonic() - start
                rss.append((now, rss_kib(pid)))
                if now - last_log >= 60:
                    last_log = now
                    served = sum(statuses.values())
                    log(f"  {now / 60:4.1f} min: RSS {rss[-1][1] / 1024:.1f} MiB, {served} requests answered")
                await asyncio.sleep(5)

        sampler = asyncio.create_task(sample_rss())
        i = 0
        while True:
            due = start + i / rate
            now = time.monotonic()
            if now - start >= seconds:
                break
            # Behind schedule the loop still yields, so answers are read and the RSS is sampled meanwhile.
            await asyncio.sleep(max(0.0, due - now))
            task = asyncio.create_task(one(session, url, body(rng, i)))
            pending.add(task)
            task.add_done_callback(finished)
            i += 1
        await sampler
        if pending:
            await asyncio.gather(*pending)
    return {"statuses": statuses, "latencies": latencies, "rss": rss, "sent": i, "elapsed": time.monotonic() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2, help="minutes before the baseline RSS is taken")
    parser.add_argument("--load", type=float, default=0.5, help="share of the measured capacity")
    parser.add_argument("--out", default=str(HERE / "RESULTS-soak.md"))
    parser.add_argument("--from-json", default=None)
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved, args)
        return 0
    os.sched_setaffinity(0, {1})  # the load generator beside the simulator, off the gateway's core
    work = Path(tempfile.mkdtemp(prefix="pc-soak-"))
    sim_port, gw_port = free_port(), free_port()
    sim_url, gw_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
    procs = [start_portcullis(["sim", "--port", str(sim_port), "--slots", "64"], 1, work / "sim.log")]
    try:
        wait_http(sim_url + "/health")
        config = {
            "server": {"access_log": False, "drain_grace_s": 0.1},
            "store": {"database_url": f"sqlite+aiosqlite:///{work}/gw.db", "auto_migrate": True},
            # A small cache, full within the warm-up: a cache filling up to its bound is not a leak.
            "cache": {"enabled": True, "max_bytes": 8 * 1024 * 1024},
            "admission": {"max_queue": 4096},
            "models": {"m": {"deployments": [{"url": sim_url}]}},
        }
        (work / "gw.yaml").write_text(yaml.safe_dump(config))
        env = {"PORTCULLIS_KEY_SECRET": SECRET, "PORTCULLIS_BOOTSTRAP_ADMIN_KEY": KEY}
        gateway = start_portcullis(
            ["serve", "--config", str(work / "gw.yaml"), "--port", str(gw_port)], 0, work / "gw.log", env=env
        )
        procs.append(gateway)
        wait_http(gw_url + "/readyz")
        cap = asyncio.run(capacity(gw_url, 15))
        rate = cap * args.load
        log(f"capacity {cap:.0f} requests/s; soaking at {rate:.0f}/s for {args.minutes:g} min")
        result = asyncio.run(soak(gw_url, gateway.pid, rate, args.minutes * 60))
        saved = {
            "capacity": cap,
            "rate": rate,
            "minutes": args.minutes,
            "warmup": args.warmup,
            "rss": result["rss"],
            "statuses": {str(k): v for k, v in result["statuses"].items()},
            "sent": result["sent"],
            "achieved": result["sent"] / result["elapsed"],
            "p50": percentile(result["latencies"], 0.5),
            "p99": percentile(result["latencies"], 0.99),
        }
        (HERE / "results-soak.json").write_text(json.dumps(saved, indent=1))
        report(saved, args)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return 0


def report(saved: dict[str, Any], args: argparse.Namespace) -> None:
    rss = saved["rss"]
    warm_s = saved["warmup"] * 60
    end_s = rss[-1][0]
    at_warm = statistics.median(v for t, v in rss if warm_s - 30 <= t <= warm_s + 30)
    at_end = statistics.median(v for t, v in rss if t >= end_s - 60)
    growth = (at_end - at_warm) / at_warm
    answered = sum(saved["statuses"].values())
    ok = saved["statuses"].get("200", 0)
    lines = [
        "",
        f"Command: `.venv/bin/python bench/soak.py --minutes {saved['minutes']:g} --warmup {saved['warmup']:g}` "
        f"({time.strftime('%Y-%m-%d')}, 2-core VM; gateway on CPU 0, simulator and load on CPU 1).",
        "",
        f"Capacity {saved['capacity']:.0f} requests/s (32 closed-loop clients); soak at {saved['rate']:.0f}/s "
        f"(open loop, half streamed, half deterministic; {saved.get('achieved', saved['rate']):.0f}/s achieved) "
        f"for {saved['minutes']:g} minutes: {saved['sent']} sent, "
        f"{ok} answered 200, {answered - ok} otherwise "
        f"({', '.join(f'{k}: {v}' for k, v in saved['statuses'].items())}); "
        f"latency p50 {saved['p50'] * 1000:.1f} ms, p99 {saved['p99'] * 1000:.1f} ms.",
        "",
        f"- gateway RSS after the {saved['warmup']:g}-minute warm-up: **{at_warm / 1024:.1f} MiB**; "
        f"over the last minute: **{at_end / 1024:.1f} MiB**: growth **{growth:+.1%}** (target: under 5%)",
        "",
        "![soak RSS](results-soak.png)",
        "",
    ]
    Path(args.out).write_text("# Soak\n" + "\n".join(lines))
    embed(HERE / "RESULTS.md", "soak", "Soak (bench/soak.py)", lines)
    plt = pyplot(log)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([t / 60 for t, _ in rss], [v / 1024 for _, v in rss], color="tab:blue")
        ax.axvline(saved["warmup"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("minutes")
        ax.set_ylabel("gateway RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"soak at {saved['rate']:.0f} requests/s: RSS {growth:+.1%} after warm-up")
        fig.tight_layout()
        fig.savefig(HERE / "results-soak.png", dpi=110)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
