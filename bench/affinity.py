"""Prefix affinity: time to first token of a conversation's follow-up turns, with affinity and without.

    .venv/bin/python bench/affinity.py                       # the simulator, about 2 minutes
    .venv/bin/python bench/affinity.py --llama-server BIN    # also real llama-server replicas (or LLAMA_SERVER_BIN)

Workload: conversations that each start with their own long system prompt and run several turns (each
turn resends the whole conversation, as chat clients do; the user thinks ~0.5 s between turns), a few at
once, beside a trickle of short one-off requests. Streamed; the client measures the time to the first
content token and reads the `timings` of the last chunk (cache_n: prompt tokens the replica took from its
cache, prompt_n: tokens it computed).

  simulator     3 replicas, 4 slots each, 0.4 ms per prompt token not in the slot's cache (a fresh
                1,500-token prompt: 0.6 s), llama-server's slot choice and prompt cache;
  llama-server  2 replicas of a random-weight llama (n_embd 256, 4 layers, a byte vocabulary: one token per
                character), -np 2, one thread each, both on CPU 1; the gateway on CPU 0.

Each round runs the same workload (fresh prompts every time, so nothing is cached from before) through a
gateway with `routing.affinity` on and one with it off, in alternating order. Medians over --runs.
Writes bench/RESULTS-affinity.md, results-affinity.json and results-affinity.png, and a section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from harness import embed, free_port, logger, percentile, pyplot, serve_gateway, wait_http

HERE = Path(__file__).resolve().parent
PY = sys.executable
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
log = logger("affinity")

BACKENDS: dict[str, dict[str, Any]] = {
    "simulator": {
        "replicas": 3,
        "conversations": 24,
        "turns": 4,
        "at_once": 6,
        "system_words": 1500,  # the simulator counts a word as a token
        "max_tokens": 16,
        "think_s": 0.5,  # a user reads and types between turns (mean, exponential)
    },
    "llama-server": {
        "replicas": 2,
        "conversations": 8,
        "turns": 3,
        "at_once": 2,
        "system_words": 300,  # ~2,000 characters: ~2,000 tokens with a byte vocabulary
        "max_tokens": 4,
        "think_s": 0.5,
    },
}


def start(cmd: list[str], cpu: int, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), *cmd],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def start_gateway(work: Path, name: str, urls: list[str], affinity: bool) -> tuple[subprocess.Popen[bytes], str]:
    config = {
        "server": {"access_log": False},
        "store": {"database_url": f"sqlite+aiosqlite:///{work}/{name}.db", "auto_migrate": True},
        "auth": {"api_keys": False, "allow_anonymous": True},
        "tiers": {"free": {"priority": 0}},
        "cache": {"enabled": False},
        "routing": {"affinity": {"enabled": affinity}},
        "models": {"m": {"deployments": [{"url": u, "name": f"r{i}"} for i, u in enumerate(urls)]}},
    }
    return serve_gateway(work, name, config, cpu=0)


async def stream(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    body = {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},  # the last chunk carries llama-server's timings
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    ttft = None
    text: list[str] = []
    timings: dict[str, Any] = {}
    async with session.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {await r.text()}")
        async for raw in r.content:
            if not raw.startswith(b"data: {"):
                continue
            chunk = orjson.loads(raw[6:])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
            timings = chunk.get("timings") or timings
    return {"ttft": ttft or (time.perf_counter() - t0), "text": "".join(text), "timings": timings}


async def workload(url: str, shape: dict[str, Any], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    first: list[float] = []
    follow: list[float] = []
    cached = computed = 0
    gate = asyncio.Semaphore(shape["at_once"])
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def conversation() -> None:
            nonlocal cached, computed
            system = " ".join(rng.choice(WORDS) for _ in range(shape["system_words"]))
            messages = [{"role": "system", "content": f"{seed}-{rng.random()} {system}"}]
            async with gate:
                for turn in range(shape["turns"]):
                    messages.append({"role": "user", "content": f"Question {turn}: {rng.choice(WORDS)}?"})
                    answer = await stream(session, url, messages, shape["max_tokens"])
                    messages.append({"role": "assistant", "content": answer["text"] or "ok"})
                    (first if turn == 0 else follow).append(answer["ttft"])
                    if turn:
                        cached += int(answer["timings"].get("cache_n", 0))
                        computed += int(answer["timings"].get("prompt_n", 0))
                    await asyncio.sleep(rng.expovariate(1 / shape["think_s"]))

        async def one_offs(stop: asyncio.Event) -> None:
            while not stop.is_set():
                await stream(session, url, [{"role": "user", "content": f"one-off {rng.random()}"}], 2)
                await asyncio.sleep(0.2)

        stop = asyncio.Event()
        trickle = asyncio.create_task(one_offs(stop))
        await asyncio.gather(*(conversation() for _ in range(shape["conversations"])))
        stop.set()
        await trickle
    return {
        "first_p50": statistics.median(first),
        "follow_p50": statistics.median(follow),
        "follow_p95": percentile(follow, 0.95),
        "cached_share": cached / max(1, cached + computed),
    }


def placements(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("portcullis_affinity_placements_total{"):
            out[line.split('result="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def run_backend(backend: str, urls: list[str], work: Path, runs: int) -> list[dict[str, Any]]:
    shape = BACKENDS[backend]
    rows = []
    for run in range(runs):
        order = [True, False] if run % 2 == 0 else [False, True]
        for affinity in order:
            name = f"{backend}-{'on' if affinity else 'off'}-{run}"
            proc, url = start_gateway(work, name, urls, affinity)
            try:
                log(f"{backend}: run {run + 1}/{runs}, affinity {'on' if affinity else 'off'}")
                result = asyncio.run(workload(url, shape, seed=1000 * run + affinity))
                seen = placements(url)
            finally:
                proc.terminate()
                proc.wait(10)
            keyed = seen.get("hit", 0) + seen.get("overflow", 0)
            result.update(
                backend=backend,
                affinity=affinity,
                run=run,
                hit_rate=seen.get("hit", 0) / keyed if keyed else None,
            )
            ms = {k: round(result[k] * 1000) for k in ("follow_p50", "follow_p95", "first_p50")}
            log(
                f"    follow-up TTFT p50 {ms['follow_p50']} ms, p95 {ms['follow_p95']} ms; "
                f"first turn p50 {ms['first_p50']} ms; cached share {result['cached_share']:.0%}"
            )
            rows.append(result)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN"))
    parser.add_argument("--out", default=str(HERE / "RESULTS-affinity.md"))
    parser.add_argument("--from-json", default=None)
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        report(rows, args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="pc-affinity-"))
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, Any]] = []
    try:
        sim_urls = []
        for i in range(BACKENDS["simulator"]["replicas"]):
            port = free_port()
            sim_args = ["--slots", "4", "--ttft-ms", "5", "--prompt-ms-per-token", "0.4", "--tokens-per-s", "200"]
            procs.append(
                start([PY, "-m", "portcullis", "sim", "--port", str(port), *sim_args], 1, work / f"sim{i}.log")
            )
            sim_urls.append(f"http://127.0.0.1:{port}")
        for url in sim_urls:
            wait_http(url + "/health")
        rows += run_backend("simulator", sim_urls, work, args.runs)
        for p in procs:
            p.terminate()
            p.wait(10)
        procs.clear()
        if args.llama_server:
            sys.path.insert(0, str(HERE.parent / "tests" / "llama"))
            from tiny_gguf import write_tiny_llama

            model = write_tiny_llama(work / "mid.gguf", n_embd=256, n_layer=4, n_ff=512, n_head=4, n_ctx_train=16384)
            llama_urls = []
            for i in range(BACKENDS["llama-server"]["replicas"]):
                port = free_port()
                cmd = [args.llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
                cmd += ["-np", "2", "-c", "16384", "-t", "1", "--no-warmup"]
                procs.append(start(cmd, 1, work / f"llama{i}.log"))
                llama_urls.append(f"http://127.0.0.1:{port}")
            for url in llama_urls:
                wait_http(url + "/health", timeout=120)
            rows += run_backend("llama-server", llama_urls, work, args.runs)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    (HERE / "results-affinity.json").write_text(json.dumps({"rows": rows}, indent=1))
    report(rows, args)
    return 0


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else 0.0


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    runs = 1 + max(r["run"] for r in rows)
    command = ".venv/bin/python bench/affinity.py" + (" --llama-server BIN" if "llama-server" in backends else "")
    lines = [
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, 2-core VM; medians of {runs} rounds, affinity on and "
        "off alternating; fresh prompts each run).",
        "",
        "| backend | affinity | follow-up TTFT p50 | follow-up TTFT p95 | first turn p50 | cached prompt share "
        "| affinity hits |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for backend in backends:
        for affinity in (True, False):
            mine = [r for r in rows if r["backend"] == backend and r["affinity"] == affinity]
            med = {k: _median(mine, k) for k in ("follow_p50", "follow_p95", "first_p50", "cached_share")}
            hits = _median(mine, "hit_rate") if affinity else None
            summary[(backend, affinity)] = med
            lines.append(
                f"| {backend} | {'on' if affinity else 'off'} | {med['follow_p50'] * 1000:.0f} ms | "
                f"{med['follow_p95'] * 1000:.0f} ms | {med['first_p50'] * 1000:.0f} ms | {med['cached_share']:.0%} | "
                f"{f'{hits:.0%}' if hits is not None else '-'} |"
            )
    lines.append("")
    for backend in backends:
        on, off = summary[(backend, True)], summary[(backend, False)]
        lines.append(
            f"- {backend}: follow-up turns start **{off['follow_p50'] / max(on['follow_p50'], 1e-9):.1f}x** sooner "
            f"at the median with affinity ({off['follow_p50'] * 1000:.0f} -> {on['follow_p50'] * 1000:.0f} ms; p95 "
            f"{off['follow_p95'] * 1000:.0f} -> {on['follow_p95'] * 1000:.0f} ms); the replicas took "
            f"{on['cached_share']:.0%} of those prompts from their cache, against {off['cached_share']:.0%}."
        )
    lines += ["", "![affinity](results-affinity.png)", ""]
    Path(args.out).write_text("# Prefix affinity\n" + "\n".join(lines))
    embed(HERE / "RESULTS.md", "affinity", "Prefix affinity (bench/affinity.py)", lines)
    plot(summary, backends)
    log(f"wrote {args.out}")


def plot(summary: dict[tuple[str, bool], dict[str, float]], backends: list[str]) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        labels = ["follow-up p50", "follow-up p95", "first turn p50"]
        keys = ["follow_p50", "follow_p95", "first_p50"]
        xs = range(len(labels))
        for i, affinity in enumerate((True, False)):
            values = [summary[(backend, affinity)][k] * 1000 for k in keys]
            ax.bar([x + (i - 0.5) * 0.35 for x in xs], values, 0.35, label=f"affinity {'on' if affinity else 'off'}")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("time to first token (ms)")
        ax.set_title(backend)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "results-affinity.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
