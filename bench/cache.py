"""Coalescing: a burst of identical deterministic requests, with and without sharing the upstream call.

    .venv/bin/python bench/cache.py            # about a minute; prints the table for bench/RESULTS.md

One simulator replica (4 slots, 50 ms to first token, 100 tokens/s, 32 tokens an answer: ~0.37 s) and
two gateways on it, both with the response cache on: one coalescing identical requests in flight (the
default), one not (`cache.coalesce: false`). A burst of N identical requests arrives at once; reported:
the time until the last answer, and how many calls reached the simulator. Medians of --runs bursts,
each with a fresh question (so each burst starts as a miss).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson
import yaml

PY = sys.executable
SIM_ARGS = ["--slots", "4", "--ttft-ms", "50", "--tokens-per-s", "100", "--default-max-tokens", "64"]


def log(msg: str) -> None:
    print(f"[cache {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(url)


def sim_requests(url: str) -> int:
    with urllib.request.urlopen(url + "/sim/stats", timeout=2) as resp:
        return json.loads(resp.read())["requests"]


async def burst(url: str, n: int) -> float:
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": f"question {secrets.token_hex(6)}"}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            async with s.post(url + "/v1/chat/completions", data=body) as r:
                await r.read()
                assert r.status == 200, r.status

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pc-cache-bench-"))
    procs = []
    try:
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        procs.append(
            subprocess.Popen(
                [PY, "-m", "portcullis", "sim", "--port", str(sim_port), *SIM_ARGS],
                stdout=(work / "sim.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        wait_http(sim_url + "/health")
        urls = {}
        for name, coalesce in (("coalescing", True), ("not coalescing", False)):
            port = free_port()
            cfg = {
                "server": {"port": port, "access_log": False},
                "store": {"database_url": f"sqlite+aiosqlite:///{work}/{port}.db", "auto_migrate": True},
                "auth": {"api_keys": False, "allow_anonymous": True},
                "tiers": {"free": {"priority": 0}},
                "admission": {"max_queue": 4096},
                "cache": {"coalesce": coalesce},
                "models": {"m": {"deployments": [{"url": sim_url}]}},
            }
            (work / f"{port}.yaml").write_text(yaml.safe_dump(cfg))
            procs.append(
                subprocess.Popen(
                    [PY, "-m", "portcullis", "serve", "--config", str(work / f"{port}.yaml")],
                    stdout=(work / f"{port}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    env=os.environ.copy(),
                )
            )
            urls[name] = f"http://127.0.0.1:{port}"
            wait_http(urls[name] + "/readyz")
        rows = {}
        for name, url in urls.items():
            times, calls = [], []
            for i in range(args.runs):
                before = sim_requests(sim_url)
                times.append(asyncio.run(burst(url, args.burst)))
                calls.append(sim_requests(sim_url) - before)
                log(f"{name}: burst {i + 1}/{args.runs}: {times[-1]:.2f} s, {calls[-1]} upstream calls")
            rows[name] = (statistics.median(times), statistics.median(calls))
        print()
        print(f"Burst of {args.burst} identical deterministic requests (medians of {args.runs}):")
        print()
        print("| gateway | time to the last answer | upstream calls |")
        print("|---|---:|---:|")
        for name, (t, c) in rows.items():
            print(f"| {name} | {t:.2f} s | {c:.0f} |")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
