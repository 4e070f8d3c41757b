"""Which HTTP server to run the gateway's ASGI app on (issue 17): the bare pass-through app under four servers.

    .venv/bin/python bench/servers.py                       # 5 rounds of 5 s per server (about 3 minutes)
    .venv/bin/python bench/servers.py --runs 3 --seconds 3  # a quicker look

Contenders, each serving bench/passthrough.py's app (uvloop, one process) pinned alone to CPU 0:
  uvicorn-httptools  uvicorn + httptools, as the gateway runs today (the project's venv)
  uvicorn-edge       the same with portcullis.edge's EdgeProtocol (head size/time, body time, connection caps);
                     edge.py is imported from --edge-src (a source tree holding it), not the live tree
  granian            Granian, ASGI interface, uvloop, 1 worker, HTTP/1 only
  hypercorn          Hypercorn, h11, uvloop worker
Granian and Hypercorn run from a virtualenv of their own (--alt-venv; make it with
`python3 -m venv /tmp/srvvenv && /tmp/srvvenv/bin/pip install granian hypercorn aiohttp orjson uvloop`),
so the project's venv stays untouched. The nginx fixed-response upstream (bench/nginx.conf.template) and
wrk (-t1, bench/post.lua) share CPU 1, as in bench/run.py. Rounds are interleaved (every server once per
round, the order rotating each round) so the machine's drift lands on all alike; the report shows medians
of requests/s, latency, and the server's CPU time per request (utime + stime of the server and its child
processes, from /proc/<pid>/stat, before and after each round).
Writes bench/RESULTS-servers.md and bench/results-servers.json.
"""

from __future__ import annotations

import argparse
import json
import os
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

from harness import Server, cpu_seconds, free_port, logger, pinned, wrk  # bench/ is on the path when this script runs

HERE = Path(__file__).resolve().parent
PY = sys.executable
log = logger("servers")

BODY = (
    b'{"model":"bench","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"temperature":0}'
)

# The app module the alternative servers import (`servers_app:app`): passthrough.make_app on the upstream.
APP_MODULE = """\
import os
import sys
import types

try:
    import uvicorn  # noqa: F401  (passthrough imports it for its __main__ only)
except ImportError:
    sys.modules["uvicorn"] = types.ModuleType("uvicorn")
import passthrough
app = passthrough.make_app(os.environ["BENCH_UPSTREAM"])
"""

# uvicorn with portcullis.edge's protocol, as the gateway would run it.
EDGE_LAUNCHER = """\
import sys
import uvicorn
import passthrough
from portcullis.edge import Edge, EdgeLimits
upstream, port = sys.argv[1], int(sys.argv[2])
config = uvicorn.Config(
    passthrough.make_app(upstream), host="127.0.0.1", port=port, loop="uvloop",
    http=Edge(EdgeLimits()).protocol_class(), ws="none", access_log=False, log_level="warning", lifespan="on",
)
uvicorn.Server(config).run()
"""

# What each server offers natively, from its --help / documentation and source (versions in the report).
NATIVE: dict[str, dict[str, str]] = {
    "uvicorn-httptools": {
        "head size limit": "no (httptools buffers an unfinished head without bound; `h11_max_incomplete_event_size` "
        "exists only for `--http h11`)",
        "whole-head deadline": "no",
        "body deadline": "no",
        "idle keep-alive timeout": "yes: `--timeout-keep-alive` (5 s), armed after a response only (not before a "
        "first request), disarmed by any byte",
        "global connection cap": "partial: `--limit-concurrency` answers 503 to requests once connections or tasks "
        "reach it; connections are still accepted and held",
        "per-address cap": "no",
    },
    "uvicorn-edge": {
        "head size limit": "yes: `head_max_bytes` (64 KiB, 431)",
        "whole-head deadline": "yes: `head_timeout_s` (10 s, from connect / first byte of a kept-alive request; 408)",
        "body deadline": "yes: `body_timeout_s` (120 s, 408)",
        "idle keep-alive timeout": "yes: `keep_alive_s` (75 s)",
        "global connection cap": "yes: `max_connections` (from RLIMIT_NOFILE; evicts the oldest idle, else 503)",
        "per-address cap": "yes: `max_connections_per_client` (1024, 503)",
    },
    "granian": {
        "head size limit": "indirect: `--http1-buffer-size` (hyper `max_buf_size`, default 417792 B, min 8192): a "
        "head that does not fit the read buffer is refused (431); hyper also caps the header count",
        "whole-head deadline": "yes: `--http1-header-read-timeout` (ms, default 30000, at most 60000; hyper's "
        "`header_read_timeout`, from connect). Only with `--http 1`: under `--http auto` (the default) a connection "
        "that sends nothing was still open after 8 s with the timeout at 2 s (checked by hand; a partial head was "
        "closed at 2 s in both modes); this bench uses `--http 1`",
        "body deadline": "no",
        "idle keep-alive timeout": "shared: the same `--http1-header-read-timeout` bounds the wait for the next "
        "request's head (hyper >= 1.6); `--http1-keep-alive/--no-http1-keep-alive` only switches it on or off",
        "global connection cap": "yes, as a queue: `--backpressure` (per worker, default backlog/workers = 1024) is a "
        "semaphore on the accept loop held for a connection's life: past it, new connections wait in the kernel "
        "backlog (no refusal, no eviction; idle keep-alives hold permits)",
        "per-address cap": "no",
    },
    "hypercorn": {
        "head size limit": "yes: `h11_max_incomplete_size` (config file only, 16 KiB; h11's max_incomplete_event_size)",
        "whole-head deadline": "shared: `--keep-alive` / `keep_alive_timeout` (5 s) runs from connect and from each "
        "response's end until a whole head has been parsed, so it bounds a trickled head too",
        "body deadline": "no (`--read-timeout` is per read, an inactivity limit: a trickled body passes)",
        "idle keep-alive timeout": "yes: `--keep-alive` (5 s; same timer as above)",
        "global connection cap": "no (`--backlog` is the kernel queue only)",
        "per-address cap": "no",
    },
}
LIMITS = list(NATIVE["uvicorn-httptools"])


