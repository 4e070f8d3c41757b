"""Shared fixtures: the simulator and a gateway per module, and the machine's services.

PostgreSQL comes from PORTCULLIS_TEST_DATABASE_URL (default: postgres on 127.0.0.1:5432, database
`test`); a module that asks for `database_url` runs on SQLite and on PostgreSQL, with a database of its
own created and dropped here. Redis likewise from PORTCULLIS_TEST_REDIS_URL. Under CI=true a missing
service fails the tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import openai
from procs import IN_CI, Proc, bind_loopback, gateway_config, openai_client, start_gateway, start_sim, wait_until


@pytest.fixture
def reaper() -> Iterator[Callable[[Any], Any]]:
    """`reaper(proc)` returns proc and stops it when the test ends, however it ends (a gateway that fails to
    start must not leave its simulators behind)."""
    started: list[Any] = []

    def keep(proc: Any) -> Any:
        started.append(proc)
        return proc

    yield keep
    for proc in reversed(started):
        stop = getattr(proc, "close", None) or getattr(proc, "stop", None) or proc.kill
        with contextlib.suppress(Exception):
            stop()


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mod")


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "4", "--n-ctx", "512", "--model-alias", "tiny-sim.gguf", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"tiny": [sim.url], "tiny-embed": [sim.url]},
        validation={"max_json_depth": 16},
        # Modules on this gateway inject faults to see how errors look; a breaker that opened on them
        # would turn later tests' answers into 503s (breakers have tests of their own: tests/chaos).
        resilience={"breaker": {"failures": 1000}},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(gateway: Proc) -> Proc:
    """The module's gateway: the shared one above, unless the module starts one of its own under this name."""
    return gateway


@pytest.fixture(scope="module")
def client(gw: Proc) -> openai.OpenAI:
    """The openai SDK on the module's gateway `gw`, with the admin key."""
    return openai_client(gw)


@pytest.fixture(scope="module")
def slow_sim(request: pytest.FixtureRequest, module_tmp: Path) -> Iterator[Proc]:
    """A simulator slowed down as the module says: its command-line options in the module's SLOW_SIM."""
    proc = start_sim(*request.module.SLOW_SIM, log_dir=module_tmp)
    yield proc
    proc.stop()


PG_URL = os.environ.get("PORTCULLIS_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PORTCULLIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _missing(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable ({exc})"
    if IN_CI:
        pytest.fail(message + " and CI=true requires it")
    pytest.skip(message)


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def scratch_postgres(prefix: str = "portcullis_test") -> Iterator[str]:
    """A PostgreSQL database of its own, created and dropped (skipped, or failed under CI, without one)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        _pg_admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        _missing("PostgreSQL", exc)
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, module_tmp: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{module_tmp}/identity-{secrets.token_hex(4)}.db"
        return
    with scratch_postgres() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """PostgreSQL only, for one test."""
    with scratch_postgres() as url:
        yield url


@pytest.fixture(scope="module")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:
        _missing("Redis", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-node Redis Cluster of our own (masters only), on spare loopback ports."""
    import shutil
    import subprocess
    import time

    import redis

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        _missing("redis-server / redis-cli", FileNotFoundError("not installed"))
    assert server is not None and cli is not None
    work = tmp_path_factory.mktemp("redis-cluster")
    ports = []
    for _ in range(3):
        sock = bind_loopback()
        ports.append(sock.getsockname()[1])
        sock.close()
    procs = []
    for port in ports:
        node = work / str(port)
        node.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    server,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                cwd=node,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:

        def answers(port: int) -> bool:
            try:
                return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
            except redis.ConnectionError:
                return False

        for port in ports:
            wait_until(lambda p=port: answers(p), what=f"redis node {port}")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while redis.Redis(port=ports[0]).cluster("info").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                raise TimeoutError("the test Redis Cluster did not reach state ok")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
