"""Where the gateway's CPU goes under load: a flame graph and a table by package (issue 22).

    .venv/bin/python bench/profile.py [--seconds 15] [--baseline /path/to/worktree]

The gateway, configured as bench/run.py's 'gateway' (API keys, limits in process off, usage records and metrics
on), fronts the nginx fixed-response upstream; wrk drives it with 32 connections while py-spy samples it at
500 Hz (idle threads left out). Writes bench/flame-gateway.svg (open it in a browser: every frame's width is its
share of the samples) and bench/RESULTS-profile.md: CPU µs per request sampled, by package (where each sample's
innermost frame is) and the functions with the most own time. With --baseline, the same for another build's
tree, side by side (bench/flame-baseline.svg).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run  # bench/ is on the path when this script runs
from harness import Server, logger, start_nginx, wrk

RATE = 500
log = logger("profile")
# Where a frame's file lives → the part of the stack it belongs to.
GROUPS = (
    ("portcullis/edge.py", "server: edge (ours)"),
    ("portcullis/server.py", "server: edge (ours)"),
    ("uvicorn/", "server: uvicorn"),
    ("httptools", "server: httptools"),
    ("granian", "server: granian"),
    ("aiohttp/", "client: aiohttp"),
    ("yarl/", "client: aiohttp"),
    ("multidict", "client: aiohttp"),
    ("pyreqwest", "client: pyreqwest"),
    ("portcullis/upstream/h1.py", "client: ours (upstream/h1.py)"),
    ("portcullis/upstream/", "gateway: upstream stage"),
    ("portcullis/app/", "gateway: dispatch"),
    ("portcullis/http.py", "gateway: dispatch"),
    ("portcullis/identity/", "gateway: identity"),
    ("portcullis/quota/", "gateway: quota and usage"),
    ("portcullis/routing/", "gateway: routing and admission"),
    ("portcullis/safety/", "gateway: validation and moderation"),
    ("portcullis/cache/", "gateway: cache"),
    ("portcullis/obs/", "gateway: metrics, logs, tracing"),
    ("portcullis/", "gateway: other"),
    ("structlog", "logging (structlog)"),
    ("logging/", "logging (stdlib)"),
    ("asyncio/", "event loop (asyncio, uvloop)"),
    ("uvloop", "event loop (asyncio, uvloop)"),
    ("orjson", "JSON (orjson)"),
    ("pydantic", "pydantic"),
    ("sqlalchemy", "database"),
)


def group(frame: str) -> str:
    for needle, name in GROUPS:
        if needle in frame:
            return name
    return "other (interpreter, stdlib)"


def _frame(text: str) -> str:
    text = re.sub(r":\d+\)$", ")", text)
    return re.sub(r"\(/.*?/(site-packages|src)/", "(", text)


def sample(spy: str, pid: int, url: str, seconds: int, out: Path, fmt: str) -> int:
    """py-spy on `pid` while wrk drives `url` (32 connections): the requests served."""
    cmd = [spy, "record", "--pid", str(pid), "--format", fmt, "--rate", str(RATE)]
    cmd += ["--duration", str(seconds + 2), "--nonblocking", "--output", str(out)]
    sampler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attached
    result = wrk(url, 32, seconds, key=run.BENCH_GATEWAY_KEY)
    sampler.wait()
    return int(result["requests"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--baseline", default=None, help="another build's source tree, profiled beside this one")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cache-hit", action="store_true", help="profile the gateway answering from its cache")
    parser.add_argument("--out", default=str(run.HERE / "RESULTS-profile.md"))
    args = parser.parse_args()
    command = " ".join([".venv/bin/python bench/profile.py", *sys.argv[1:]])
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="portcullis-profile-"))
    servers: list[Server] = []
    builds = {"this build": None} | ({"baseline": args.baseline} if args.baseline else {})
    found: dict[str, tuple[collections.Counter[str], collections.Counter[str], int, int, collections.Counter[str]]] = {}
    try:
        upstream = start_nginx(servers, work)
        for name, tree in builds.items():
            src = str(Path(tree) / "src") if tree else None
            gw_port = run.start_gateway(
                servers, work, upstream, name.replace(" ", "-"), keys=True, cache=args.cache_hit, src=src
            )
            pid = servers[-1].proc.pid
            url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            wrk(url, 32, 3, key=run.BENCH_GATEWAY_KEY)  # warm
            stem = "gateway" if tree is None else "baseline"
            served_svg = sample(spy, pid, url, args.seconds, run.HERE / f"flame-{stem}.svg", "flamegraph")
            raw = work / f"{stem}.txt"
            served = sample(spy, pid, url, args.seconds, raw, "raw")
            own: collections.Counter[str] = collections.Counter()
            groups: collections.Counter[str] = collections.Counter()
            inclusive: collections.Counter[str] = collections.Counter()
            total = 0
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                frames = [_frame(f) for f in stack.split(";")]
                leaf = frames[-1]
                own[leaf] += int(count)
                groups[group(leaf)] += int(count)
                for f in set(frames):  # (a recursive frame counts once per sample)
                    if "portcullis/" in f:
                        inclusive[f] += int(count)
                total += int(count)
            found[name] = (own, groups, total, served, inclusive)
            log(f"{name}: {served_svg} and {served} requests sampled, {total} samples")
    finally:
        for server in reversed(servers):
            server.stop()
    write_report(Path(args.out), command, args.seconds, found, args.top)
    return 0


def write_report(
    out: Path,
    command: str,
    seconds: int,
    found: dict[str, tuple[collections.Counter[str], collections.Counter[str], int, int, collections.Counter[str]]],
    top: int,
) -> None:
    names = list(found)
    per = {n: 1e6 / RATE / found[n][3] for n in names}  # µs of CPU per sample, per request
    lines = [
        "# Where the gateway's CPU goes (issue 22)",
        "",
        f"Command: `{command}` (py-spy at {RATE} Hz for {seconds} s under wrk -c32, idle threads left out; the "
        f"gateway as bench/run.py's 'gateway', pinned to CPU 0, nginx and wrk on CPU 1; {time.strftime('%Y-%m-%d')}). "
        "Flame graph: [flame-gateway.svg](flame-gateway.svg).",
        "",
        "Sampled CPU per request: " + ", ".join(f"{n} {found[n][2] * per[n]:.0f} µs" for n in names) + ". (A thread's "
        "samples count while it is runnable, not only while it runs: on the one pinned CPU the SQLite writer's thread "
        "shows several times its CPU as /proc counts it; the event loop's figures are the ones to read.)",
        "",
        "## By part of the stack (the innermost frame of each sample)",
        "",
        "| part | " + " | ".join(f"{n} µs/request | share" for n in names) + " |",
        "|---|" + "---:|---:|" * len(names),
    ]
    parts = sorted(set().union(*(found[n][1] for n in names)), key=lambda g: -found[names[0]][1][g])
    for g in parts:
        cells = [f"{found[n][1][g] * per[n]:.1f} | {found[n][1][g] / found[n][2]:.0%}" for n in names]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", f"## The {top} functions with the most own time ({names[0]})", "", "| µs/request | function |"]
    lines.append("|---:|---|")
    own = found[names[0]][0]
    for f, count in own.most_common(top):
        lines.append(f"| {count * per[names[0]]:.1f} | `{f[:150]}` |")
    lines += ["", f"## The {top} gateway functions with the most time inside them ({names[0]})", ""]
    lines += ["| µs/request | function |", "|---:|---|"]
    for f, count in found[names[0]][4].most_common(top):
        lines.append(f"| {count * per[names[0]]:.1f} | `{f[:150]}` |")
    lines.append("")
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
