"""Coalescing, and embedding micro-batching, each with and without.

    .venv/bin/python bench/cache.py            # about a minute; prints the tables for bench/RESULTS.md

Embeddings: 32 closed-loop clients, each sending one short text at a time for --seconds, through a
gateway with `embedding_batching` on and one with it off (same simulator); reported: requests/s and
upstream calls per request. With --llama-server BIN (or LLAMA_SERVER_BIN), the same on a real
llama-server serving the tests' tiny model with --embeddings.

Coalescing:
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
from harness import free_port, logger, wait_http

PY = sys.executable
LLAMA_ARGS = ["-np", "4", "-c", "4096", "--embeddings", "--pooling", "mean", "-t", "1", "--no-warmup"]
SIM_ARGS = ["--slots", "4", "--ttft-ms", "50", "--tokens-per-s", "100", "--default-max-tokens", "64"]


log = logger("cache")


def sim_stat(url: str, name: str) -> int:
    with urllib.request.urlopen(url + "/sim/stats", timeout=2) as resp:
        return json.loads(resp.read())[name]


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


async def embed_load(url: str, clients: int, seconds: float) -> int:
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def client(c: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < stop:
                i += 1
                body = orjson.dumps({"model": "m", "input": f"client {c} sentence number {i} to embed"})
                async with s.post(url + "/v1/embeddings", data=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                    done += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
    return done


def start_gateway(
    work: Path, procs: list[subprocess.Popen[bytes]], upstream: str, *, coalesce: bool, batching: bool
) -> str:
    port = free_port()
    cfg = {
        "server": {"port": port, "access_log": False},
        "store": {"database_url": f"sqlite+aiosqlite:///{work}/{port}.db", "auto_migrate": True},
        "auth": {"api_keys": False, "allow_anonymous": True},
        "tiers": {"free": {"priority": 0}},
        "admission": {"max_queue": 4096},
        "cache": {"coalesce": coalesce},
        "embedding_batching": {"enabled": batching, "max_wait_ms": 2},
        "models": {"m": {"deployments": [{"url": upstream}]}},
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
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz")
    return url


def llama_embeddings(args: argparse.Namespace, work: Path, procs: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """Requests/s of single-text embeddings through a gateway with batching off and on, on a real
    llama-server (the tests' tiny random-weight model, --embeddings, 4 slots)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "llama"))
    from tiny_gguf import write_tiny_llama

    model = write_tiny_llama(work / "tiny.gguf")
    port = free_port()
    procs.append(
        subprocess.Popen(
            [args.llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *LLAMA_ARGS],
            stdout=(work / "llama.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
    )
    llama_url = f"http://127.0.0.1:{port}"
    wait_http(llama_url + "/health", timeout=60)
    urls = {
        "batching off (default)": start_gateway(work, procs, llama_url, coalesce=True, batching=False),
        "batching on": start_gateway(work, procs, llama_url, coalesce=True, batching=True),
    }
    rows: dict[str, list[float]] = {}
    for run in range(args.runs):
        for name in list(urls)[:: 1 if run % 2 else -1]:
            n = asyncio.run(embed_load(urls[name], 32, args.seconds))
            rows.setdefault(name, []).append(n / args.seconds)
            log(f"llama-server embeddings, {name}: {n / args.seconds:.0f} requests/s")
    return {name: statistics.median(v) for name, v in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument(
        "--llama-server", default=os.environ.get("LLAMA_SERVER_BIN"), help="also measure embeddings on this binary"
    )
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
        urls = {
            name: start_gateway(work, procs, sim_url, coalesce=coalesce, batching=batching)
            for name, coalesce, batching in (
                ("coalescing", True, False),
                ("not coalescing", False, False),
                ("embeddings batched", True, True),
            )
        }
        embed_rows = {}
        for run in range(args.runs):
            for name in (
                ("not coalescing", "embeddings batched") if run % 2 else ("embeddings batched", "not coalescing")
            ):
                before = sim_stat(sim_url, "embedding_calls")
                n = asyncio.run(embed_load(urls[name], 32, args.seconds))
                calls = sim_stat(sim_url, "embedding_calls") - before
                embed_rows.setdefault(name, []).append((n / args.seconds, calls / n))
                log(f"embeddings, {name}: {n / args.seconds:.0f} requests/s, {calls / n:.3f} upstream calls each")
        rows = {}
        for name, url in list(urls.items())[:2]:
            times, calls = [], []
            for i in range(args.runs):
                before = sim_stat(sim_url, "requests")
                times.append(asyncio.run(burst(url, args.burst)))
                calls.append(sim_stat(sim_url, "requests") - before)
                log(f"{name}: burst {i + 1}/{args.runs}: {times[-1]:.2f} s, {calls[-1]} upstream calls")
            rows[name] = (statistics.median(times), statistics.median(calls))
        print()
        print(f"Burst of {args.burst} identical deterministic requests (medians of {args.runs}):")
        print()
        print("| gateway | time to the last answer | upstream calls |")
        print("|---|---:|---:|")
        for name, (t, c) in rows.items():
            print(f"| {name} | {t:.2f} s | {c:.0f} |")
        print()
        print(
            "Embeddings, 32 closed-loop clients, one short text each "
            f"(medians of {args.runs} runs of {args.seconds:g} s):"
        )
        print()
        print("| gateway | requests/s | upstream calls per request |")
        print("|---|---:|---:|")
        for name, label in (("not coalescing", "batching off (default)"), ("embeddings batched", "batching on")):
            rps = statistics.median(r for r, _ in embed_rows[name])
            per = statistics.median(c for _, c in embed_rows[name])
            print(f"| {label} | {rps:.0f} | {per:.3f} |")
        if args.llama_server:
            llama = llama_embeddings(args, work, procs)
            print()
            print("The same on a real llama-server (tiny random-weight model, --embeddings, 4 slots):")
            print()
            print("| gateway | requests/s |")
            print("|---|---:|")
            for name, rps in llama.items():
                print(f"| {name} | {rps:.0f} |")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
