"""Benchmark: the gateway against the upstream directly, a bare pass-through, and LiteLLM if installed.

    .venv/bin/python bench/run.py                 # full run (about 4 minutes), writes bench/RESULTS.md
    .venv/bin/python bench/run.py --quick         # shorter runs, for a look

Non-streaming chat is driven by wrk (one thread, pinned to CPU 1) at 1 and 32 connections against a
fixed-response nginx upstream (pinned to CPU 1 as well: it answers in microseconds); the server under
test is pinned alone to CPU 0. Each case runs --runs times; the table shows medians. A streaming case
measures the time to first token the gateway adds, and the memory each open stream costs it.
Needs wrk and nginx (Debian packages: `apt-get install wrk nginx-light`), and matplotlib for the plot
(`pip install -e '.[bench]'`). LiteLLM is measured when `--litellm BIN` points at its `litellm`
executable, installed in a virtualenv of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import quota_cost  # bench/ is on the path when this script runs
from harness import Server, cpu_seconds, free_port, logger, pinned, wrk

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


log = logger("bench")


def ensure_tools() -> None:
    tools = ("wrk", "nginx", "redis-server")
    missing = [t for t in tools if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {missing} from Debian's packages")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk", "nginx-light", "redis-server"], check=True)
    elif missing:
        sys.exit(f"bench needs {missing}: apt-get install wrk nginx-light redis-server")


def measure(
    targets: list[tuple[str, str, str | None]],
    connections: int,
    runs: int,
    seconds: float,
    pids: dict[str, list[int]],
) -> list[dict[str, Any]]:
    """Every target once per round, round after round: a drift of the machine lands on all of them alike,
    so the ratios between targets hold even when the absolute figures wander. The order rotates each
    round, so no target always follows the same one (a server still finishing its work, flushing logs
    and usage records, would otherwise always tax the same neighbour); a pause before each sample lets
    that work end. Each sample also records the server's CPU time per request: a cost that does not
    depend on whether the load generator kept the server busy."""
    # LiteLLM's answers at 32 connections can pass wrk's 2 s timeout on a loaded machine: counted, not fatal.
    for name, url, key in targets:
        wrk(url, connections, min(2.0, seconds), key, failures_ok=name == "litellm")  # warm-up: pools filled
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in targets}
    for i in range(runs):
        shift = i % len(targets)
        for name, url, key in targets[shift:] + targets[:shift]:
            time.sleep(1.0)
            cpu_before = cpu_seconds(pids[name])
            got = wrk(url, connections, seconds, key, failures_ok=name == "litellm")
            sample = {k: got[k] for k in ("rps", "p50_ms", "p99_ms")}  # the fields results.json has always had
            used = cpu_seconds(pids[name]) - cpu_before
            sample["cpu_us"] = used / max(1.0, sample["rps"] * max(1, round(seconds))) * 1e6
            samples[name].append(sample)
            log(
                f"  {name:14s} c={connections:<3d} round {i + 1}/{runs}: {sample['rps']:8.0f} req/s  "
                f"p50 {sample['p50_ms']:.3f} ms  p99 {sample['p99_ms']:.3f} ms"
            )
    return [
        {
            "name": name,
            "connections": connections,
            "rps": statistics.median(s["rps"] for s in runs_of),
            "p50_ms": statistics.median(s["p50_ms"] for s in runs_of),
            "p99_ms": statistics.median(s["p99_ms"] for s in runs_of),
            "cpu_us": statistics.median(s["cpu_us"] for s in runs_of),
            "runs": runs_of,
        }
        for name, runs_of in samples.items()
    ]


BENCH_GATEWAY_KEY = "pc-00000000000be0c4-bench-key-0123456789abcdefghijklmnopqr"
LITELLM_KEY = "sk-portcullis-bench-0123456789abcdef"


# Limits of the default tiers' shape (requests per minute and per day, tokens per minute, concurrency)
# with values never reached during a run: the cost of checking them.
BENCH_LIMITS = quota_cost.LIMITS
# The harness runs its own redis-server, pinned beside wrk and nginx (CPU 1), so that Redis's work
# does not land on the gateway's core. Set PORTCULLIS_BENCH_REDIS_URL to use another one instead.
REDIS_URL = os.environ.get("PORTCULLIS_BENCH_REDIS_URL")


def start_gateway(
    servers: list[Server],
    work: Path,
    upstream: str,
    name: str,
    *,
    keys: bool,
    quota: str | None = None,
    cache: bool = False,
    src: str | None = None,
) -> int:
    """quota: None (the bench key's tier has no limits), "memory" or "redis" (it has BENCH_LIMITS).
    cache: the response cache on (the bench request is deterministic: every request after the first
    is a hit); off, every request goes upstream. src: run the gateway from this source tree instead
    (another build's `src/`, for an A/B)."""
    port = free_port()
    config = work / f"{name}.yaml"
    auth = {} if keys else {"api_keys": False, "allow_anonymous": True}
    store: dict[str, Any] = {"database_url": f"sqlite+aiosqlite:///{work}/{name}.db", "auto_migrate": True}
    if quota == "redis":
        store["redis_url"] = REDIS_URL
    config.write_text(
        json.dumps(
            {
                "server": {"port": port},
                "store": store,
                "auth": auth,
                # The bootstrap key gets the highest-priority tier; anonymous callers get "free".
                "tiers": {"free": {"priority": 0}, "bench": {"priority": 1, "limits": BENCH_LIMITS if quota else {}}},
                "quota": {"backend": quota or "memory"},
                "cache": {"enabled": cache},
                "upstream": {"max_connections_per_replica": 10000},
                "models": {"bench": {"deployments": [{"url": upstream}]}},
            }
        )
    )
    env = {
        "PORTCULLIS_KEY_SECRET": "bench-secret-0123456789abcdef0123456789abcdef",
        "PORTCULLIS_BOOTSTRAP_ADMIN_KEY": BENCH_GATEWAY_KEY,
    }
    if src is not None:
        env["PYTHONPATH"] = src
    servers.append(
        Server(
            name,
            pinned(0, [PY, "-m", "portcullis", "serve", "--config", str(config)]),
            f"http://127.0.0.1:{port}/readyz",
            work,
            env=env,
        )
    )
    return port


def levels_key(port: int) -> str:
    """A key of a team of an organisation on a running gateway, with limits of BENCH_LIMITS' shape at all three
    levels (its tier's, the team's, the organisation's): what three levels cost beside one."""
    import urllib.request

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=json.dumps(body).encode(),
            headers={"authorization": f"Bearer {BENCH_GATEWAY_KEY}", "content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    org = post("/admin/organizations", {"name": "bench", "limits": BENCH_LIMITS})
    team = post("/admin/teams", {"org_id": org["id"], "name": "bench", "limits": BENCH_LIMITS})
    return str(post("/admin/keys", {"user": "bench", "tier": "bench", "team_id": team["id"]})["key"])


# -- streaming ------------------------------------------------------------------------------------


def cli_start(runs: int = 15) -> dict[str, float]:
    """`portcullis --help` and `portcullis keys create --help`, wall time from start to exit (s), median of `runs`."""
    exe = str(Path(PY).parent / "portcullis")
    out = {}
    for name, argv in (("help", ["--help"]), ("keys_create_help", ["keys", "create", "--help"])):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([exe, *argv], stdout=subprocess.DEVNULL, check=True)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    log(f"  CLI: portcullis --help {out['help']:.3f} s, keys create --help {out['keys_create_help']:.3f} s")
    return out


async def _ttft(url: str, model: str, n: int) -> list[float]:
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    out = []
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {BENCH_GATEWAY_KEY}"}) as session:
        for _ in range(n):
            t0 = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                async for line in resp.content:
                    if b'"content":"' in line or b'"content": "' in line:
                        out.append((time.perf_counter() - t0) * 1000)
                        break
                await resp.read()
    return out


async def _open_streams(url: str, n: int, server: Server) -> tuple[int, float]:
    """Open n streams that stay open; return the server's RSS (KiB) once all have started, and the median time to
    first token of 20 more requests made while they are all open (ms)."""
    import aiohttp

    body = {"model": "stream", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": True}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=600),
        headers={"authorization": f"Bearer {BENCH_GATEWAY_KEY}"},
    ) as session:
        started = asyncio.Event()
        count = 0
        responses = []

        failed = 0
        why: collections.Counter[str] = collections.Counter()  # each failure's status and error code

        async def one() -> None:
            nonlocal count, failed
            try:
                resp = await session.post(url + "/v1/chat/completions", json=body)
                responses.append(resp)
                line = await resp.content.readline()  # the first event has arrived: the stream is open end to end
                if resp.status != 200:
                    failed += 1
                    code = re.search(rb'"code":\s*"([^"]+)"', line + await resp.content.read(2048))
                    why[f"{resp.status} {code.group(1).decode() if code else ''}".strip()] += 1
            except (aiohttp.ClientError, OSError) as exc:
                failed += 1
                why[type(exc).__name__] += 1
            count += 1
            if count == n:
                started.set()

        tasks = []
        for i in range(n):  # in waves of 500: a thundering herd of 10,000 would time the simulator out
            tasks.append(asyncio.create_task(one()))
            if i % 500 == 499:
                await asyncio.sleep(0.5)
        await asyncio.wait_for(started.wait(), timeout=900)
        if failed:
            raise RuntimeError(f"{failed} of {n} streams were refused or failed: {dict(why.most_common(5))}")
        await asyncio.sleep(1.0)  # let allocations settle
        rss = server.rss_kib()
        loaded_ttft = statistics.median(await _ttft(url, "fast", 20))
        for r in responses:
            r.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return rss, loaded_ttft


# -- main -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--streams", default="100,1000,10000", help="open-stream counts for the memory case")
    parser.add_argument("--litellm", default=os.environ.get("LITELLM_BIN"), help="path to a litellm executable")
    parser.add_argument("--quick", action="store_true", help="1 run of 3 s, streams up to 1000")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--from-json", default=None, help="re-render the report from a results.json, no run")
    parser.add_argument(
        "--only",
        default=None,
        help="measure only these targets (comma-separated names), skip streaming: a focused A/B with more rounds",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="another build's source tree (e.g. a git worktree of an earlier commit): adds a 'gateway-baseline' "
        "target, configured like 'gateway', for an interleaved A/B",
    )
    args = parser.parse_args()
    shown = ["PATH/TO/litellm" if a == args.litellm else a for a in sys.argv[1:]]
    args.command = " ".join([".venv/bin/python bench/run.py", *shown])
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        meta = saved.get("meta", {})
        args.runs, args.seconds, args.quick = meta.get("runs", args.runs), meta.get("seconds", args.seconds), False
        args.only = meta.get("only")
        args.command = meta.get("command", args.command)
        connections = sorted({r["connections"] for r in saved["non_streaming"]})
        write_report(saved["non_streaming"], saved["streaming"], Path(args.out), args, connections)
        return 0
    if args.quick:
        args.runs, args.seconds, args.streams = 1, 3, "100,1000"
    ensure_tools()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))
    connections = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    servers: list[Server] = []
    results: list[dict[str, Any]] = []
    try:
        nginx_port = free_port()
        conf = (HERE / "nginx.conf.template").read_text().replace("{dir}", str(work)).replace("{port}", str(nginx_port))
        (work / "nginx.conf").write_text(conf)
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        upstream = f"http://127.0.0.1:{nginx_port}"
        servers.append(
            Server(
                "nginx",
                pinned(1, [nginx_bin, "-c", str(work / "nginx.conf"), "-g", "daemon off;"]),
                upstream + "/health",
                work,
            )
        )
        pt_port = free_port()
        servers.append(
            Server(
                "passthrough",
                pinned(0, [PY, str(HERE / "passthrough.py"), "--upstream", upstream, "--port", str(pt_port)]),
                upstream + "/health",
                work,
            )
        )
        global REDIS_URL
        if REDIS_URL is None:
            redis_port = free_port()
            REDIS_URL = f"redis://127.0.0.1:{redis_port}/0"
            redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
            servers.append(
                Server(
                    "redis",
                    pinned(1, [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]),
                    REDIS_URL,
                    work,
                )
            )
        time.sleep(1.0)
        # The gateway as an operator runs it: API keys on (one bench key, cached after the first
        # request), metrics and access logs on. And the same with keys off, to show what auth costs.
        gw_port = start_gateway(servers, work, upstream, "gateway", keys=True)
        gw_open_port = start_gateway(servers, work, upstream, "gateway-nokeys", keys=False)
        # And with rate limits on every window, concurrency and all, counted in process or in Redis.
        gw_mem_port = start_gateway(servers, work, upstream, "gateway-limits-memory", keys=True, quota="memory")
        gw_redis_port = start_gateway(servers, work, upstream, "gateway-limits-redis", keys=True, quota="redis")
        # And the same limits at three levels: the key's, its team's and its organisation's (issue 20).
        gw_levels_port = start_gateway(servers, work, upstream, "gateway-levels-redis", keys=True, quota="redis")
        levels = levels_key(gw_levels_port)
        # And answering from its response cache: no upstream involved.
        gw_hit_port = start_gateway(servers, work, upstream, "gateway-cache-hit", keys=True, cache=True)
        baseline_port = None
        if args.baseline:
            src = str(Path(args.baseline).resolve() / "src")
            baseline_port = start_gateway(servers, work, upstream, "gateway-baseline", keys=True, src=src)
        targets = [
            ("direct", upstream, None),
            ("passthrough", f"http://127.0.0.1:{pt_port}", None),
            ("gateway", f"http://127.0.0.1:{gw_port}", BENCH_GATEWAY_KEY),
            ("gateway-nokeys", f"http://127.0.0.1:{gw_open_port}", None),
            ("gateway-limits-memory", f"http://127.0.0.1:{gw_mem_port}", BENCH_GATEWAY_KEY),
            ("gateway-limits-redis", f"http://127.0.0.1:{gw_redis_port}", BENCH_GATEWAY_KEY),
            ("gateway-levels-redis", f"http://127.0.0.1:{gw_levels_port}", levels),
            ("gateway-cache-hit", f"http://127.0.0.1:{gw_hit_port}", BENCH_GATEWAY_KEY),
        ]
        if baseline_port is not None:
            targets.append(("gateway-baseline", f"http://127.0.0.1:{baseline_port}", BENCH_GATEWAY_KEY))
        if args.litellm:
            lt_port = free_port()
            (work / "litellm.yaml").write_text(
                json.dumps(
                    {
                        "model_list": [
                            {
                                "model_name": "bench",
                                "litellm_params": {
                                    "model": "openai/bench",
                                    "api_base": upstream + "/v1",
                                    "api_key": "x",
                                },
                            }
                        ]
                    }
                )
            )
            servers.append(
                Server(
                    "litellm",
                    pinned(
                        0,
                        [
                            args.litellm,
                            "--config",
                            str(work / "litellm.yaml"),
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(lt_port),
                            "--num_workers",
                            "1",
                        ],
                    ),
                    f"http://127.0.0.1:{lt_port}/health/liveliness",
                    work,
                    # loopback only: its bundled cost map, no telemetry
                    env={
                        "LITELLM_MASTER_KEY": LITELLM_KEY,
                        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                        "LITELLM_TELEMETRY": "False",
                    },
                    startup_s=180,
                )
            )
            targets.append(("litellm", f"http://127.0.0.1:{lt_port}", LITELLM_KEY))
        if args.only:
            wanted = set(args.only.split(","))
            targets = [t for t in targets if t[0] in wanted]
        chat = [(name, base + "/v1/chat/completions", key) for name, base, key in targets]
        by_server = {s.name: [s.proc.pid] for s in servers}
        pids = {name: by_server["nginx" if name == "direct" else name] for name, _, _ in targets}
        for c in connections:
            results.extend(measure(chat, c, args.runs, args.seconds, pids))

        stream_results: dict[str, Any] = {}
        if not args.only:
            log("streaming: added time to first token, memory per open stream")
            try:
                stream_results = run_streaming(work, [int(n) for n in args.streams.split(",")])
            except Exception as exc:  # the rest of the run is worth its report: say what failed in it
                log(f"streaming case failed: {exc!r}")
                stream_results = {"failed": repr(exc)}
        stream_results["cli"] = cli_start()
        log("authentication cost on a cached key (bench/auth_cost.py, pinned to CPU 0)")
        auth_cost = json.loads(
            subprocess.run(
                pinned(0, [PY, str(HERE / "auth_cost.py")]), capture_output=True, text=True, check=True
            ).stdout
        )
        log(f"  {auth_cost['auth_us_per_request']:.2f} µs per request")
        stream_results["auth"] = auth_cost
        log("quota admission + settlement cost (bench/quota_cost.py, pinned to CPU 0)")
        quota_cost = json.loads(
            subprocess.run(
                pinned(0, [PY, str(HERE / "quota_cost.py"), "--redis", REDIS_URL]),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        log(
            f"  memory {quota_cost['memory_us_per_request']:.1f} µs, Redis "
            f"{quota_cost['redis_cpu_us_per_request_32_in_flight']:.1f} µs CPU per request"
        )
        stream_results["quota"] = quota_cost
        log("route stage cost (bench/route_cost.py, pinned to CPU 0)")
        route_cost = json.loads(
            subprocess.run(
                pinned(0, [PY, str(HERE / "route_cost.py")]), capture_output=True, text=True, check=True
            ).stdout
        )
        plain, routed = route_cost["route_us_per_request"], route_cost["router_us_per_request"]
        log(f"  plain model {plain:.1f} µs, router {routed:.1f} µs")
        stream_results["route"] = route_cost
    finally:
        for s in reversed(servers):
            s.stop()
    write_report(results, stream_results, Path(args.out), args, connections)
    return 0


def run_streaming(work: Path, counts: list[int]) -> dict[str, Any]:
    sim_port = free_port()
    sim = Server(
        "sim-stream",
        pinned(
            1,
            [
                PY,
                "-m",
                "portcullis",
                "sim",
                "--port",
                str(sim_port),
                "--slots",
                "10000",
                "--tokens-per-s",
                "0.05",
                "--default-max-tokens",
                "1000",
            ],
        ),
        f"http://127.0.0.1:{sim_port}/health",
        work,
    )
    fast_port = free_port()
    fast = Server(
        "sim-fast",
        pinned(1, [PY, "-m", "portcullis", "sim", "--port", str(fast_port), "--slots", "64"]),
        f"http://127.0.0.1:{fast_port}/health",
        work,
    )
    gw_port = free_port()
    cfg = work / "gateway-stream.yaml"
    cfg.write_text(
        json.dumps(
            {
                # Thousands of open streams from one address: lift the per-address connection cap.
                "server": {"port": gw_port, "access_log": True, "max_connections_per_client": 0},
                # 10,000 streams opened at once keep the simulator (one Python process) busy for longer than the
                # default limits allow a first token or a silence: the memory of an open stream is the question.
                "upstream": {
                    "max_connections_per_replica": 20000,
                    # (and a connect: thousands of connections at once overflow the simulator's accept queue, and
                    # the kernel's SYN retries take longer than the default 5 s; the breaker then refused the rest)
                    "timeouts": {"connect_s": 120, "ttft_s": 600, "idle_s": 600, "total_s": 3600},
                },
                "health": {"timeout_s": 30, "down_after": 10},
                "store": {"database_url": f"sqlite+aiosqlite:///{work}/gateway-stream.db", "auto_migrate": True},
                "models": {
                    "stream": {"deployments": [{"url": f"http://127.0.0.1:{sim_port}"}]},
                    "fast": {"deployments": [{"url": f"http://127.0.0.1:{fast_port}"}]},
                },
            }
        )
    )
    gateway = Server(
        "gateway-stream",
        pinned(0, [PY, "-m", "portcullis", "serve", "--config", str(cfg)]),
        f"http://127.0.0.1:{gw_port}/readyz",
        work,
        env={
            "PORTCULLIS_KEY_SECRET": "bench-secret-0123456789abcdef0123456789abcdef",
            "PORTCULLIS_BOOTSTRAP_ADMIN_KEY": BENCH_GATEWAY_KEY,
        },
    )
    try:
        direct = asyncio.run(_ttft(f"http://127.0.0.1:{fast_port}", "fast", 200))
        via = asyncio.run(_ttft(f"http://127.0.0.1:{gw_port}", "fast", 200))
        ttft = {"direct_ms": statistics.median(direct), "gateway_ms": statistics.median(via)}
        ttft["added_ms"] = ttft["gateway_ms"] - ttft["direct_ms"]
        log(f"  TTFT median direct {ttft['direct_ms']:.3f} ms, via gateway {ttft['gateway_ms']:.3f} ms")
        time.sleep(1.0)
        idle = gateway.rss_kib()
        memory = []
        # Each open stream holds two descriptors in the gateway (its client's socket and its upstream's); the
        # gateway caps its connections at what its descriptor limit allows (edge.py), and a process cannot raise its
        # hard limit here without CAP_SYS_RESOURCE. A count past that cap is measured at the cap, less room for the
        # 20 TTFT requests, and the report says so.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fits = (hard - 128) // 2 - 250  # (and room for the 20 TTFT requests, probes, the database, logs)
        for asked in counts:
            n = min(asked, fits)
            if n < asked:
                log(f"  {asked} streams need {2 * asked + 128} descriptors, the hard limit is {hard}: measuring {n}")
            rss, loaded = asyncio.run(_open_streams(f"http://127.0.0.1:{gw_port}", n, gateway))
            per = (rss - idle) * 1024 / n
            memory.append(
                {
                    "streams": n,
                    "asked": asked,
                    "nofile_hard": hard,
                    "idle_kib": idle,
                    "rss_kib": rss,
                    "per_stream_bytes": per,
                    "ttft_ms": loaded,
                }
            )
            log(
                f"  {n} open streams: RSS {rss} KiB (idle {idle} KiB) → {per / 1024:.1f} KiB each; TTFT {loaded:.1f} ms"
            )
            time.sleep(2.0)
    finally:
        gateway.stop()
        sim.stop()
        fast.stop()
    return {"ttft": ttft, "memory": memory}


def write_report(
    results: list[dict[str, Any]],
    streaming: dict[str, Any],
    out: Path,
    args: argparse.Namespace,
    connections: list[int],
) -> None:
    by = {(r["name"], r["connections"]): r for r in results}
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{args.command}` "
        f"({args.runs} rounds of {args.seconds:g} s per case, targets interleaved round by round, medians; wrk -t1; "
        "server under test on CPU 0, "
        "wrk and the nginx fixed-response upstream on CPU 1). Machine: "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}.",
        "",
        "Non-streaming chat completions:",
        "",
        "| target | connections | requests/s | p50 ms | p99 ms | requests/s vs pass-through "
        "| p50 added vs direct (ms) | server CPU µs/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in connections:
        base = by.get(("passthrough", c))
        direct = by.get(("direct", c))
        for r in results:
            if r["connections"] != c:
                continue
            ratio = f"{r['rps'] / base['rps']:.2f}" if base else "-"
            added = f"{r['p50_ms'] - direct['p50_ms']:.3f}" if direct else "-"
            cpu = f"{r['cpu_us']:.0f}" if "cpu_us" in r else "-"
            lines.append(
                f"| {r['name']} | {c} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {ratio} | {added} "
                f"| {cpu} |"
            )
    gw1, pt1, gw32, pt32 = (
        by.get(("gateway", 1)),
        by.get(("passthrough", 1)),
        by.get(("gateway", 32)),
        by.get(("passthrough", 32)),
    )
    lines += ["", "Targets (issues 2 and 3):", ""]
    if gw32 and pt32:
        lines.append(
            f"- gateway requests/s at 32 connections = {gw32['rps'] / pt32['rps']:.0%} of the bare pass-through "
            "(target ≥ 50%)"
        )
    if gw1 and pt1 and by.get(("direct", 1)):
        d = by[("direct", 1)]["p50_ms"]
        lines.append(
            f"- median added at 1 connection: gateway {gw1['p50_ms'] - d:.3f} ms, pass-through "
            f"{pt1['p50_ms'] - d:.3f} ms over direct (target: gateway ≤ 0.5 ms)"
        )
    lt = by.get(("litellm", 32))
    lines.append(
        f"- vs LiteLLM at 32 connections: {gw32['rps'] / lt['rps']:.0f}x"
        if lt and gw32
        else "- LiteLLM: not measured in this run (pass `--litellm PATH/TO/litellm`)"
    )
    hit = by.get(("gateway-cache-hit", 32))
    if hit and gw32:
        lines.append(
            f"- cache hits: {hit['rps']:.0f} requests/s at 32 connections = {hit['rps'] / gw32['rps']:.2f}x the "
            f"same gateway going upstream (target ≥ 1.5x); server CPU {hit.get('cpu_us', 0):.0f} µs per hit"
        )
    gwo = by.get(("gateway-nokeys", 32))
    if gw32 and gwo and len(gw32["runs"]) == len(gwo["runs"]):
        per_round = [a["rps"] / b["rps"] for a, b in zip(gw32["runs"], gwo["runs"], strict=True)]
        lines.append(
            "- keys on / keys off, round by round at 32 connections: "
            + ", ".join(f"{r:.0%}" for r in per_round)
            + " (this machine is noisy: read the median, not one round)"
        )
    if gw32 and gwo and "auth" in streaming:
        lines.append(
            f"- authentication: gateway with API keys = {gw32['rps'] / gwo['rps']:.0%} of the same gateway with keys "
            f"off at 32 connections (target ≥ 90%); a cached key costs "
            f"{streaming['auth']['auth_us_per_request']:.1f} µs per request (target < 50 µs; `bench/auth_cost.py`)"
        )
    quota = streaming.get("quota")
    gwm, gwr = by.get(("gateway-limits-memory", 32)), by.get(("gateway-limits-redis", 32))
    if gw32 and gwm and gwr:
        lines += [
            "",
            "Quotas (issue 4): limits shaped like the default tiers' (requests per minute and per day, tokens per "
            "minute, concurrency), never reached:",
            "",
            f"- Redis limiter on: {gwr['rps'] / gw32['rps']:.0%} of the same gateway without limits at 32 "
            f"connections (target ≥ 75%); in-process limiter: {gwm['rps'] / gw32['rps']:.0%}",
            *(
                [
                    f"- server CPU per request at 32 connections: none {gw32['cpu_us']:.0f} µs, in process "
                    f"{gwm['cpu_us']:.0f} µs (+{gwm['cpu_us'] - gw32['cpu_us']:.0f}), Redis {gwr['cpu_us']:.0f} µs "
                    f"(+{gwr['cpu_us'] - gw32['cpu_us']:.0f}); Redis itself runs on CPU 1 beside wrk and nginx, so "
                    "its work there also slows the load generator and the upstream"
                ]
                if "cpu_us" in gw32
                else []
            ),
            "- round by round at 32 connections, Redis / none: "
            + ", ".join(f"{a['rps'] / b['rps']:.0%}" for a, b in zip(gwr["runs"], gw32["runs"], strict=True))
            + "; in process / none: "
            + ", ".join(f"{a['rps'] / b['rps']:.0%}" for a, b in zip(gwm["runs"], gw32["runs"], strict=True)),
        ]
    if quota:
        lines.append(
            f"- per request, admit + settle (`bench/quota_cost.py`): in process "
            f"{quota['memory_us_per_request']:.1f} µs; Redis {quota['redis_cpu_us_per_request_32_in_flight']:.1f} µs "
            f"of gateway CPU with 32 in flight (one script call per request: each settlement rides along with "
            f"the next admission); one admission alone waits {quota['redis_admit_round_trip_us']:.0f} µs for "
            "its round trip"
        )
    gwl = by.get(("gateway-levels-redis", 32))
    if gwr and gwl:
        lines += [
            "",
            "Levels (issue 20): the same limits at the key, its team and its organisation, all taken in one script "
            "call per request:",
            "",
            f"- three levels: {gwl['rps'] / gwr['rps']:.1%} of one level's requests/s at 32 connections "
            "(target: within 3%)"
            + (
                f"; server CPU per request {gwl['cpu_us']:.0f} µs vs {gwr['cpu_us']:.0f} µs"
                if "cpu_us" in gwl and "cpu_us" in gwr
                else ""
            ),
            "- round by round, three levels / one: "
            + ", ".join(f"{a['rps'] / b['rps']:.0%}" for a, b in zip(gwl["runs"], gwr["runs"], strict=True)),
        ]
    if quota and "levels_memory_us_per_request" in quota:
        lines.append(
            f"- per request, admit + settle with three levels (`bench/quota_cost.py`): in process "
            f"{quota['levels_memory_us_per_request']:.1f} µs (one level: {quota['memory_us_per_request']:.1f}); "
            f"Redis {quota['levels_redis_cpu_us_per_request_32_in_flight']:.1f} µs of gateway CPU with 32 in flight "
            f"(one level: {quota['redis_cpu_us_per_request_32_in_flight']:.1f})"
        )
    route = streaming.get("route")
    if route:
        lines.append(
            f"- routing (`bench/route_cost.py`): the route stage costs {route['route_us_per_request']:.1f} µs per "
            f"request to a plain model (name, allow-list, context fit by estimate), "
            f"{route['router_us_per_request']:.1f} µs through a two-candidate cost-aware router (complexity cues, "
            "candidates' cost, fit, slots and speed)"
        )
    lines += issue22_targets(by, streaming)
    if "ttft" not in streaming:
        _write(out, lines, results, streaming, args, connections)
        return
    t = streaming["ttft"]
    lines += [
        "",
        "Streaming:",
        "",
        *([f"- measured apart: {streaming['rerun']}"] if streaming.get("rerun") else []),
        f"- time to first token, median of 200: direct {t['direct_ms']:.3f} ms, via gateway {t['gateway_ms']:.3f} ms "
        f"(added {t['added_ms']:.3f} ms)",
        "",
        "| open streams | gateway RSS (KiB) | idle RSS (KiB) | per stream (KiB) | a new stream's TTFT meanwhile (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m in streaming["memory"]:
        loaded = f"{m['ttft_ms']:.1f}" if "ttft_ms" in m else "-"
        lines.append(
            f"| {m['streams']} | {m['rss_kib']} | {m['idle_kib']} | {m['per_stream_bytes'] / 1024:.1f} | {loaded} |"
        )
    _write(out, lines, results, streaming, args, connections)


def issue22_targets(by: dict[tuple[str, int], dict[str, Any]], streaming: dict[str, Any]) -> list[str]:
    """Issue 22's acceptance, read off this run (a figure missing from the run is said so)."""
    gw32, pt32, lt = by.get(("gateway", 32)), by.get(("passthrough", 32)), by.get(("litellm", 32))
    gw1, pt1, d1 = by.get(("gateway", 1)), by.get(("passthrough", 1)), by.get(("direct", 1))
    redis, hit = by.get(("gateway-limits-redis", 32)), by.get(("gateway-cache-hit", 32))
    lines = ["", "Targets (issue 22):", ""]

    def said(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def ratio(what: str, a: dict[str, Any] | None, b: dict[str, Any] | None, target: str) -> None:
        if a and b:
            r = a["rps"] / b["rps"]
            lines.append(f"- {what} at 32 connections: {r:.2f}x (target ≥ {target}x: {said(r >= float(target))})")

    ratio("gateway / bare pass-through", gw32, pt32, "1.0")
    if gw32 and lt:
        r = gw32["rps"] / lt["rps"]
        lines.append(f"- gateway / LiteLLM at 32 connections: {r:.0f}x (target ≥ 60x: {said(r >= 60)})")
    elif gw32:
        lines.append("- gateway / LiteLLM: LiteLLM not measured in this run")
    if gw1 and pt1 and d1:
        g, p = gw1["p50_ms"] - d1["p50_ms"], pt1["p50_ms"] - d1["p50_ms"]
        lines.append(
            f"- median added over direct at 1 connection: gateway {g:.3f} ms, pass-through {p:.3f} ms "
            f"(target: gateway ≤ pass-through: {said(g <= p)})"
        )
    ratio("limits on Redis / no limits", redis, gw32, "0.9")
    ratio("cache hits / bare pass-through", hit, pt32, "2")
    if "failed" in streaming:
        lines.append(f"- open streams: the streaming case failed in this run ({streaming['failed']})")
    most = max(streaming.get("memory", []), key=lambda m: m["streams"], default=None)
    if most is not None:
        kib = most["per_stream_bytes"] / 1024
        capped = ""
        if most.get("asked", most["streams"]) > most["streams"]:
            capped = (
                f"; {most['asked']:,} asked, but each stream holds two descriptors and this machine's hard limit is "
                f"{most['nofile_hard']:,} (no CAP_SYS_RESOURCE to raise it)"
            )
        lines.append(
            f"- {most['streams']:,} open streams in one process: {kib:.1f} KiB each "
            f"(target: 10,000 at ≤ 32 KiB: {said(most['streams'] >= 10_000 and kib <= 32)}{capped})"
        )
    cli = streaming.get("cli")
    if cli:
        lines.append(
            f"- `portcullis --help`: {cli['help']:.3f} s, `portcullis keys create --help`: "
            f"{cli['keys_create_help']:.3f} s (target ≤ 0.3 s: {said(max(cli.values()) <= 0.3)})"
        )
    return lines


def _write(
    out: Path,
    lines: list[str],
    results: list[dict[str, Any]],
    streaming: dict[str, Any],
    args: argparse.Namespace,
    connections: list[int],
) -> None:
    """The report, its data and its plot, named after it (RESULTS.md: results.json, results.png)."""
    stem = out.stem.lower()
    lines += ["", f"![results]({stem}.png)", ""]
    # Sections other harnesses keep in this report (bench/overload.py's goodput) survive a re-run.
    kept = _kept_sections(out.read_text()) if out.exists() else ""
    out.write_text("\n".join(lines) + kept)
    meta = {"runs": args.runs, "seconds": args.seconds, "only": args.only, "command": args.command}
    (out.parent / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "non_streaming": results, "streaming": streaming}, indent=1)
    )
    log(f"wrote {out}")
    try:
        plot(results, connections, out.parent / f"{stem}.png")
    except ImportError:
        log("matplotlib not installed: no plot (pip install -e '.[bench]')")


def _kept_sections(text: str) -> str:
    spans = re.finditer(r"\n<!-- (\w+):begin -->.*?<!-- \1:end -->\n", text, flags=re.S)
    return "".join(m.group(0) for m in spans)


def plot(results: list[dict[str, Any]], connections: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    width = 0.8 / len(connections)
    for i, c in enumerate(connections):
        rows = {r["name"]: r for r in results if r["connections"] == c}
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [rows[n]["rps"] if n in rows else 0 for n in names], width, label=f"{c} conn")
        axes[1].bar(xs, [rows[n]["p50_ms"] if n in rows else 0 for n in names], width, label=f"{c} conn")
    for ax, title in zip(axes, ("requests/s (higher is better)", "median latency ms (lower is better)"), strict=True):
        ax.set_xticks(
            [j + width * (len(connections) - 1) / 2 for j in range(len(names))], names, rotation=35, ha="right"
        )
        ax.set_yscale("log")  # (direct and LiteLLM sit orders of magnitude from the rest)
        ax.set_title(title + ", log scale")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Portcullis vs bare pass-through vs direct (non-streaming chat, fixed upstream)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