def versions(alt_py: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps({p: m.version(p) for p in ('uvicorn', 'httptools', 'granian', 'hypercorn', 'h11', "
        "'uvloop', 'aiohttp') if any(d.metadata['Name'].lower() == p for d in m.distributions())}))"
    )
    out: dict[str, str] = {}
    for label, py in (("project", PY), ("alt", alt_py)):
        found = json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout)
        out.update({f"{k} ({label} venv)": v for k, v in found.items()})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--alt-venv", default="/tmp/srvvenv", help="virtualenv with granian and hypercorn")
    parser.add_argument("--edge-src", default=str(HERE.parent / "src"), help="source tree holding portcullis/edge.py")
    parser.add_argument("--only", default=None, help="comma-separated server names")
    parser.add_argument("--out", default=str(HERE / "RESULTS-servers.md"))
    parser.add_argument("--from-json", default=None, help="re-render the report from a results-servers.json, no run")
    parser.add_argument("--ab-json", default=None, help="with --from-json: a focused uvicorn A/B run to quote")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        ab = json.loads(Path(args.ab_json).read_text()) if args.ab_json else None
        write_report(Path(args.out), data["meta"], data["results"], ab)
        return 0
    py = os.path.relpath(PY, HERE.parent) if PY.startswith(str(HERE.parent)) else PY
    command = shlex.join([py, "bench/servers.py", *sys.argv[1:]])
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    alt_bin = Path(args.alt_venv) / "bin"
    if not (alt_bin / "granian").exists() or not (alt_bin / "hypercorn").exists():
        sys.exit(f"{alt_bin} lacks granian or hypercorn: see this script's docstring")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))

    work = Path(tempfile.mkdtemp(prefix="portcullis-servers-"))
    (work / "servers_app.py").write_text(APP_MODULE)
    (work / "edge_launcher.py").write_text(EDGE_LAUNCHER)
    procs: list[Server] = []
    try:
        nginx_port = free_port()
        conf = (HERE / "nginx.conf.template").read_text().replace("{dir}", str(work)).replace("{port}", str(nginx_port))
        (work / "nginx.conf").write_text(conf)
        upstream = f"http://127.0.0.1:{nginx_port}"
        nginx = Server(
            "nginx", pinned(1, [nginx_bin, "-c", str(work / "nginx.conf"), "-g", "daemon off;"]), None, work, cwd=work
        )
        procs.append(nginx)
        nginx.wait_ready(upstream + "/health")

        app_path = f"{work}:{HERE}"
        ports = {name: free_port() for name in NATIVE}
        specs: dict[str, tuple[list[str], dict[str, str]]] = {
            "uvicorn-httptools": (
                [PY, str(HERE / "passthrough.py"), "--upstream", upstream, "--port", str(ports["uvicorn-httptools"])],
                {},
            ),
            "uvicorn-edge": (
                [PY, str(work / "edge_launcher.py"), upstream, str(ports["uvicorn-edge"])],
                {"PYTHONPATH": f"{args.edge_src}:{HERE}"},
            ),
            "granian": (
                [
                    str(alt_bin / "granian"),
                    "--interface",
                    "asgi",
                    "--loop",
                    "uvloop",
                    "--workers",
                    "1",
                    "--http",
                    "1",
                    "--no-ws",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports["granian"]),
                    "--log-level",
                    "warning",
                    "servers_app:app",
                ],
                {"PYTHONPATH": app_path, "BENCH_UPSTREAM": upstream},
            ),
            "hypercorn": (
                [
                    str(alt_bin / "hypercorn"),
                    "-k",
                    "uvloop",
                    "-w",
                    "1",
                    "-b",
                    f"127.0.0.1:{ports['hypercorn']}",
                    "--log-level",
                    "warning",
                    "servers_app:app",
                ],
                {"PYTHONPATH": app_path, "BENCH_UPSTREAM": upstream},
            ),
        }
        names = [n for n in specs if not args.only or n in args.only.split(",")]
        servers: dict[str, Server] = {}
        for name in names:
            cmd, env = specs[name]
            servers[name] = Server(name, pinned(0, cmd), None, work, env, cwd=work)
            procs.append(servers[name])
        urls = {name: f"http://127.0.0.1:{ports[name]}/v1/chat/completions" for name in names}
        for name in names:
            servers[name].wait_ready(urls[name], body=BODY)
            log(f"{name} up (pid {servers[name].proc.pid}): {shlex.join(servers[name].args)}")

        for name in names:  # warm-up: pools filled, code paths hot
            wrk(urls[name], args.connections, 2, failures_ok=True)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i in range(args.runs):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                time.sleep(1.0)
                pid = servers[name].proc.pid
                before = cpu_seconds([pid])
                sample = wrk(urls[name], args.connections, args.seconds, failures_ok=True)
                used = cpu_seconds([pid]) - before
                sample["cpu_s"] = used
                sample["cpu_us"] = used / max(1, sample["requests"]) * 1e6
                sample["cpu_share"] = used / args.seconds  # of one core: what the server got of CPU 0
                samples[name].append(sample)
                log(
                    f"  {name:18s} round {i + 1}/{args.runs}: {sample['rps']:7.0f} req/s  "
                    f"{sample['cpu_us']:5.0f} µs CPU/req  p50 {sample['p50_ms']:.2f} ms  p99 {sample['p99_ms']:.2f} ms"
                    + (f"  non-2xx {sample['non2xx']}" if sample["non2xx"] else "")
                    + (f"  socket errors: {sample['socket_errors']}" if sample["socket_errors"] else "")
                )
        results = [
            {
                "name": name,
                "command": shlex.join(specs[name][0]),
                "rps": statistics.median(s["rps"] for s in runs),
                "cpu_us": statistics.median(s["cpu_us"] for s in runs),
                "p50_ms": statistics.median(s["p50_ms"] for s in runs),
                "p99_ms": statistics.median(s["p99_ms"] for s in runs),
                "cpu_share": statistics.median(s["cpu_share"] for s in runs),
                "non2xx": sum(s["non2xx"] for s in runs),
                "socket_errors": [s["socket_errors"] for s in runs if s["socket_errors"]],
                "runs": runs,
            }
            for name, runs in samples.items()
        ]
    finally:
        for p in reversed(procs):
            p.stop()

    meta = {
        "command": command,
        "runs": args.runs,
        "seconds": args.seconds,
        "connections": args.connections,
        "edge_src": args.edge_src,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_after": os.getloadavg(),
        "versions": versions(str(alt_bin / "python")),
    }
    out = Path(args.out)
    (out.parent / "results-servers.json").write_text(
        json.dumps({"meta": meta, "results": results, "native_limits": NATIVE}, indent=1)
    )
    write_report(out, meta, results)
    log(f"wrote {out} and {out.parent / 'results-servers.json'}")
    return 0


