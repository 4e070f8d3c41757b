"""`portcullis` command line: serve, sim, config check; db, keys, usage, token (commands.py); batch and
route (remote.py, talking to a running gateway).

Only the arguments are defined at import: each command imports what it needs when it runs (the config model,
the server, SQLAlchemy and aiohttp took `portcullis --help` to 3 s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from portcullis import commands, remote

if TYPE_CHECKING:
    import socket

    from portcullis.config import Config
    from portcullis.server import DrainingServer


def _add_listen_args(p: argparse.ArgumentParser, default_port: int | None) -> None:
    p.add_argument("--host", default=None, help="address to listen on (default: from the config, or 127.0.0.1)")
    p.add_argument("--port", type=int, default=default_port, help="port to listen on (0 picks a free one)")
    p.add_argument("--fd", type=int, default=None, help="serve on an already-bound listening socket (its fd)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portcullis", description="A gateway for self-hosted LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=os.environ.get("PORTCULLIS_CONFIG"), help="YAML config file")
    serve.add_argument("--demo", action="store_true", help="embedded defaults with the simulator as backend")
    serve.add_argument("--ssl-certfile", default=None, help="serve TLS with this certificate (PEM)")
    serve.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    serve.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("PORTCULLIS_WORKERS", "1")),
        help="gateway processes on this port, sharing Redis and the database (needs store.redis_url)",
    )
    _add_listen_args(serve, None)

    sim = sub.add_parser("sim", help="run the llama-server simulator")
    _add_listen_args(sim, 8080)
    sim.add_argument("--slots", type=int, default=4)
    sim.add_argument("--n-ctx", type=int, default=4096, help="context per slot, in tokens")
    sim.add_argument("--model-alias", default="sim-model.gguf")
    sim.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    sim.add_argument(
        "--prompt-ms-per-token", type=float, default=0.0, help="prompt processing per token not in the slot's cache"
    )
    sim.add_argument("--no-prompt-cache", action="store_true", help="never reuse a slot's cached prefix")
    sim.add_argument("--tokens-per-s", type=float, default=0.0, help="generation speed (0: no delay)")
    sim.add_argument("--default-max-tokens", type=int, default=32)
    sim.add_argument("--embedding-dim", type=int, default=64)
    sim.add_argument(
        "--embedding-mode", choices=["hash", "words"], default="hash", help="words: texts sharing words are close"
    )
    sim.add_argument("--loading-s", type=float, default=0.0, help="answer 503 'Loading model' this long")
    sim.add_argument("--ping-interval-s", type=float, default=0.0, help="send ':' keep-alive pings in streams")
    sim.add_argument("--error-rate", type=float, default=0.0)
    sim.add_argument("--unavailable-rate", type=float, default=0.0)
    sim.add_argument("--hang-rate", type=float, default=0.0)
    sim.add_argument("--drop-rate", type=float, default=0.0, help="streams cut after --fault-after-tokens")
    sim.add_argument("--stream-error-rate", type=float, default=0.0)
    sim.add_argument("--fault-after-tokens", type=int, default=2)
    sim.add_argument("--fixed", action="store_true", help="answer every completion at once with a canned body")
    sim.add_argument("--stamp-chunks", action="store_true", help="add sim_emitted_at to every stream chunk")
    sim.add_argument("--reply", default=None, help="every completion answers this text (word by word)")
    sim.add_argument(
        "--moderation-trigger",
        action="append",
        default=None,
        metavar="PHRASE=CATEGORY",
        help="/v1/moderations flags texts holding PHRASE (repeatable; replaces the defaults)",
    )
    sim.add_argument(
        "--guard-trigger",
        action="append",
        default=None,
        metavar="PHRASE=CODE",
        help="as a guard model, answer 'unsafe' and CODE (e.g. S1) for PHRASE (repeatable; replaces the defaults)",
    )
    sim.add_argument("--moderation-delay-ms", type=float, default=0.0, help="/v1/moderations answers this late")
    # llama-server (cpp-httplib) closes a keep-alive connection idle for 5 s, and after 100 requests on one.
    sim.add_argument("--keep-alive-s", type=float, default=5.0, help="close a client connection idle this long")
    sim.add_argument(
        "--max-requests-per-connection", type=int, default=100, help="answer the last with 'Connection: close'"
    )
    sim.add_argument(
        "--no-native",
        action="store_true",
        help="answer llama-server's own APIs (/v1/messages, /v1/responses, token counts) 404, as an older server",
    )
    sim.add_argument("--reasoning-words", type=int, default=0, help="think this many words (reasoning_content) first")
    sim.add_argument("--slot-save-path", default=None, help="a folder for POST /slots/{id}?action=save|restore")
    router = sim.add_argument_group("router mode (llama-server --models-dir: several models loaded on demand)")
    router.add_argument("--router-models", default=None, help="comma-separated model names: serve them as a router")
    router.add_argument("--models-max", type=int, default=4, help="models loaded at once (0: no limit)")
    router.add_argument("--load-s", type=float, default=1.0, help="a model's load time")
    router.add_argument("--no-models-autoload", action="store_true", help="requests never load their model")
    router.add_argument(
        "--evict-busy",
        action="store_true",
        help="unload the least recently used model even while it serves (llama.cpp#21678), failing its requests",
    )

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    config_sub.add_parser("reference", help="print the configuration reference (docs/config-reference.md)")
    commands.add_parsers(sub)
    remote.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        if args.config_command == "reference":
            from portcullis.config_reference import render

            sys.stdout.write(render())
            return 0
        return _config_check(args.file)
    if args.command == "sim":
        return _run_sim(args)
    if args.command in ("db", "keys", "token", "usage", "audit", "orgs", "teams"):
        return commands.run(args)
    if args.command in ("batch", "route"):
        return remote.run(args)
    return _serve(args)


def _config_check(path: str) -> int:
    from portcullis.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    replicas = sum(len(m.deployments) for m in config.models.values())
    routers = f", {len(config.routers)} router(s)" if config.routers else ""
    moderators = f", {len(config.moderation.moderators)} moderator(s)" if config.moderation.moderators else ""
    print(f"{path}: ok ({len(config.models)} model(s), {replicas} deployment(s){routers}{moderators})")
    return 0


def _run_sim(args: argparse.Namespace) -> int:
    from portcullis.sim.simulator import SimSettings, Simulator

    settings = SimSettings(
        slots=args.slots,
        n_ctx=args.n_ctx,
        model_alias=args.model_alias,
        ttft_ms=args.ttft_ms,
        prompt_ms_per_token=args.prompt_ms_per_token,
        prompt_cache=not args.no_prompt_cache,
        tokens_per_s=args.tokens_per_s,
        default_max_tokens=args.default_max_tokens,
        embedding_dim=args.embedding_dim,
        embedding_mode=args.embedding_mode,
        loading_s=args.loading_s,
        ping_interval_s=args.ping_interval_s,
        error_rate=args.error_rate,
        unavailable_rate=args.unavailable_rate,
        hang_rate=args.hang_rate,
        drop_rate=args.drop_rate,
        stream_error_rate=args.stream_error_rate,
        fault_after_tokens=args.fault_after_tokens,
        fixed=args.fixed,
        stamp_chunks=args.stamp_chunks,
        reply=args.reply,
        moderation_delay_ms=args.moderation_delay_ms,
        keep_alive_s=args.keep_alive_s,
        max_requests_per_connection=args.max_requests_per_connection,
        native=not args.no_native,
        reasoning_words=args.reasoning_words,
        slot_save_path=args.slot_save_path,
    )
    for option, field in (("moderation_trigger", "moderation_triggers"), ("guard_trigger", "guard_triggers")):
        pairs = getattr(args, option)
        if pairs is not None:
            bad = [p for p in pairs if "=" not in p]
            if bad:
                flag = option.replace("_", "-")
                print(f"portcullis sim: --{flag} wants PHRASE=VALUE, not {bad[0]!r}", file=sys.stderr)
                return 2
            setattr(settings, field, dict(p.rsplit("=", 1) for p in pairs))
    import uvicorn

    from portcullis.server import uvicorn_config

    app: Any = Simulator(settings)
    if args.router_models:
        from portcullis.sim.router import RouterSettings, RouterSim

        app = RouterSim(
            RouterSettings(
                models=[m.strip() for m in args.router_models.split(",") if m.strip()],
                models_max=args.models_max,
                autoload=not args.no_models_autoload,
                load_s=args.load_s,
                evict_busy=args.evict_busy,
                model=settings,
            )
        )
    config = uvicorn_config(
        app,
        host=args.host or "127.0.0.1",
        port=args.port,
        # The simulator decides when a connection is dead (SimSettings.keep_alive_s); uvicorn's own timer only
        # frees connections left idle well past that.
        keep_alive_s=args.keep_alive_s + 5 if args.keep_alive_s else 3600,
        log_level="warning",
    )
    uvicorn.Server(config).run(sockets=_inherited(args.fd))
    return 0


def _inherited(fd: int | None) -> list[socket.socket] | None:
    """A listening socket passed by fd, wrapped without a dup. (uvicorn's own `fd=` dups it, and the
    leftover descriptor would keep accepting connections after a graceful shutdown closed the other.)"""
    import socket

    return None if fd is None else [socket.socket(fileno=fd)]


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from portcullis.config import ConfigError, load_config
    from portcullis.obs.logging import configure_logging

    if not args.demo and not args.config:
        print("portcullis serve: give --config FILE (or PORTCULLIS_CONFIG), or --demo", file=sys.stderr)
        return 2
    config: Config | None = None
    if not args.demo:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return 1
    if config is not None and (args.ssl_certfile or args.ssl_keyfile):
        config = _with_tls(config, args)
    _raise_open_files_limit()  # before --workers forks: the workers inherit it
    if args.workers != 1:
        if config is None or args.workers < 1:
            print("portcullis serve: --workers N (N >= 1) needs --config (the demo is one process)", file=sys.stderr)
            return 2
        from portcullis.workers import run_workers

        return run_workers(args, config)
    configure_logging(config.server.log_level if config else "info")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve_async(args, config))


def _raise_open_files_limit() -> None:
    """Each open stream holds two descriptors (the client's and the upstream's): take the hard limit, not the
    soft one a shell leaves (often 1,024), as servers do."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _with_tls(config: Config, args: argparse.Namespace) -> Config:
    from portcullis.config import build_config

    data = config.model_dump(mode="json")
    data["server"].update({"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile})
    return build_config(data, source="--ssl-certfile/--ssl-keyfile", environ={})


async def _serve_async(args: argparse.Namespace, config: Config | None) -> int:
    import asyncio
    import secrets
    import shutil
    import socket
    import tempfile

    from portcullis.app import StartupError, create_app
    from portcullis.config import demo_config
    from portcullis.edge import Edge, EdgeCollector, edge_limits
    from portcullis.identity import scopes
    from portcullis.server import DrainingServer, QuietServer, uvicorn_config

    sim_server = None
    sim_task = None
    demo_dir: str | None = None
    if config is None:  # --demo: start the simulator in this process, on a free loopback port
        from portcullis.sim.simulator import SimSettings, Simulator

        sim_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sim_sock.bind(("127.0.0.1", 0))
        sim_port = sim_sock.getsockname()[1]
        sim_server = QuietServer(
            uvicorn_config(
                Simulator(SimSettings(model_alias="demo.gguf", ttft_ms=80, tokens_per_s=40)),
                host="127.0.0.1",
                port=sim_port,
                keep_alive_s=10,  # the simulator itself closes connections idle for llama-server's 5 s
            )
        )
        sim_task = asyncio.create_task(sim_server.serve(sockets=[sim_sock]))
        while not sim_server.started:
            if sim_task.done():
                return 1
            await asyncio.sleep(0.01)
        # A throwaway database and key secret: the demo starts clean and prints its own key.
        demo_dir = tempfile.mkdtemp(prefix="portcullis-demo-")
        os.environ.setdefault("PORTCULLIS_KEY_SECRET", secrets.token_hex(32))
        config = demo_config(f"http://127.0.0.1:{sim_port}", f"sqlite+aiosqlite:///{demo_dir}/demo.db")

    gateway = create_app(config)
    try:
        await gateway.preflight()
    except StartupError as exc:
        print(f"portcullis serve: {exc}", file=sys.stderr)
        return 1
    demo_key = None
    if args.demo:
        assert gateway.keys is not None
        demo_key, _ = await gateway.keys.create(
            user="demo", tier="premium", scopes=tuple(sorted(scopes.ALL)), label="demo key"
        )
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    tls = {}
    if config.server.ssl_certfile:
        tls = {"ssl_certfile": str(config.server.ssl_certfile), "ssl_keyfile": str(config.server.ssl_keyfile)}
    edge = Edge(edge_limits(config.server))
    gateway.metrics.registry.register(EdgeCollector(edge))
    server = DrainingServer(
        uvicorn_config(gateway, host=host, port=port, keep_alive_s=config.server.keep_alive_s, edge=edge, **tls),
        on_drain=gateway.begin_drain,
        on_deadline=gateway.cut_in_flight,
        drain_grace_s=config.server.drain_grace_s,
        shutdown_timeout_s=config.server.shutdown_timeout_s,
    )
    if demo_key is not None:
        asyncio.get_running_loop().create_task(_demo_banner(server, demo_key))
    try:
        await server.serve(sockets=_inherited(args.fd))
    finally:
        if sim_server is not None and sim_task is not None:
            sim_server.should_exit = True
            await sim_task
        if demo_dir is not None:  # the banner promises the demo's database goes away on exit
            shutil.rmtree(demo_dir, ignore_errors=True)
    return 0 if server.started else 3


async def _demo_banner(server: DrainingServer, key: str) -> None:
    import asyncio

    from portcullis.server import bound_port

    while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
        await asyncio.sleep(0.05)
    port = bound_port(server)
    base = f"http://127.0.0.1:{port}/v1"
    print(
        f"""
Portcullis demo gateway is up on {base} (backend: the built-in llama-server simulator).

Demo API key (every scope; this demo's database is thrown away on exit):
  {key}
  Tier premium: 600 requests and 1,000,000 tokens a minute, 32 at once (see the x-ratelimit-* headers).

  curl {base}/chat/completions -H 'authorization: Bearer {key}' -H 'content-type: application/json' \\
       -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{key}')
r = c.chat.completions.create(model='demo', messages=[{{'role': 'user', 'content': 'Hi'}}])
print(r.choices[0].message.content)"

Models: demo and demo-large (chat, completions), auto (a router between them: see the x-portcullis-route
header), demo-embed (embeddings). Batch jobs: portcullis batch submit FILE.jsonl --url http://127.0.0.1:{port} --key ...
Metrics: http://127.0.0.1:{port}/metrics
Usage so far: curl 'http://127.0.0.1:{port}/admin/usage?group_by=model&format=table' -H 'authorization: Bearer {key}'
Stop with Ctrl-C.
""",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
