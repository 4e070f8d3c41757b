"""Where a request's CPU goes, this build against another, sampled: an A/B that survives a noisy machine.

    .venv/bin/python bench/profile_ab.py --baseline /tmp/worktree-of-an-earlier-build [--rounds 2]

wrk's requests/s move with whatever else the machine runs; the CPU a sampler finds in the gateway per
request served moves far less. Both gateways (configured as bench/run.py's 'gateway') front the same
nginx fixed-response upstream; in each round each one gets 32 connections for 10 s while py-spy samples it
at 500 Hz (idle threads left out). Printed: sampled CPU µs per request of each build, and the functions
whose own time per request differs most.
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


def _frame(text: str) -> str:
    """'function (file:line)' as 'function (package/file)': the same function in both builds, one key."""
    text = re.sub(r":\d+\)$", ")", text)
    return re.sub(r"\(/.*?/(site-packages|src)/", "(", text)


def own_time(path: Path) -> tuple[collections.Counter[str], int]:
    """py-spy's raw output (one 'frame;frame;... count' per line): samples per innermost function, and all."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        own[_frame(stack.split(";")[-1])] += int(count)
        total += int(count)
    return own, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="another build's source tree")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="portcullis-profile-"))
    servers: list[Server] = []
    try:
        upstream = start_nginx(servers, work)
        ports = {
            "this build": run.start_gateway(servers, work, upstream, "this", keys=True),
            "baseline": run.start_gateway(
                servers, work, upstream, "baseline", keys=True, src=str(Path(args.baseline) / "src")
            ),
        }
        pids = {"this build": servers[1].proc.pid, "baseline": servers[2].proc.pid}
        own = {name: collections.Counter[str]() for name in ports}
        samples = dict.fromkeys(ports, 0)
        served = dict.fromkeys(ports, 0)
        for round_ in range(args.rounds):
            for name, gw_port in ports.items():
                url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
                wrk(url, 32, 2, key=run.BENCH_GATEWAY_KEY)  # warm
                out = work / f"{name.replace(' ', '-')}-{round_}.txt"
                cmd = [spy, "record", "--pid", str(pids[name]), "--format", "raw", "--rate", str(RATE)]
                cmd += ["--duration", str(args.seconds + 2), "--nonblocking", "--output", str(out)]
                sampler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)  # py-spy attached
                result = wrk(url, 32, args.seconds, key=run.BENCH_GATEWAY_KEY)
                sampler.wait()
                counts, total = own_time(out)
                own[name] += counts
                samples[name] += total
                served[name] += int(result["requests"])
                log(f"round {round_ + 1}/{args.rounds} {name}: {result['rps']:.0f} req/s, {total} samples")
        per = {name: 1e6 / RATE / served[name] for name in ports}  # µs of CPU per sample per request
        for name in ports:
            print(f"{name}: {samples[name] * per[name]:.1f} µs of sampled CPU per request ({served[name]} requests)")
        a, b = ports
        rows = sorted(
            ((own[a][f] * per[a] - own[b][f] * per[b], f) for f in set(own[a]) | set(own[b])),
            key=lambda row: -abs(row[0]),
        )
        print(f"\nown time per request, {a} minus {b} (µs):")
        for delta, function in rows[: args.top]:
            print(f"  {delta:+6.1f}  {function[:140]}")
    finally:
        for server in reversed(servers):
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
