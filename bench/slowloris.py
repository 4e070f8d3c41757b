"""Slow, silent and oversized clients against one gateway: does it keep serving everyone else?

    .venv/bin/python bench/slowloris.py                               # about 1 minute
    .venv/bin/python bench/slowloris.py --baseline /tmp/worktree-of-an-earlier-build

One simulator on CPU 1; the gateway on CPU 0 (API keys, SQLite, its default edge limits: 64 KiB heads,
10 s to send one, keep-alive 75 s). For --attack seconds, from 127.0.0.2 (another loopback address than
the honest client's): --slow sockets that send a request line and then one header line a second, never
ending the head; --silent sockets that send nothing; --big sockets that send one header of up to 16 MiB as
fast as the gateway reads it. Every attacker reconnects as soon as its connection is closed. Meanwhile an
honest client on 127.0.0.1 asks GET /healthz every 0.2 s and an authenticated chat completion every
0.5 s, each on a fresh connection, and the gateway's resident memory is read every 0.5 s. Reported: the
honest requests' latency and failures, the memory before, at the peak and after, and what the attackers
got (431, 408, 503, or a close). With --baseline the same attack runs against that build afterwards.
Writes bench/RESULTS-slowloris.md, results-slowloris.json, results-slowloris.png and a section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from harness import embed, free_port, logger, percentile, pyplot, start_portcullis, wait_http

HERE = Path(__file__).resolve().parent
KEY = "pc-00000000000000c7-slowloris-bench-key-0123456789abcdefghijklm"
SECRET = "slowloris-bench-key-secret-0123456789abcdef0123456789abcdef"
ATTACKER = "127.0.0.2"
log = logger("slowloris")
FILL = b"a" * 65536  # a big attacker's header, 64 KiB at a time
# What an attacker does on one connection (Attack.slow, .silent, .big).
Body = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _status(raw: bytes) -> str:
    if raw.startswith(b"HTTP/1.1 "):
        return raw[9:12].decode()
    return "closed" if not raw else "other"


class Attack:
    def __init__(self, port: int, until: float) -> None:
        self.port = port
        self.until = until
        self.outcomes: Counter[str] = Counter()  # per kind: what ended an attacker's connection
        self.held: list[float] = []  # seconds each attacking connection stayed open
        self.connect_failures = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(ATTACKER, 0), limit=1 << 20)
        except OSError:
            self.connect_failures += 1
            await asyncio.sleep(0.2)
            return None

    async def _end(self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t0: float) -> None:
        raw = b""
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            raw = await asyncio.wait_for(reader.read(4096), 2)
        ended_by_us = time.monotonic() >= self.until
        if not ended_by_us:
            self.outcomes[f"{kind}:{_status(raw)}"] += 1
            self.held.append(time.monotonic() - t0)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def cycle(self, kind: str, body: Body) -> None:
        """One attacker: connect, run `body` on the connection (an OSError, timeouts included, ends it), record
        what ended it; and again, until the attack stops."""
        while time.monotonic() < self.until:
            conn = await self._open()
            if conn is None:
                continue
            reader, writer = conn
            t0 = time.monotonic()
            with contextlib.suppress(OSError):
                await body(reader, writer)
            await self._end(kind, reader, writer, t0)

    async def slow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A request line, then one header line a second, never ending the head."""
        writer.write(b"GET /v1/models HTTP/1.1\r\nhost: gateway\r\n")
        while time.monotonic() < self.until and not reader.at_eof():
            read = asyncio.ensure_future(reader.read(1))
            done, _ = await asyncio.wait({read}, timeout=1.0)
            if done:
                first = read.result()
                if first:  # the server answered: put the byte back for _end
                    reader._buffer[0:0] = first  # type: ignore[attr-defined]
                break
            read.cancel()
            writer.write(b"x-slow: 1\r\n")
            await writer.drain()

    async def silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Nothing sent: wait for the server to answer or close."""
        first = await asyncio.wait_for(reader.read(1), max(self.until - time.monotonic(), 0.01))
        if first:
            reader._buffer[0:0] = first  # type: ignore[attr-defined]

    async def big(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One header of up to 16 MiB, as fast as the server reads it."""
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nx-fill: ")
        for _ in range(256):
            if reader.at_eof() or time.monotonic() >= self.until:
                break
            writer.write(FILL)
            await asyncio.wait_for(writer.drain(), 5)


