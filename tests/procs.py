"""Start the simulator and the gateway as real processes on loopback sockets, for tests.

Each process gets a listening socket the test bound to port 0 (passed as an inherited fd), so there
are no fixed ports and no race for one. Readiness is a bounded poll of an HTTP endpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml

# Every test gateway gets this key secret, and this admin key (all scopes) on its first start.
KEY_SECRET = "test-key-secret-0123456789abcdef0123456789abcdef"
ADMIN_KEY = "pc-00000000000000ad-test-admin-key-0123456789abcdefghijklmnop"


def bind_loopback(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    merged = {"authorization": f"Bearer {ADMIN_KEY}", **(headers or {})}
    req = urllib.request.Request(url, headers={k: v for k, v in merged.items() if v is not None})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: Any, timeout: float = 10.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    all_headers = {"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(predicate: Any, *, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, urllib.error.URLError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


class Proc:
    def __init__(
        self,
        args: list[str],
        *,
        ready_path: str,
        ready_status: tuple[int, ...] = (200,),
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        name: str = "proc",
        port: int = 0,
    ) -> None:
        self.database_url = ""  # gateways: the database it was started with
        self.sock = bind_loopback(port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or Path("/tmp")) / f"{name}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "portcullis", *args, "--fd", str(self.sock.fileno())],
            pass_fds=[self.sock.fileno()],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        # The child has its own copy now; ours would keep the port accepting after the server closed it.
        self.sock.close()
        try:
            wait_until(lambda: self._ready(ready_path, ready_status), what=f"{name} on {self.url}{ready_path}")
        except BaseException as exc:  # never leave a process behind, whatever went wrong
            log = self.log()
            self.stop()
            raise RuntimeError(f"{name} did not start ({exc!r}); log:\n{log}") from None

    def _ready(self, path: str, statuses: tuple[int, ...]) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"process exited with {self.popen.returncode}:\n{self.log()}")
        status, _ = http_get(self.url + path, timeout=1)
        return status in statuses

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._log.close()


def start_sim(*args: str, log_dir: Path | None = None, ready_status: tuple[int, ...] = (200,), port: int = 0) -> Proc:
    """A simulator process; `port` reuses a port (a replica restarted where the gateway expects it)."""
    return Proc(["sim", *args], ready_path="/health", ready_status=ready_status, log_dir=log_dir, name="sim", port=port)


def sim_control(sim: Proc, **changes: Any) -> dict[str, Any]:
    status, body = http_post(sim.url + "/sim/control", changes)
    assert status == 200, body
    return orjson.loads(body)


def sim_stats(sim: Proc) -> dict[str, Any]:
    status, body = http_get(sim.url + "/sim/stats")
    assert status == 200
    return orjson.loads(body)


def gateway_config(models: dict[str, list[str] | list[dict[str, Any]]], **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"drain_grace_s": 0.2, "shutdown_timeout_s": 10, "metrics_public": True},
        "store": {"auto_migrate": True},
        "health": {"interval_s": 0.2, "timeout_s": 1},
        "models": {
            name: {"deployments": [d if isinstance(d, dict) else {"url": d} for d in deployments]}
            for name, deployments in models.items()
        },
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def start_gateway(
    config: dict[str, Any],
    tmp_path: Path,
    *,
    ready_path: str = "/healthz",
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> Proc:
    """A gateway process; unless the config names a database, a fresh SQLite file in tmp_path."""
    stamp = time.monotonic_ns()
    store = config.setdefault("store", {})
    store.setdefault("database_url", f"sqlite+aiosqlite:///{tmp_path}/gateway-{stamp}.db")
    path = tmp_path / f"gateway-{stamp}.yaml"
    path.write_text(yaml.safe_dump(config))
    full_env = {"PORTCULLIS_KEY_SECRET": KEY_SECRET, "PORTCULLIS_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY, **(env or {})}
    proc = Proc(
        ["serve", "--config", str(path), *(extra_args or [])],
        ready_path=ready_path,
        env=full_env,
        log_dir=tmp_path,
        name="gateway",
    )
    proc.database_url = store["database_url"]
    return proc