def write_report(
    out: Path, meta: dict[str, Any], results: list[dict[str, Any]], ab: dict[str, Any] | None = None
) -> None:
    """ab: a results-servers.json of a focused `--only uvicorn-httptools,uvicorn-edge` run, quoted in the conclusion."""
    by = {r["name"]: r for r in results}
    base = by.get("uvicorn-httptools")
    lines = [
        "# HTTP server for the gateway's ASGI app (issue 17)",
        "",
        f"Command: `{meta['command']}` ({meta['runs']} interleaved rounds of {meta['seconds']} s per server, "
        f"order rotating each round; medians; wrk -t1 -c{meta['connections']} with bench/post.lua; the server "
        "under test alone on CPU 0, wrk and the nginx fixed-response upstream on CPU 1). App: bench/passthrough.py's "
        f"(aiohttp upstream, orjson, uvloop). Machine: {meta['cpus']} CPUs, Python {meta['python']}, "
        f"{meta['date']}, load average after the run {meta['load_avg_after'][0]:.2f} (other jobs were running).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "| server | requests/s | vs uvicorn-httptools | server CPU µs/request | vs uvicorn-httptools "
        "| server CPU, share of one core | p50 ms | p99 ms | requests/s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rps_ratio = f"{r['rps'] / base['rps']:.2f}" if base else "-"
        cpu_ratio = f"{r['cpu_us'] / base['cpu_us']:.2f}" if base else "-"
        per_round = ", ".join(f"{s['rps']:.0f}" for s in r["runs"])
        lines.append(
            f"| {r['name']} | {r['rps']:.0f} | {rps_ratio} | {r['cpu_us']:.0f} | {cpu_ratio} | {r['cpu_share']:.0%} "
            f"| {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {per_round} |"
        )
    problems = [r for r in results if r["non2xx"] or r["socket_errors"]]
    if problems:
        lines += ["", "Failures seen by wrk:"]
        lines += [f"- {r['name']}: non-2xx {r['non2xx']}; socket errors {r['socket_errors']}" for r in problems]
    lines += ["", "Server commands (each under `taskset -c 0`):", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in results]
    lines += [
        "",
        "## Limits each server offers natively",
        "",
        "| limit | " + " | ".join(NATIVE) + " |",
        "|---|" + "---|" * len(NATIVE),
    ]
    for limit in LIMITS:
        lines.append(f"| {limit} | " + " | ".join(NATIVE[s][limit] for s in NATIVE) + " |")
    lines += ["", "## Conclusion", "", *conclusion(by)]
    if ab:
        a, b = ({r["name"]: r for r in ab["results"]}[n] for n in ("uvicorn-httptools", "uvicorn-edge"))
        lines.append(
            f"- A separate A/B of the two uvicorn contenders (`{ab['meta']['command']}`, {ab['meta']['runs']} rounds): "
            f"uvicorn + httptools {a['cpu_us']:.0f} µs (per round {rounds(a)}), "
            f"uvicorn + edge {b['cpu_us']:.0f} µs (per round {rounds(b)}). "
            "The edge's cost does not stand out of this machine's noise (tens of µs between runs)."
        )
    lines.append("")
    out.write_text("\n".join(lines))


def rounds(r: dict[str, Any]) -> str:
    return ", ".join(f"{x['cpu_us']:.0f}" for x in r["runs"])


def conclusion(by: dict[str, dict[str, Any]]) -> list[str]:
    base, edge, gran, hyp = (by.get(n) for n in ("uvicorn-httptools", "uvicorn-edge", "granian", "hypercorn"))
    if not (base and edge and gran and hyp):
        return ["Not every server was measured in this run."]

    def span(r: dict[str, Any]) -> str:
        return f"{min(x['cpu_us'] for x in r['runs']):.0f}-{max(x['cpu_us'] for x in r['runs']):.0f}"

    def vs(r: dict[str, Any]) -> str:
        return (
            f"{r['rps'] / base['rps']:.2f}x the requests/s and {r['cpu_us'] / base['cpu_us']:.2f}x the CPU per request "
            "of uvicorn + httptools"
        )

    return [
        f"- uvicorn + EdgeProtocol: {vs(edge)}: the limits cost "
        f"{edge['cpu_us'] - base['cpu_us']:+.0f} µs of CPU per request in this run (per round: uvicorn + httptools "
        f"{span(base)} µs, uvicorn + edge {span(edge)} µs).",
        f"- Granian: {vs(gran)}.",
        f"- Hypercorn (h11): {vs(hyp)}.",
        f"- Requests/s here measure the CPU share each server won more than its speed: the machine was loaded by "
        f"other jobs, and the single-threaded Python servers got {base['cpu_share']:.0%} (uvicorn), "
        f"{edge['cpu_share']:.0%} (uvicorn + edge) and {hyp['cpu_share']:.0%} (Hypercorn) of CPU 0, while Granian, "
        f"got {gran['cpu_share']:.0%} (likely because its Rust I/O thread runs beside the Python event loop: more "
        "runnable threads, a larger share of a contended core). CPU time per "
        "request is the comparable figure; the requests/s ratios would not hold on an idle core.",
        "- None of the three alternatives has every limit the edge needs: none caps connections per address or "
        "bounds a body's arrival; Granian's connection cap queues in the kernel backlog instead of refusing or "
        "evicting, and one timeout stands for both the head deadline and the idle keep-alive (Hypercorn likewise).",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
