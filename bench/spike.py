"""A stream spike, then calm: does the gateway give its memory back?

    .venv/bin/python bench/spike.py                                  # about 2 minutes
    .venv/bin/python bench/spike.py --baseline /tmp/worktree-of-an-earlier-build
    .venv/bin/python bench/spike.py --pymalloc                       # and on CPython's own allocator

One simulator with room for every stream (6,000 slots, 1 token/s) on CPU 1; the gateway on CPU 0 (API keys,
SQLite). After a warm-up of a few hundred requests, --streams streams are opened, 500 a second (20 tokens
each at 1 token a second: all are open at once), all read to their end; then nothing for --calm seconds.
The gateway's resident memory (VmRSS) is read every second throughout. With --baseline, the same is done
against that build's gateway afterwards, so the two are compared on one machine in one run. Reported: RSS
before the spike, at its peak, and at the end of the calm; streams completed. Writes bench/RESULTS-spike.md,
results-spike.json, results-spike.png and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from harness import embed, free_port, logger, pyplot, start_portcullis, wait_http

HERE = Path(__file__).resolve().parent
KEY = "pc-00000000000000b6-spike-bench-admin-key-0123456789abcdefghijk"
SECRET = "spike-bench-key-secret-0123456789abcdef0123456789abcdef"
log = logger("spike")
BODY = orjson.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "a spike"}], "max_tokens": 20, "stream": True}
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def streams(url: str, n: int, per_s: float = 500.0) -> int:
    """Open n streams (`per_s` a second), read each to its end; how many completed with [DONE]."""
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> bool:
            try:
                async with s.post(url + "/v1/chat/completions", data=BODY, headers=headers) as r:
                    raw = await r.read()
                    return r.status == 200 and raw.rstrip().endswith(b"[DONE]")
            except (aiohttp.ClientError, OSError):
                return False

        tasks = []
        for _ in range(n):
            tasks.append(asyncio.create_task(one()))
            if len(tasks) % 100 == 0:
                await asyncio.sleep(100 / per_s)
        return sum(await asyncio.gather(*tasks))


def run_one(
    name: str,
    src: str | None,
    sim_url: str,
    work: Path,
    args: argparse.Namespace,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    port = free_port()
    config = {
        # Thousands of streams from one address: the per-address cap (a build before issue 17 has none) is lifted.
        "server": {
            "access_log": False,
            "drain_grace_s": 0.1,
            **({"max_connections_per_client": 0} if src is None else {}),
        },
        "store": {"database_url": f"sqlite+aiosqlite:///{work}/{name}.db", "auto_migrate": True},
        "tiers": {"free": {"priority": 0}, "premium": {"priority": 1}, "enterprise": {"priority": 2}},
        "admission": {"max_queue": 0},
        # The simulator shares a core with this load generator: under the spike it answers probes late.
        "health": {"timeout_s": 5, **({"down_after": 5} if src is None else {})},
        "models": {"m": {"deployments": [{"url": sim_url}]}},
    }
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    env = {"PORTCULLIS_KEY_SECRET": SECRET, "PORTCULLIS_BOOTSTRAP_ADMIN_KEY": KEY}
    if src is not None:
        env["PYTHONPATH"] = src
    env.update(extra_env or {})
    serve = ["serve", "--config", str(work / f"{name}.yaml"), "--port", str(port)]
    gw = start_portcullis(serve, 0, work / f"{name}.log", env)
    url = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss_mib(gw.pid)))
            stop.wait(1.0)

    try:
        wait_http(url + "/readyz")
        asyncio.run(streams(url, 300))  # warm-up
        time.sleep(2)
        before = rss_mib(gw.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        spike_at = time.monotonic() - t0
        log(f"{name}: {args.streams} streams at once (RSS before: {before:.1f} MiB)")
        completed = asyncio.run(streams(url, args.streams))
        calm_at = time.monotonic() - t0
        log(f"{name}: {completed} completed; calm for {args.calm:g} s")
        time.sleep(args.calm)
        stop.set()
        sampler.join()
        peak = max(r for _, r in samples)
        after = samples[-1][1]
        log(f"{name}: RSS before {before:.1f}, peak {peak:.1f}, after the calm {after:.1f} MiB")
        return {
            "name": name,
            "before": before,
            "peak": peak,
            "after": after,
            "completed": completed,
            "spike_at": spike_at,
            "calm_at": calm_at,
            "samples": samples,
        }
    finally:
        stop.set()
        gw.terminate()
        gw.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--calm", type=float, default=60)
    parser.add_argument("--baseline", default=None, help="an earlier build's source tree (a git worktree)")
    parser.add_argument(
        "--pymalloc",
        action="store_true",
        help="also run this build on CPython's own allocator (PYTHONMALLOC=pymalloc; `serve` picks glibc's malloc)",
    )
    parser.add_argument("--out", default=str(HERE / "RESULTS-spike.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pc-spike-"))
    sim_port = free_port()
    sim = start_portcullis(
        # No keep-alive closing: builds before issue 16 take it for a failing replica.
        ["sim", "--port", str(sim_port), "--slots", "6000", "--tokens-per-s", "1", "--keep-alive-s", "0"],
        1,
        work / "sim.log",
    )
    sim_url = f"http://127.0.0.1:{sim_port}"
    try:
        wait_http(sim_url + "/health")
        results = [run_one("gateway", None, sim_url, work, args)]
        if args.pymalloc:
            pymalloc = {"PYTHONMALLOC": "pymalloc"}
            results.append(run_one("gateway on pymalloc", None, sim_url, work, args, pymalloc))
        if args.baseline:
            src = str(Path(args.baseline).resolve() / "src")
            results.append(run_one("gateway-baseline", src, sim_url, work, args))
    finally:
        sim.terminate()
        sim.wait(10)
    report(results, args)
    return 0


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    lines = [
        "# A stream spike, then calm",
        "",
        f"Command: `.venv/bin/python bench/spike.py --streams {args.streams} --calm {args.calm:g}"
        + (" --pymalloc" if args.pymalloc else "")
        + (" --baseline <worktree of the build before>" if args.baseline else "")
        + f"` ({time.strftime('%Y-%m-%d')}, 2-core VM).",
        "",
        f"{args.streams:,} streams opened within {args.streams / 500:g} s on one gateway (20 s each: all open at "
        f"once), then {args.calm:g} s without requests; the gateway's resident memory (VmRSS) read every second.",
        "",
        "| build | streams completed | RSS before | RSS at the peak | RSS after the calm | given back |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        given = (r["peak"] - r["after"]) / max(r["peak"] - r["before"], 1e-9)
        lines.append(
            f"| {r['name']} | {r['completed']:,} | {r['before']:.1f} MiB | {r['peak']:.1f} MiB | "
            f"{r['after']:.1f} MiB | {given:.0%} of the growth |"
        )
    lines += [
        "",
        "After the spike the gateway collects garbage and asks the C allocator to return its free pages"
        " (`malloc_trim`, obs/memory.py). `portcullis serve` runs on glibc's malloc (PYTHONMALLOC=malloc,"
        " src/portcullis/entry.py), whose free pages that returns. On CPython's own small-object allocator"
        " (`gateway on pymalloc`) most of the growth stays: an arena of 1 MiB goes back to the system only when"
        " every block in it is free, and the few objects that outlive a spike sit in most of them (fewer small"
        " objects were alive after the spike than before it: nothing leaks, the memory is reused by the next"
        " spike). glibc's malloc costs about 5% more CPU per request (bench/RESULTS-malloc-ab.md);"
        " PYTHONMALLOC=pymalloc chooses the other side of that trade.",
        "",
        "![RSS over time](results-spike.png)",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    embed(HERE / "RESULTS.md", "spike", "Memory after a stream spike (bench/spike.py)", lines[1:])
    (HERE / "results-spike.json").write_text(json.dumps(results, indent=1))
    plt = pyplot(log)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in results:
            ax.plot([t - r["spike_at"] for t, _ in r["samples"]], [m for _, m in r["samples"]], label=r["name"])
        ax.axvline(results[0]["calm_at"] - results[0]["spike_at"], color="grey", linestyle=":", label="spike over")
        ax.set_xlabel("seconds since the spike began")
        ax.set_ylabel("RSS (MiB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(HERE / "results-spike.png", dpi=110)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