async def honest(url: str, until: float, samples: dict[str, list[tuple[float, float, bool]]], t_zero: float) -> None:
    """/healthz every 0.2 s and a chat completion every 0.5 s, each on a fresh connection from 127.0.0.1."""
    timeout = aiohttp.ClientTimeout(total=10)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

    async def one(kind: str, method: str, path: str, body: bytes | None) -> None:
        t0 = time.monotonic()
        ok = False
        try:
            connector = aiohttp.TCPConnector(force_close=True, local_addr=("127.0.0.1", 0))
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
                async with s.request(method, url + path, data=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        samples[kind].append((t0 - t_zero, time.monotonic() - t0, ok))

    tasks: list[asyncio.Task[None]] = []
    tick = 0
    while time.monotonic() < until:
        tasks.append(asyncio.create_task(one("healthz", "GET", "/healthz", None)))
        if tick % 5 == 0:
            tasks.append(asyncio.create_task(one("chat", "POST", "/v1/chat/completions", CHAT)))
        tick += 2
        await asyncio.sleep(0.2)
    await asyncio.gather(*tasks)


def run_one(name: str, src: str | None, sim_url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    config = {
        "server": {"access_log": False, "drain_grace_s": 0.1},
        "store": {"database_url": f"sqlite+aiosqlite:///{work}/{name}.db", "auto_migrate": True},
        "models": {"m": {"deployments": [{"url": sim_url}]}},
    }
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    env = {"PORTCULLIS_KEY_SECRET": SECRET, "PORTCULLIS_BOOTSTRAP_ADMIN_KEY": KEY}
    if src is not None:
        env["PYTHONPATH"] = src
    gw = start_portcullis(
        ["serve", "--config", str(work / f"{name}.yaml"), "--port", str(port)], 0, work / f"{name}.log", env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/readyz", 60)
        return asyncio.run(_measure(name, url, port, gw.pid, args))
    finally:
        gw.terminate()
        with contextlib.suppress(Exception):
            gw.wait(15)
        if gw.poll() is None:
            gw.kill()


async def _measure(name: str, url: str, port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[tuple[float, float, bool]]] = {"healthz": [], "chat": []}
    rss: list[tuple[float, float]] = []
    t_zero = time.monotonic()
    attack_from = t_zero + args.calm
    attack_until = attack_from + args.attack
    end = attack_until + args.calm

    async def sample_rss() -> None:
        while time.monotonic() < end:
            rss.append((time.monotonic() - t_zero, rss_mib(pid)))
            await asyncio.sleep(0.5)

    async def attack() -> Attack:
        await asyncio.sleep(args.calm)
        att = Attack(port, attack_until)
        log(f"{name}: attacking with {args.slow} slow, {args.silent} silent, {args.big} big-header sockets")
        await asyncio.gather(
            *(att.cycle("slow", att.slow) for _ in range(args.slow)),
            *(att.cycle("silent", att.silent) for _ in range(args.silent)),
            *(att.cycle("big", att.big) for _ in range(args.big)),
        )
        return att

    att, *_ = await asyncio.gather(attack(), honest(url, end, samples, t_zero), sample_rss())
    during = {
        kind: [(lat, ok) for t, lat, ok in rows if args.calm <= t < args.calm + args.attack]
        for kind, rows in samples.items()
    }
    before = [m for t, m in rss if t < args.calm]
    after = [m for t, m in rss if t >= args.calm + args.attack]
    result = {
        "name": name,
        "samples": samples,
        "rss": rss,
        "rss_before_mib": max(before) if before else 0.0,
        "rss_peak_mib": max(m for _, m in rss),
        "rss_after_mib": after[-1] if after else 0.0,
        "outcomes": dict(att.outcomes),
        "held_p50_s": percentile(att.held, 0.5),
        "held_max_s": max(att.held, default=0.0),
        "attacker_connections_ended": len(att.held),
        "connect_failures": att.connect_failures,
    }
    for kind, rows in during.items():
        lat = [lat for lat, ok in rows if ok]
        result[kind] = {
            "sent": len(rows),
            "failed": sum(1 for _, ok in rows if not ok),
            "p50_ms": percentile(lat, 0.5) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "max_ms": max(lat, default=0.0) * 1000,
        }
    log(
        f"{name}: healthz {result['healthz']['failed']}/{result['healthz']['sent']} failed, "
        f"p99 {result['healthz']['p99_ms']:.0f} ms; chat {result['chat']['failed']}/{result['chat']['sent']} failed, "
        f"p99 {result['chat']['p99_ms']:.0f} ms; RSS {result['rss_before_mib']:.0f} -> "
        f"{result['rss_peak_mib']:.0f} MiB; attackers {dict(att.outcomes)}"
    )
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "# Slow, silent and oversized clients (bench/slowloris.py)",
        "",
        f"Command: `{args.command}`. Attack for {args.attack:g} s from 127.0.0.2: {args.slow} slow sockets (a "
        f"header line a second, never ending the head), {args.silent} silent ones, {args.big} sending one 16 MiB "
        "header; each reconnects when closed. The honest client (127.0.0.1): GET /healthz every 0.2 s and an "
        "authenticated chat completion every 0.5 s, each on a new connection. Gateway on CPU 0 with its default "
        "edge limits (64 KiB heads, 10 s to send one).",
        "",
        "| build | healthz failed | healthz p50 / p99 / max ms | chat failed | chat p50 / p99 ms | RSS before / "
        "peak / after MiB | attacker connections ended (how) | held p50 / max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h, c = r["healthz"], r["chat"]
        how = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items())) or "none"
        lines.append(
            f"| {r['name']} | {h['failed']} of {h['sent']} | {h['p50_ms']:.0f} / {h['p99_ms']:.0f} / {h['max_ms']:.0f} "
            f"| {c['failed']} of {c['sent']} | {c['p50_ms']:.0f} / {c['p99_ms']:.0f} "
            f"| {r['rss_before_mib']:.0f} / {r['rss_peak_mib']:.0f} / {r['rss_after_mib']:.0f} | "
            f"{r['attacker_connections_ended']} ({how}) | {r['held_p50_s']:.1f} / {r['held_max_s']:.1f} |"
        )
    lines += [
        "",
        "`slow:408` is a slow head cut at the head deadline with 408; `big:431` a head past 64 KiB refused with "
        "431; `silent:closed` a silent socket closed at the head deadline without an answer (nothing was asked). "
        "An attacker connection the gateway never ended is not in the count (it was still open when the attack "
        "stopped).",
        "",
        "![honest latency and memory under attack](results-slowloris.png)",
    ]
    return lines


def plot(results: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for r in results:
        pts = [(t, lat * 1000) for t, lat, ok in r["samples"]["healthz"] if ok]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], ".", markersize=3, label=f"{r['name']}: /healthz")
        fails = [t for t, _, ok in r["samples"]["healthz"] if not ok]
        if fails:
            ax1.plot(fails, [1] * len(fails), "x", label=f"{r['name']}: /healthz failed")
        ax2.plot([t for t, _ in r["rss"]], [m for _, m in r["rss"]], label=f"{r['name']}: RSS")
    for ax in (ax1, ax2):
        ax.axvspan(args.calm, args.calm + args.attack, color="red", alpha=0.08, label="attack")
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (log)")
    ax1.set_title("Honest /healthz latency while 1,000 sockets attack")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("gateway RSS, MiB")
    ax2.set_xlabel("seconds")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", type=int, default=500)
    parser.add_argument("--silent", type=int, default=500)
    parser.add_argument("--big", type=int, default=4)
    parser.add_argument("--attack", type=float, default=30)
    parser.add_argument("--calm", type=float, default=5)
    parser.add_argument("--baseline", default=None, help="another build's source tree, attacked the same way after")
    parser.add_argument("--out", default=str(HERE / "RESULTS-slowloris.md"))
    args = parser.parse_args()
    args.command = "bench/slowloris.py " + " ".join(sys.argv[1:])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="slowloris-") as tmp:
        work = Path(tmp)
        sim_port = free_port()
        sim = start_portcullis(["sim", "--port", str(sim_port), "--slots", "16", "--ttft-ms", "5"], 1, work / "sim.log")
        try:
            wait_http(f"http://127.0.0.1:{sim_port}/health", 30)
            sim_url = f"http://127.0.0.1:{sim_port}"
            results = [run_one("this build", None, sim_url, work, args)]
            if args.baseline:
                src = str(Path(args.baseline).resolve() / "src")
                results.append(run_one("build before", src, sim_url, work, args))
        finally:
            sim.terminate()
            sim.wait(10)
    out = Path(args.out)
    lines = report(results, args)
    out.write_text("\n".join(lines) + "\n")
    (HERE / "results-slowloris.json").write_text(json.dumps(results, indent=1))
    plot(results, args, HERE / "results-slowloris.png")
    embed(HERE / "RESULTS.md", "slowloris", "Slow, silent and oversized clients (bench/slowloris.py)", lines[2:])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
