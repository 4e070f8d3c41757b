"""The real llama-server the suites of this folder run against (LLAMA_SERVER_BIN), with the tiny random-weight
model of tiny_gguf.py; one per module. A module's `llama` fixture yields from `serve_llama` (not a conftest.py: the
suite's modules import the shared helpers as `conftest`, which a second conftest.py on the path would shadow)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from procs import http_get, wait_until
from tiny_gguf import write_tiny_llama

LLAMA_BIN = os.environ.get("LLAMA_SERVER_BIN")
SLOTS, CTX = 2, 1024  # 512 tokens per slot


def _free_port() -> int:
    # llama-server cannot take an inherited socket: pick a free port and hand its number over.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_llama(
    module_tmp: Path,
    write: Callable[[Path], Path] = write_tiny_llama,
    args: Sequence[str] = (),
    name: str = "tiny",
    ctx: int = CTX,
    port: int = 0,
) -> Iterator[str]:
    """A llama-server on a free port (its URL) for as long as the generator runs: a module's `llama` fixture.
    `write` makes its model (tiny_gguf's random one by default), `args` adds to its command line, `name` tells its
    files apart from another server's in the same module; `ctx` is the context of all its slots together; `port`: a
    port to listen on (a server started again where the gateway expects it), else a free one."""
    model = write(module_tmp / f"{name}.gguf")
    yield from _serve(module_tmp, ["-m", str(model), "-a", "tiny-alias"], args, name, ctx, port)


def serve_llama_router(
    module_tmp: Path, models: Sequence[str], *, models_max: int = 1, args: Sequence[str] = ()
) -> Iterator[str]:
    """A llama-server in router mode (--models-dir) holding tiny models named `models` (each its own random weights),
    at most `models_max` loaded at once: its URL, for as long as the generator runs."""
    folder = module_tmp / "router-models"
    folder.mkdir(exist_ok=True)
    for i, model in enumerate(models):
        write_tiny_llama(folder / f"{model}.gguf", seed=i)
    yield from _serve(module_tmp, ["--models-dir", str(folder), "--models-max", str(models_max)], args, "router", CTX)


def _serve(
    module_tmp: Path, model_args: list[str], args: Sequence[str], name: str, ctx: int, port: int = 0
) -> Iterator[str]:
    port = port or _free_port()
    log_path = module_tmp / f"llama-server-{name}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            LLAMA_BIN,
            *model_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(SLOTS),
            "-c",
            str(ctx),
            "-t",
            "1",
            "--no-warmup",
            "--metrics",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: proc.poll() is None and http_get(url + "/health", timeout=1)[0] == 200,
            timeout=60,
            what="llama-server ready",
        )
    except (TimeoutError, OSError):
        proc.kill()
        raise RuntimeError(log_path.read_text()) from None
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()
