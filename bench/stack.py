"""The I/O stack, measured (issue 22): the same bare pass-through on each server and each upstream client.

    .venv/bin/python bench/stack.py                         # 3 rounds of 3 s per case (about 15 minutes)
    .venv/bin/python bench/stack.py --runs 1 --seconds 2    # a quick look
    .venv/bin/python bench/stack.py --from-json bench/results-stack.json   # re-render, no run

Servers (bench/stack_app.py): uvicorn (ASGI on httptools), Granian with ASGI and with RSGI (1 worker, uvloop,
HTTP/1), and `raw`, an asyncio protocol on httptools with no server framework (the floor of Python here).
Clients: aiohttp, aiosonic, pyreqwest (Rust reqwest), rnet (Rust), and `raw`, an asyncio protocol on httptools'
response parser with kept-alive connections (the floor). Every pair serves the same pass-through: read and parse
the body, forward it, answer the upstream's status and body; streamed (`"stream": true`), relay the upstream's SSE
answer chunk by chunk. Non-streamed and streamed, at 1 and 32 connections; wrk -t1 with bench/post.lua.

The pass-throughs run from a virtualenv of their own (--venv; made on first use with pip) so that the project's
stays as it is. Each is pinned alone to CPU 0; wrk and the nginx upstream (bench/nginx.conf.template: a fixed
answer, and a fixed SSE answer of 10 events under /sse/, chunked) share CPU 1. Rounds are interleaved (every case
once per round, the order rotating) and the report shows medians: requests/s, p50, and the server's CPU time per
request (utime + stime of the process, its threads and children, from /proc, before and after each run). CPU per
request is the figure to read on a noisy machine: requests/s also measure the share of CPU 0 each server won.
Writes bench/RESULTS-stack.md, bench/results-stack.json and bench/results-stack.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import Server, cpu_seconds, free_port, logger, pinned, pyplot, start_nginx, wrk  # bench/ is on the path

HERE = Path(__file__).resolve().parent
log = logger("stack")
SERVERS = ("uvicorn", "granian-asgi", "granian-rsgi", "raw")
CLIENTS = ("aiohttp", "aiosonic", "pyreqwest", "rnet", "raw")
PACKAGES = ("granian", "uvicorn", "httptools", "uvloop", "aiohttp", "aiosonic", "pyreqwest", "rnet", "orjson")


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        log(f"making {venv} (pip install {' '.join(PACKAGES)})")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    return py


def versions(py: Path) -> dict[str, str]:
    code = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {PACKAGES!r}}}))"
    return json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seconds", type=float, default=3, help="length of one wrk run")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--modes", default="plain,stream")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--venv", default=str(Path.home() / ".cache" / "portcullis" / "stack-venv"))
    parser.add_argument("--out", default=str(HERE / "RESULTS-stack.md"))
    parser.add_argument("--from-json", default=None, help="re-render the report from a results-stack.json, no run")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        write_report(Path(args.out), data["meta"], data["results"])
        return 0
    command = shlex.join([".venv/bin/python", "bench/stack.py", *sys.argv[1:]])
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} (apt-get install wrk)")
    py = ensure_venv(Path(args.venv))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))
    pairs = [(s, c) for s in args.servers.split(",") for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="portcullis-stack-"))
    procs: list[Server] = []
    results: list[dict[str, Any]] = []
    try:
        upstream = start_nginx(procs, work)
        targets: dict[str, tuple[str, list[int]]] = {"direct": (upstream, [procs[0].proc.pid])}
        for server, client in pairs:
            name = f"{server}+{client}"
            port = free_port()
            cmd = pinned(0, [str(py), str(HERE / "stack_app.py"), server, client, upstream, str(port)])
            srv = Server(name, cmd, None, work, env={"PYTHONPATH": str(HERE)}, cwd=HERE)
            procs.append(srv)
            srv.wait_ready(f"http://127.0.0.1:{port}/v1/chat/completions", body=b'{"model":"bench"}')
            targets[name] = (f"http://127.0.0.1:{port}", [srv.proc.pid])
        log(f"{len(targets)} targets up; {args.runs} rounds")
        names = list(targets)
        for mode in args.modes.split(","):
            for c in (int(x) for x in args.connections.split(",")):
                runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
                for r in range(args.runs):
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for n in order:
                        base, pids = targets[n]
                        before = cpu_seconds(pids)
                        url = base + "/v1/chat/completions"
                        w = wrk(url, c, args.seconds, stream=mode == "stream", failures_ok=True)
                        spent = cpu_seconds(pids) - before
                        w["cpu_us"] = spent / max(w["requests"], 1) * 1e6
                        w["cpu_share"] = spent / args.seconds
                        runs[n].append(w)
                    log(f"{mode} c={c} round {r + 1}/{args.runs} done")
                for n in names:
                    rs = runs[n]
                    results.append(
                        {
                            "name": n,
                            "mode": mode,
                            "connections": c,
                            "rps": statistics.median(x["rps"] for x in rs),
                            "p50_ms": statistics.median(x["p50_ms"] for x in rs),
                            "cpu_us": statistics.median(x["cpu_us"] for x in rs),
                            "cpu_share": statistics.median(x["cpu_share"] for x in rs),
                            "failures": sum(x["non2xx"] for x in rs),
                            "socket_errors": "; ".join(sorted({x["socket_errors"] for x in rs if x["socket_errors"]})),
                            "runs": rs,
                        }
                    )
    finally:
        for s in reversed(procs):
            s.stop()
    meta = {
        "command": command,
        "runs": args.runs,
        "seconds": args.seconds,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_after": os.getloadavg(),
        "versions": versions(py),
    }
    out = Path(args.out)
    out.with_name("results-stack.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_report(out, meta, results)
    return 0


def write_report(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    lines = [
        "# The I/O stack: servers and upstream clients (issue 22)",
        "",
        f"Command: `{meta['command']}` ({meta['runs']} interleaved rounds of {meta['seconds']} s per case, order "
        "rotating; medians; wrk -t1 with bench/post.lua; each pass-through pinned alone to CPU 0, wrk and the nginx "
        f"upstream on CPU 1). Machine: {meta['cpus']} CPUs, Python {meta['python']}, {meta['date']}, load average "
        f"after the run {meta['load_avg_after'][0]:.2f}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "Server CPU per request (µs; lower is better) and requests/s, server + client. `raw` is an asyncio protocol "
        "on httptools with nothing else (bench/stack_app.py): the floor, not a product.",
        "",
    ]
    cases = sorted({(r["mode"], r["connections"]) for r in results})
    for mode, c in cases:
        rows = [r for r in results if r["mode"] == mode and r["connections"] == c]
        base = next((r for r in rows if r["name"] == "uvicorn+aiohttp"), None)
        lines += [
            f"### {'streamed' if mode == 'stream' else 'non-streamed'}, {c} connection{'s' if c > 1 else ''}",
            "",
            "| server + client | CPU µs/request | vs uvicorn+aiohttp | requests/s | vs uvicorn+aiohttp | p50 ms "
            "| share of CPU 0 | failures |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in sorted(rows, key=lambda r: r["cpu_us"]):
            cpu = f"{r['cpu_us'] / base['cpu_us']:.2f}" if base and r["name"] != "direct" else "-"
            rps = f"{r['rps'] / base['rps']:.2f}" if base else "-"
            bad = f"{r['failures']} non-2xx; {r['socket_errors']}" if r["failures"] or r["socket_errors"] else ""
            lines.append(
                f"| {r['name']} | {r['cpu_us']:.0f} | {cpu} | {r['rps']:.0f} | {rps} | {r['p50_ms']:.3f} "
                f"| {r['cpu_share']:.0%} | {bad} |"
            )
        lines.append("")
    lines += ["![stack](results-stack.png)", ""]
    out.write_text("\n".join(lines))
    plot(results, out.with_name("results-stack.png"))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    cases = sorted({(r["mode"], r["connections"]) for r in results})
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 7), squeeze=False)
    for ax, (mode, c) in zip(axes[0], cases, strict=True):
        rows = sorted(
            (r for r in results if r["mode"] == mode and r["connections"] == c and r["name"] != "direct"),
            key=lambda r: r["cpu_us"],
        )
        colours = ["tab:green" if "raw" in r["name"] else "tab:blue" for r in rows]
        ax.barh([r["name"] for r in rows], [r["cpu_us"] for r in rows], color=colours)
        ax.invert_yaxis()
        ax.set_title(f"{'streamed' if mode == 'stream' else 'non-streamed'}, {c} conn.")
        ax.set_xlabel("server CPU µs per request (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
