"""The Messages and Responses APIs natively and translated: what translation costs.

    .venv/bin/python bench/apis.py                      # about two minutes; writes bench/RESULTS-apis.md
    .venv/bin/python bench/apis.py --llama-server BIN   # the same on a real llama-server too

One gateway, one upstream, two model names on it: `native` (the upstream answers /v1/messages and /v1/responses
itself, as llama-server does: the request goes as sent, the answer is read back as chat for the filters and made
into the API's shape again) and `translated` (the deployment declared without them: the request goes as a chat
completion, the answer is made into the API's shape). Chat completions on the same upstream are the reference.
The upstream is the simulator with no generation delay (what is measured is the gateway's work), or a real
llama-server with the tests' tiny random-weight model.

- Latency: sequential non-streamed requests of 16 tokens, in interleaved rounds (every mode once per round, the
  order alternating); the medians of each round's median, and the gateway's CPU per request.
- Stream throughput: streams of 512 tokens, one at a time, interleaved the same way: events/s the client reads
  (each API's own events: Messages has one content_block_delta per token, Responses one output_text.delta).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from harness import cpu_seconds, embed, free_port, logger, pyplot, wait_http

PY = sys.executable
HERE = Path(__file__).resolve().parent
log = logger("apis")

MODES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    # name: (path, body maker, the model name, fields of its own)
    "chat completions (reference)": ("/v1/chat/completions", "chat", "native", {}),
    "messages, native": ("/v1/messages", "messages", "native", {}),
    "messages, translated": ("/v1/messages", "messages", "translated", {}),
    "responses, native": ("/v1/responses", "responses", "native", {}),
    "responses, translated": ("/v1/responses", "responses", "translated", {}),
    # A response is stored (a database write before the answer goes out) unless the request says store: false.
    "responses, translated, store: false": ("/v1/responses", "responses", "translated", {"store": False}),
}


def body(kind: str, model: str, tokens: int, stream: bool, extra: dict[str, Any]) -> bytes:
    text = [{"role": "user", "content": "Tell me about llamas."}]
    if kind == "chat":
        obj: dict[str, Any] = {"model": model, "messages": text, "max_tokens": tokens}
    elif kind == "messages":
        obj = {"model": model, "messages": text, "max_tokens": tokens}
    else:
        obj = {"model": model, "input": "Tell me about llamas.", "max_output_tokens": tokens}
    return orjson.dumps({**obj, "stream": stream, **extra})


async def latency(url: str, mode: str, n: int, extra: dict[str, Any]) -> list[float]:
    path, kind, model, own = MODES[mode]
    payload = body(kind, model, 16, False, {**extra, **own})
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            t0 = time.perf_counter()
            async with s.post(url + path, data=payload, headers={"content-type": "application/json"}) as r:
                await r.read()
                assert r.status == 200, (mode, r.status, await r.text())
            out.append(time.perf_counter() - t0)
    return out


async def stream_rate(url: str, mode: str, streams: int, tokens: int, extra: dict[str, Any]) -> float:
    """Events per second a client reads (the median over `streams` streams, one at a time)."""
    path, kind, model, own = MODES[mode]
    payload = body(kind, model, tokens, True, {**extra, **own})
    rates = []
    async with aiohttp.ClientSession() as s:
        for _ in range(streams):
            events = 0
            t0 = time.perf_counter()
            async with s.post(url + path, data=payload, headers={"content-type": "application/json"}) as r:
                assert r.status == 200, (mode, r.status)
                async for line in r.content:
                    if line.startswith(b"data:"):
                        events += 1
            rates.append(events / (time.perf_counter() - t0))
    return statistics.median(rates)


def start_gateway(
    work: Path, procs: list[subprocess.Popen[bytes]], upstream: str, src: str | None = None
) -> tuple[str, int]:
    port = free_port()
    cfg = {
        "server": {"port": port, "access_log": bool(os.environ.get("BENCH_ACCESS_LOG"))},
        "store": {"database_url": f"sqlite+aiosqlite:///{work}/{port}.db", "auto_migrate": True},
        "auth": {"api_keys": False, "allow_anonymous": True},
        "tiers": {"free": {"priority": 0}},
        "cache": {"enabled": False},
        "models": {"native": {"deployments": [{"url": upstream}]}},
    }
    if src is None:  # (an earlier build knows no `native` key: the A/B has chat completions only)
        cfg["models"]["translated"] = {"deployments": [{"url": upstream, "native": []}]}
    (work / f"{port}.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [PY, "-m", "portcullis", "serve", "--config", str(work / f"{port}.yaml")],
        stdout=(work / f"{port}.log").open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": src} if src else os.environ.copy(),
    )
    procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz")
    return url, proc.pid


def measure(url: str, pid: int, args: argparse.Namespace, extra: dict[str, Any], label: str) -> dict[str, Any]:
    asyncio.run(latency(url, "chat completions (reference)", 50, extra))  # warm up
    for mode in MODES:
        asyncio.run(latency(url, mode, 10, extra))
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    rate: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for mode in order:
            c0 = cpu_seconds([pid])
            times = asyncio.run(latency(url, mode, args.requests, extra))
            cpu[mode].append((cpu_seconds([pid]) - c0) / args.requests)
            lat[mode].append(statistics.median(times))
            rate[mode].append(asyncio.run(stream_rate(url, mode, args.streams, args.stream_tokens, extra)))
        log(f"{label}: round {r + 1}/{args.rounds} done")
    return {
        mode: {
            "p50_ms": statistics.median(lat[mode]) * 1000,
            "cpu_ms": statistics.fmean(cpu[mode]) * 1000,  # (the clock ticks are 10 ms: the mean of all rounds)
            "events_per_s": statistics.median(rate[mode]),
        }
        for mode in MODES
    }


def table(results: dict[str, Any], reference: str = "chat completions (reference)") -> list[str]:
    ref = results[reference]
    lines = [
        "| mode | median latency (ms) | vs chat | gateway CPU per request (ms) | stream events/s | vs chat |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['p50_ms']:.2f} | {r['p50_ms'] / ref['p50_ms']:.2f}x | {r['cpu_ms']:.2f} | "
            f"{r['events_per_s']:.0f} | {r['events_per_s'] / ref['events_per_s']:.2f}x |"
        )
    return lines


def plot(all_results: dict[str, dict[str, Any]], path: Path) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, axes = plt.subplots(len(all_results), 2, figsize=(12, 3.2 * len(all_results)), squeeze=False)
    for row, (label, results) in enumerate(all_results.items()):
        modes = list(results)
        for col, (key, title) in enumerate((("p50_ms", "median latency, ms"), ("events_per_s", "stream events/s"))):
            ax = axes[row][col]
            ax.barh(modes, [results[m][key] for m in modes], color=["#888", "#2a7", "#c63", "#27a", "#a62", "#a9c"])
            ax.invert_yaxis()
            ax.set_title(f"{label}: {title}")
            for i, m in enumerate(modes):
                ax.text(results[m][key], i, f" {results[m][key]:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ab(args: argparse.Namespace, work: Path, procs: list[subprocess.Popen[bytes]], upstream: str) -> int:
    """Chat completions through this build and `--baseline`'s, interleaved: what the change costs the common path."""
    builds = {
        "this build": start_gateway(work, procs, upstream),
        "baseline": start_gateway(work, procs, upstream, src=str(Path(args.baseline).resolve() / "src")),
    }
    mode = "chat completions (reference)"
    rows: dict[str, dict[str, list[float]]] = {b: {"lat": [], "cpu": [], "rate": []} for b in builds}
    for url, _ in builds.values():
        asyncio.run(latency(url, mode, 50, {}))
    for r in range(args.rounds):
        for name in list(builds)[:: 1 if r % 2 == 0 else -1]:
            url, pid = builds[name]
            c0 = cpu_seconds([pid])
            rows[name]["lat"].append(statistics.median(asyncio.run(latency(url, mode, args.requests, {}))))
            rows[name]["cpu"].append((cpu_seconds([pid]) - c0) / args.requests)
            rows[name]["rate"].append(asyncio.run(stream_rate(url, mode, args.streams, args.stream_tokens, {})))
        log(f"A/B: round {r + 1}/{args.rounds} done")
    print(f"\nChat completions, this build vs {args.baseline} ({args.rounds} interleaved rounds, medians):\n")
    print("| build | median latency (ms) | gateway CPU per request (ms) | stream events/s |")
    print("|---|---:|---:|---:|")
    for name, v in rows.items():
        print(
            f"| {name} | {statistics.median(v['lat']) * 1000:.3f} | {statistics.fmean(v['cpu']) * 1000:.2f} | "
            f"{statistics.median(v['rate']):.0f} |"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40, help="non-streamed requests per mode and round")
    parser.add_argument("--streams", type=int, default=3, help="streams per mode and round")
    parser.add_argument("--stream-tokens", type=int, default=512)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN"))
    parser.add_argument("--out", default=str(HERE / "RESULTS-apis.md"))
    parser.add_argument(
        "--baseline",
        help="another build's source tree: only chat completions, this build vs that one (latency, stream events/s)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pc-apis-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    all_results: dict[str, dict[str, Any]] = {}
    try:
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        procs.append(
            subprocess.Popen(
                [PY, "-m", "portcullis", "sim", "--port", str(sim_port), "--slots", "4", "--n-ctx", "8192",
                 "--default-max-tokens", "4096"],
                stdout=(work / "sim.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        wait_http(sim_url + "/health")
        if args.baseline:
            return ab(args, work, procs, sim_url)
        url, pid = start_gateway(work, procs, sim_url)
        all_results["simulator"] = measure(url, pid, args, {}, "simulator")
        if args.llama_server:
            sys.path.insert(0, str(HERE.parent / "tests" / "llama"))
            from tiny_gguf import write_tiny_llama

            model = write_tiny_llama(work / "tiny.gguf")
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [args.llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", "2",
                     "-c", "2048", "-t", "1", "--no-warmup"],
                    stdout=(work / "llama.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
            llama_url = f"http://127.0.0.1:{port}"
            wait_http(llama_url + "/health", timeout=60)
            url, pid = start_gateway(work, procs, llama_url)
            args.stream_tokens = min(args.stream_tokens, 256)  # (the tiny model's context: 2048 over two slots)
            all_results["llama-server"] = measure(url, pid, args, {"ignore_eos": True}, "llama-server")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    command = "python bench/apis.py" + (" --llama-server $LLAMA_SERVER_BIN" if args.llama_server else "")
    lines = [
        "# The Messages and Responses APIs: native vs translated",
        "",
        f"`{command}` ({args.rounds} interleaved rounds; {args.requests} sequential non-streamed requests of 16 "
        f"tokens and {args.streams} streams per mode and round, of 512 tokens on the simulator and 256 on "
        "llama-server; medians; the gateway's CPU per request is the mean over all rounds, in clock ticks of 10 ms). "
        "Native: the upstream answers the API itself and the gateway reads the answer back as chat for its filters, "
        "then makes the API's shape again; translated: the request goes as a chat completion. See the module "
        "docstring.",
        "",
        "Reading it: compare each row with chat completions on the same upstream, in the same run. The Responses "
        "API's extra millisecond or so is the stored response, written to the database before the answer goes out "
        "(the `store: false` row has none). A native stream is read back as chat for the filters and encoded again: "
        "against the simulator, which sends its events as fast as it can, that shows in events/s; against "
        "llama-server the model's own pace dominates.",
        "",
    ]
    for label, results in all_results.items():
        lines += [f"## Upstream: {label}", "", *table(results), ""]
    lines += ["![latency and stream throughput per mode](results-apis.png)", ""]
    Path(args.out).write_text("\n".join(lines))
    (HERE / "results-apis.json").write_text(orjson.dumps(all_results, option=orjson.OPT_INDENT_2).decode())
    plot(all_results, HERE / "results-apis.png")
    print("\n".join(lines))
    embed(HERE / "RESULTS.md", "apis", "The Messages and Responses APIs", ["See [RESULTS-apis.md](RESULTS-apis.md)."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
