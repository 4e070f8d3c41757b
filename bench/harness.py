"""What the bench scripts share: free ports, waiting for a server, progress lines."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable


def logger(name: str) -> Callable[[str], None]:
    """Progress lines `[name HH:MM:SS] message`, flushed at once (runs are long)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


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
