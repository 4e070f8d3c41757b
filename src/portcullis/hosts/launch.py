"""Launched servers as a host: one llama-server process per model, started by the gateway when the model is needed
and stopped when the scheduler makes room or its TTL passes (what llama-swap does, under the gateway's scheduler).

Each model's `command` names the port as `{port}`; the gateway chooses a free one on `listen_host` (and another
if it was taken by the time the process is to start; one taken in the instant after fails that load). A start is
over when the process answers `GET /health` 200 within `start_timeout_s`; a process that exits first failed to
load (the error carries the last line it wrote: its output goes to a log file per model in the temporary
directory). A stop is SIGTERM, then SIGKILL after `stop_timeout_s`. A process that dies on its own (a crash,
SIGKILL) leaves its model unloaded: the requests it was serving fail over to their retries, which wait for it to
start again. A model that crashes `max_restarts` times in a row without serving a minute in between is failed for
a while. The processes end with the gateway (and with it if it dies: Linux's parent-death signal, set by
util-linux's setpriv when the machine has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from portcullis.hosts.schedule import Host, LoadFailed, Seat, SeatState
from portcullis.obs.logging import get_logger

if TYPE_CHECKING:
    from portcullis.config import HostConfig

log = get_logger("portcullis.hosts")

_HEALTH_POLL_S = 0.1
_STABLE_S = 60.0  # a process that served this long has not crash-looped: its restarts count from zero again


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# The processes end with the gateway even when it dies without stopping them: util-linux's setpriv sets Linux's
# parent-death signal and execs the command (a preexec_fn doing it in Python would run between fork and exec in a
# process with threads: not safe). Without setpriv, only a gateway that stops cleanly stops them.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_DEATH_SIGNAL: tuple[str, ...] = (_SETPRIV, "--pdeathsig", "TERM", "--") if _SETPRIV else ()
_CHECK_S = 2.0  # a process whose connection was refused has this long to answer /health before it is ended


class Launcher:
    def __init__(self, name: str, config: HostConfig, commands: dict[str, list[str]]) -> None:
        self.name = name
        self.config = config
        self.commands = commands  # model → argv with {port}
        self.host: Host | None = None
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping: set[str] = set()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._crashes: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._checking: set[str] = set()
        self.log_dir = Path(tempfile.gettempdir()) / f"portcullis-launch-{os.getpid()}"

    async def start(self, host: Host) -> None:
        self.host = host
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0), skip_auto_headers=("User-Agent",)
        )

    async def stop(self) -> None:
        await asyncio.gather(*(self._terminate(model) for model in list(self.procs)), return_exceptions=True)
        for task in self._watchers.values():
            task.cancel()
        if self._session is not None:
            await self._session.close()

    # -- loads and unloads -----------------------------------------------------------------------------

    async def load(self, seat: Seat) -> None:
        replica = seat.replica
        listen = self.config.listen_host
        port = int(replica.url.rsplit(":", 1)[1])
        if not _port_free(listen, port):  # taken since we chose it: another
            port = free_port(listen)
            replica.url = f"http://{listen}:{port}" if ":" not in listen else f"http://[{listen}]:{port}"
            if replica.client is not None:
                replica.client.base_url = replica.url
        argv = [arg.replace("{port}", str(port)) for arg in self.commands[seat.model]]
        self.log_dir.mkdir(exist_ok=True)
        log_path = self.log_dir / f"{self.name}-{seat.model}.log"
        out = await asyncio.to_thread(log_path.open, "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *_DEATH_SIGNAL,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except OSError as exc:
            raise LoadFailed(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        finally:
            out.close()  # (the child has its own copy)
        self.procs[seat.model] = proc
        self._started[seat.model] = float("inf")  # (serving time counts from its first healthy answer)
        self._watchers[seat.model] = asyncio.create_task(self._watch(seat, proc))
        log.info("host_process_started", host=self.name, model=seat.model, pid=proc.pid, port=port)
        try:
            await self._healthy(seat, proc, log_path)
            self._started[seat.model] = time.monotonic()
            await self._learn(seat)
        except BaseException:
            await self._terminate(seat.model)  # cancelled (nobody waits any more) or failed: it goes
            raise

    async def unload(self, seat: Seat) -> None:
        await self._terminate(seat.model)

    def lost(self, seat: Seat) -> bool:
        """A request could not connect to the model's process. Gone (its exit is on its way to the watcher, which
        marks the model unloaded: the retries wait for it to start again), or alive and not answering: its /health
        is asked, and a process that does not answer it either is ended. Never the breaker's business."""
        proc = self.procs.get(seat.model)
        if proc is not None and proc.returncode is None and seat.model not in self._stopping:
            if seat.model not in self._checking:
                self._checking.add(seat.model)
                task = asyncio.get_running_loop().create_task(self._check(seat, proc))
                task.add_done_callback(lambda _: self._checking.discard(seat.model))
        return True

    async def _check(self, seat: Seat, proc: asyncio.subprocess.Process) -> None:
        assert self._session is not None
        with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError, OSError):
            async with asyncio.timeout(_CHECK_S):
                async with self._session.get(seat.replica.url + "/health") as resp:
                    if resp.status == 200:
                        return  # alive and well: the failed connection was ours (a descriptor limit, say)
        if proc.returncode is None and self.procs.get(seat.model) is proc:
            log.warning("host_process_unresponsive", host=self.name, model=seat.model, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def details(self, seat: Seat) -> dict[str, object]:
        proc = self.procs.get(seat.model)
        return {
            "pid": proc.pid if proc is not None and proc.returncode is None else None,
            "crashes_in_a_row": self._crashes.get(seat.model, 0),
            "log": str(self.log_dir / f"{self.name}-{seat.model}.log"),
        }

    async def _healthy(self, seat: Seat, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        assert self._session is not None
        deadline = time.monotonic() + self.config.start_timeout_s
        url = seat.replica.url + "/health"
        while True:
            if proc.returncode is not None:
                raise LoadFailed(f"its process exited with code {proc.returncode}: {_last_line(log_path)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with asyncio.timeout(2.0):
                    async with self._session.get(url) as resp:
                        if resp.status == 200:
                            return
            if time.monotonic() > deadline:
                raise LoadFailed(f"its process did not answer /health within {self.config.start_timeout_s:g} s")
            await asyncio.sleep(_HEALTH_POLL_S)

    async def _learn(self, seat: Seat) -> None:
        assert self._session is not None
        replica = seat.replica
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                async with self._session.get(replica.url + "/props") as resp:
                    props = await resp.json() if resp.status == 200 else None
            if isinstance(props, dict):
                replica.take_props(props)

    async def _terminate(self, model: str) -> None:
        proc = self.procs.get(model)
        if proc is None:
            return
        self._stopping.add(model)
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    async with asyncio.timeout(self.config.stop_timeout_s):
                        await proc.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            log.info("host_process_stopped", host=self.name, model=model, pid=proc.pid, code=proc.returncode)
        finally:
            self._stopping.discard(model)
            if self.procs.get(model) is proc:
                del self.procs[model]

    async def _watch(self, seat: Seat, proc: asyncio.subprocess.Process) -> None:
        """A process that ends without being asked to: its model is unloaded (and failed after a crash loop)."""
        code = await proc.wait()
        if seat.model in self._stopping or self.procs.get(seat.model) is not proc:
            return
        del self.procs[seat.model]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group
        served = time.monotonic() - self._started.get(seat.model, 0.0)
        crashes = self._crashes[seat.model] = 1 if served >= _STABLE_S else self._crashes.get(seat.model, 0) + 1
        log.warning("host_process_died", host=self.name, model=seat.model, pid=proc.pid, code=code, crashes=crashes)
        assert self.host is not None
        if crashes > self.config.max_restarts:
            self.host.mark_failed(seat, f"it crashed {crashes} times in a row (exit code {code})")
        else:
            self.host.observed(seat, SeatState.UNLOADED, error=f"its process exited with code {code}")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_bytes()[-4096:].decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1].strip()[:300] if lines else "no output"
