"""What the bench scripts share: free ports, starting, waiting for and stopping a server, pinning to a core, CPU
time of a process tree, a wrk run, progress lines, percentiles, and keeping a section of their own in
bench/RESULTS.md."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def logger(name: str) -> Callable[[str], None]:
    """Progress lines `[name HH:MM:SS] message`, flushed at once (runs are long)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


def start_portcullis(
    args: list[str], cpu: int, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`portcullis ARGS` (a gateway or a simulator) pinned to one core, its output in `log_path`."""
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), sys.executable, "-m", "portcullis", *args],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def serve_gateway(
    work: Path, name: str, config: dict[str, Any], *, cpu: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway on `config` (written to WORK/NAME.yaml; a free port added), its output in WORK/NAME.log, once it
    answers /readyz: (the process, its URL). `cpu`: pinned to that core."""
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "port": port}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "portcullis", "serve", "--config", str(path)]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    proc = subprocess.Popen(command, stdout=(work / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", timeout=60, proc=proc)
    return proc, url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(servers: list[Server], work: Path) -> str:
    """bench/nginx.conf.template's fixed-response upstream, pinned to CPU 1 beside the load generator, appended to
    `servers` once it answers; its base URL."""
    port = free_port()
    template = (Path(__file__).resolve().parent / "nginx.conf.template").read_text()
    (work / "nginx.conf").write_text(template.replace("{dir}", str(work)).replace("{port}", str(port)))
    upstream = f"http://127.0.0.1:{port}"
    nginx = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"]
    servers.append(Server("nginx", pinned(1, nginx), upstream + "/health", work))
    return upstream


def pinned(cpu: int, args: list[str]) -> list[str]:
    """`args` under `taskset -c CPU`, or as they are where there is no taskset or only one CPU."""
    return ["taskset", "-c", str(cpu), *args] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else args


def _wait(ready: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up")


def wait_http(
    url: str, timeout: float = 30, *, body: bytes | None = None, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until `url` answers 200 to a GET, or to a POST of `body` (JSON) when given; at most `timeout` s, and no
    longer than `proc` (the server's process, when given) lives."""

    def ready() -> bool:
        headers = {"content-type": "application/json"} if body is not None else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=1) as resp:
                return resp.status == 200
        except Exception:
            return False

    _wait(ready, url, timeout, proc)


def wait_redis(url: str, timeout: float = 30, *, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until the Redis at `url` answers a PING; at most `timeout` s, and no longer than `proc` lives."""
    import redis

    def ready() -> bool:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return True
        except redis.ConnectionError:
            return False

    _wait(ready, url, timeout, proc)


class Server:
    """A process with its output in WORKDIR/NAME.log. Waited for at once when `health` is given (an http:// URL
    answering 200, or a redis:// URL answering PING), else by `wait_ready`; stopped by SIGINT, killed after 10 s."""

    def __init__(
        self,
        name: str,
        args: list[str],
        health: str | None,
        workdir: Path,
        env: dict[str, str] | None = None,
        startup_s: float = 30,
        cwd: Path | None = None,
    ):
        self.name = name
        self.args = args
        self.log_path = workdir / f"{name}.log"
        self.proc = subprocess.Popen(
            args,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        if health is not None:
            self.wait_ready(health, startup_s)

    def wait_ready(self, url: str, timeout: float = 30, body: bytes | None = None) -> None:
        """Until `url` answers (see `wait_http`, `wait_redis`); the end of this server's log in the error if not."""
        try:
            if url.startswith("redis://"):
                wait_redis(url, timeout, proc=self.proc)
            else:
                wait_http(url, timeout, body=body, proc=self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{self.name}: {e}: {self.log_path.read_text()[-2000:]}") from None

    def rss_kib(self) -> int:
        """Resident memory of the process and its descendants."""
        total = 0
        for pid in descendants([self.proc.pid]):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def descendants(pids: Iterable[int]) -> set[int]:
    """These processes and all their descendants (parents read from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = list(pids)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system, all threads) of these processes and their descendants so far."""
    ticks = 0
    for pid in descendants(pids):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(
    url: str,
    connections: int,
    seconds: float,
    key: str | None = None,
    *,
    failures_ok: bool = False,
    stream: bool = False,
) -> dict[str, Any]:
    """One wrk run (-t1, pinned to CPU 1) posting bench/post.lua's chat completion, with `key` as the bearer
    token if given (`stream`: the body asks for a streamed answer): requests/s, requests, p50 and p99 in ms, non-2xx
    answers and wrk's socket errors line.
    A non-2xx answer or a socket error raises, with wrk's output, unless `failures_ok`."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(HERE / "post.lua")]
    env = {**os.environ, "BENCH_KEY": key or "", "BENCH_STREAM": "1" if stream else ""}
    out = subprocess.run(pinned(1, [*cmd, url]), capture_output=True, text=True, check=True, env=env).stdout
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if (non2xx or errors) and not failures_ok:
        raise RuntimeError(f"wrk saw failures against {url}:\n{out}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(total.group(1)) if total else 0,
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "",
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; 0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def embed(results_md: Path, name: str, title: str, body: list[str]) -> None:
    """Keep `body` in bench/RESULTS.md as a section marked with `name`, which bench/run.py preserves when it
    rewrites the file; replaced in place when it is already there."""
    section = f"\n<!-- {name}:begin -->\n## {title}\n" + "\n".join(body) + f"\n<!-- {name}:end -->\n"
    text = results_md.read_text() if results_md.exists() else ""
    pattern = rf"\n<!-- {name}:begin -->.*?<!-- {name}:end -->\n"
    text, n = re.subn(pattern, lambda _m: section, text, flags=re.S)
    results_md.write_text(text if n else text.rstrip("\n") + "\n" + section)


def pyplot(log: Callable[[str], None]) -> Any:
    """matplotlib's pyplot for files (Agg), or None (said in the log) when the bench extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return None
    return plt
