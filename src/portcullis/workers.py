"""`portcullis serve --workers N`: N gateway processes on one listening socket, supervised.

Python runs one event loop per process on one core; a machine with more cores serves more with more
processes. The supervisor binds the port once and hands the socket to each worker (`serve --fd`), so
the kernel spreads connections between them. Workers share everything that must be shared through
Redis (limits, cache and coalescing, revocations, model switches) and the database (keys, usage, batch
jobs): the same model as several machines behind a load balancer (docs/scaling.md), hence Redis is
required. Migrations and the bootstrap key run once, here, before any worker starts.

SIGTERM (or SIGINT) is passed to every worker, each drains as a single gateway does (readiness 503,
in-flight requests finish, usage flushed), and the supervisor exits when they have. A worker that dies
otherwise is started again (at most once a second per worker), and the event is logged.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from portcullis.config import Config

_RESTART_EVERY_S = 1.0


def _log(message: str) -> None:
    print(f"portcullis serve: {message}", file=sys.stderr, flush=True)


async def _prepare(config: Config) -> None:
    """Migrations and the bootstrap admin key, once for all workers (they would race at a first start)."""
    from portcullis.app import create_app

    gateway = create_app(config)
    try:
        await gateway.preflight()
    finally:
        if gateway.bus is not None:
            await gateway.bus.close()
        await gateway.engine.dispose()


def run_workers(args: argparse.Namespace, config: Config) -> int:
    from portcullis.app import StartupError

    if config.hosts:
        _log(
            f"--workers {args.workers}: hosts ({', '.join(config.hosts)}) need one gateway process: its scheduler "
            "alone decides which models are loaded (docs/llama-server.md); run one process"
        )
        return 2
    if not config.store.redis_url:
        _log(
            f"--workers {args.workers}: store.redis_url must be set: the processes share limits, the cache, "
            "revocations and model switches through Redis (docs/scaling.md)"
        )
        return 2
    try:
        asyncio.run(_prepare(config))
    except StartupError as exc:
        _log(str(exc))
        return 1
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        host = args.host or config.server.host
        port = args.port if args.port is not None else config.server.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(8192)
    sock.set_inheritable(True)
    command = [sys.executable, "-m", "portcullis", "serve", "--config", args.config, "--workers", "1"]
    command += ["--fd", str(sock.fileno())]
    if args.ssl_certfile:
        command += ["--ssl-certfile", args.ssl_certfile, "--ssl-keyfile", args.ssl_keyfile]

    def start(slot: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, pass_fds=(sock.fileno(),), env=None)

    workers = {slot: start(slot) for slot in range(args.workers)}
    started = dict.fromkeys(workers, time.monotonic())
    address = sock.getsockname()
    _log(f"{args.workers} workers on {address[0]}:{address[1]} (pids {' '.join(str(w.pid) for w in workers.values())})")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:  # a second signal: no more waiting
            for worker in workers.values():
                worker.kill()
            return
        stopping = True
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    while True:
        alive = 0
        for slot, worker in list(workers.items()):
            code = worker.poll()
            if code is None:
                alive += 1
                continue
            if stopping:
                failed |= code not in (0, -signal.SIGTERM)  # (-SIGTERM: stopped before its handler was set)
                continue
            if time.monotonic() - started[slot] < _RESTART_EVERY_S:
                alive += 1  # started again shortly
                continue
            _log(f"worker {worker.pid} exited with {code}; starting another")
            workers[slot] = start(slot)
            started[slot] = time.monotonic()
            alive += 1
        if stopping and alive == 0:
            break
        time.sleep(0.1)
    sock.close()
    return 1 if failed else 0
