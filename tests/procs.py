"""Start the simulator and the gateway as real processes on loopback sockets, for tests; and what the tests
share besides: keys, openai clients, waits on a condition, where reports go.

Each process gets a listening socket the test bound to port 0 (passed as an inherited fd), so there
are no fixed ports and no race for one. Readiness is a bounded poll of an HTTP endpoint.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import orjson
import yaml

# Every test gateway gets this key secret, and this admin key (all scopes) on its first start.
KEY_SECRET = "test-key-secret-0123456789abcdef0123456789abcdef"
ADMIN_KEY = "pc-00000000000000ad-test-admin-key-0123456789abcdefghijklmnop"

ROOT = Path(__file__).resolve().parents[1]  # the repository
# Under CI=true what would be skipped (a missing service or tool) fails instead.
IN_CI = os.environ.get("CI") == "true"
# Reports worth keeping from a run (schemathesis, pip-audit, the dashboard's screenshot).
ARTIFACTS = Path(os.environ.get("PORTCULLIS_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def _limit_open_files(count: int) -> None:
    """In the child before exec: a soft and hard open-files limit (the gateway can raise neither)."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


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


def create_key(gw: Proc, *, user: str | None = None, tier: str = "enterprise", **spec: Any) -> dict[str, Any]:
    """A new API key (POST /admin/keys with the admin key): the whole answer (`key`, `id`, `user`, ...).
    Without `user`, a user of its own, so no two keys share per-user limits or usage by accident."""
    body = {"user": user or f"u-{secrets.token_hex(4)}", "tier": tier, **spec}
    status, raw = http_post(gw.url + "/admin/keys", body)
    assert status == 201, raw
    return orjson.loads(raw)


def new_key(gw: Proc, *, user: str | None = None, tier: str = "enterprise", **spec: Any) -> str:
    """create_key's key alone."""
    return create_key(gw, user=user, tier=tier, **spec)["key"]


def openai_client(gw: Proc, key: str = ADMIN_KEY, *, timeout: float = 60, max_retries: int = 0) -> openai.OpenAI:
    """The openai SDK on a gateway's /v1. No retries unless asked: a test counts its requests and its refusals."""
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=max_retries, timeout=timeout)


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
        nofile: int | None = None,
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
            preexec_fn=(lambda: _limit_open_files(nofile)) if nofile else None,
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
    nofile: int | None = None,
    port: int = 0,
) -> Proc:
    """A gateway process; unless the config names a database, a fresh SQLite file in tmp_path. `nofile`: its
    open-files limit (soft and hard). `port`: a port chosen beforehand (free_port), when the config must name it."""
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
        nofile=nofile,
        port=port,
    )
    proc.database_url = store["database_url"]
    return proc


LLAMA_BIN = os.environ.get("LLAMA_SERVER_BIN")


def free_port() -> int:
    """A port free right now (for servers that cannot take an inherited socket, like llama-server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A real llama-server process (LLAMA_SERVER_BIN) serving `model`, with the Proc-like surface the
    chaos tests use (url, port, signal, wait, stop); `port` restarts one where the gateway expects it."""

    def __init__(
        self, model: Path, *, slots: int, ctx: int, log_dir: Path, port: int = 0, alias: str = "tiny-alias"
    ) -> None:
        assert LLAMA_BIN, "LLAMA_SERVER_BIN is not set"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"llama-server-{self.port}.log"
        self._log = open(self.log_path, "ab")
        args = ["-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-np", str(slots)]
        args += ["-c", str(ctx * slots), "-a", alias, "-t", "1", "--no-warmup", "--metrics"]
        self.popen = subprocess.Popen([LLAMA_BIN, *args], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout=60, what=f"llama-server on {self.url}")
        except BaseException:
            self.stop()
            log = self.log_path.read_text(errors="replace")
            raise RuntimeError(f"llama-server did not start; log:\n{log}") from None

    def _ready(self) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"llama-server exited with {self.popen.returncode}")
        return http_get(self.url + "/health", timeout=1)[0] == 200

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._log.close()


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in `workdir`, on a free port), to stop, start, SIGSTOP
    and SIGCONT without touching the machine's shared one. As root it runs as the `postgres` user
    (PostgreSQL refuses root)."""

    def __init__(self, workdir: Path) -> None:
        import pwd
        import shutil

        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        binary = str(found[-1]) if found else shutil.which("postgres")
        if binary is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed (scripts/services installs them)")
        self.bin = Path(binary).parent
        self.user = "postgres" if os.geteuid() == 0 else None
        self.dir = workdir / "pgdata"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        workdir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (workdir, *workdir.parents):
                if path == Path("/"):
                    break
                os.chmod(path, os.stat(path).st_mode | 0o011)  # traversable by postgres
            os.chown(workdir, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.dir), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
            user=self.user,
        )
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.dir),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.dir),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=100",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.user,
        )
        wait_until(self._answers, timeout=30, what=f"PostgreSQL on port {self.port}")

    def _answers(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
        )
        return result.returncode == 0

    def stop(self) -> None:
        """A fast shutdown: connections end, the port refuses."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            self.popen.wait(30)
        self.popen = None

    def _processes(self) -> list[int]:
        """The postmaster and its children (each backend is a session of its own: killpg misses them)."""
        assert self.popen is not None
        pids = [self.popen.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.popen.pid:
                    pids.append(int(entry.name))
        return pids

    def freeze(self) -> None:
        """Every process of the server stops where it is: connections stay open and nothing answers."""
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        if self.popen is not None:
            self.thaw()
        self.stop()


class RedisServer:
    """A redis-server of the test's own on a free port, to kill, restart, SIGSTOP and SIGCONT."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/services installs it)")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


BATCH_ENDED = ("completed", "failed", "expired", "cancelled")


def wait_ended(client: Any, batch_id: str, timeout: float = 60) -> Any:
    """A batch (retrieved through an openai client) once it has ended."""
    found: dict[str, Any] = {}

    def ended() -> bool:
        found["b"] = client.batches.retrieve(batch_id)
        return found["b"].status in BATCH_ENDED

    wait_until(ended, timeout=timeout, interval=0.1, what=f"batch {batch_id} to end")
    return found["b"]
