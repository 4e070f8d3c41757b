"""What the bench scripts share: free ports, waiting for a server, progress lines, percentiles, and
keeping a section of their own in bench/RESULTS.md."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


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
