"""Commands that talk to a running gateway over HTTP, as any client would:

    portcullis batch submit FILE.jsonl [--endpoint ...] [--window 24h] [--wait [-o OUT.jsonl]]
    portcullis batch status ID | list | cancel ID | download ID [--errors] [-o FILE]
    portcullis route explain REQUEST.json [--config FILE]

The gateway's address and key come from --url / --key, or PORTCULLIS_URL (default
http://127.0.0.1:8000) and PORTCULLIS_API_KEY (or OPENAI_API_KEY). `route explain` asks the running
gateway (`POST /admin/route`, scope admin:read) what it would do now; with --config and no --url it
answers from the configuration alone (every replica assumed ready and idle, nothing observed yet).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

_ENDED = ("completed", "failed", "expired", "cancelled")


def add_parsers(sub: Any) -> None:
    def remote(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", default=None, help="the gateway (default: PORTCULLIS_URL or http://127.0.0.1:8000)")
        p.add_argument("--key", default=None, help="API key (default: PORTCULLIS_API_KEY or OPENAI_API_KEY)")
        p.add_argument("--json", action="store_true", help="print the JSON objects")
        return p

    batch = sub.add_parser("batch", help="submit and follow batch jobs on a running gateway")
    batch_sub = batch.add_subparsers(dest="batch_command", required=True)
    submit = remote(batch_sub.add_parser("submit", help="upload a JSONL file and start a batch"))
    submit.add_argument("file", type=Path)
    submit.add_argument("--endpoint", default="/v1/chat/completions")
    submit.add_argument("--window", default="24h", help="completion window, e.g. 24h")
    submit.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    submit.add_argument("-o", "--output", type=Path, default=None, help="with --wait: write the output file here")
    status = remote(batch_sub.add_parser("status", help="show a batch"))
    status.add_argument("id")
    remote(batch_sub.add_parser("list", help="your batches, newest first"))
    cancel = remote(batch_sub.add_parser("cancel", help="cancel a batch"))
    cancel.add_argument("id")
    download = remote(batch_sub.add_parser("download", help="write a batch's output (or error) file"))
    download.add_argument("id")
    download.add_argument("--errors", action="store_true", help="the error file instead of the output file")
    download.add_argument("-o", "--output", type=Path, default=None, help="default: standard output")

    route = sub.add_parser("route", help="routing tools")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    explain = remote(route_sub.add_parser("explain", help="which model and deployment would serve a request, and why"))
    explain.add_argument("request", type=Path, help="a chat or completion request body (JSON)")
    explain.add_argument("--config", default=None, help="answer from this config alone, without a gateway")
    explain.add_argument("--max-cost", default=None, help="as x-portcullis-max-cost")
    explain.add_argument("--latency-budget-ms", default=None, help="as x-portcullis-latency-budget-ms")


class RemoteError(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: `portcullis --help` should not pay for the client and the event loop (0.3 s).
    import asyncio

    import aiohttp

    try:
        if args.command == "route":
            return asyncio.run(_explain(args))
        return asyncio.run(_batch(args))
    except RemoteError as exc:
        print(f"portcullis {args.command}: {exc}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as exc:
        print(f"portcullis {args.command}: cannot reach the gateway: {exc}", file=sys.stderr)
        return 1


class _Gateway:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url = (args.url or os.environ.get("PORTCULLIS_URL") or "http://127.0.0.1:8000").rstrip("/")
        key = args.key or os.environ.get("PORTCULLIS_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise RemoteError("no API key: give --key or set PORTCULLIS_API_KEY")
        self.headers = {"authorization": f"Bearer {key}"}
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    async def __aenter__(self) -> _Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                try:
                    message = orjson.loads(raw)["error"]["message"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    message = raw.decode(errors="replace")[:500]
                raise RemoteError(f"{method} {path}: {resp.status}: {message}")
            return orjson.loads(raw)

    async def content(self, file_id: str) -> bytes:
        async with self.session.get(f"{self.url}/v1/files/{file_id}/content", headers=self.headers) as resp:
            if resp.status >= 400:
                raise RemoteError(f"GET /v1/files/{file_id}/content: {resp.status}")
            return await resp.read()


async def _batch(args: argparse.Namespace) -> int:
    async with _Gateway(args) as gw:
        cmd = args.batch_command
        if cmd == "submit":
            return await _submit(gw, args)
        if cmd == "status":
            _show(await gw.call("GET", f"/v1/batches/{args.id}"), args.json)
            return 0
        if cmd == "list":
            listing = await gw.call("GET", "/v1/batches?limit=100")
            if args.json:
                print(orjson.dumps(listing).decode())
            for b in [] if args.json else listing["data"]:
                c = b["request_counts"]
                done = f"{c['completed']}/{c['total']} done, {c['failed']} failed"
                print(f"{b['id']}  {b['status']:11s} {done}  {b['endpoint']}")
            return 0
        if cmd == "cancel":
            _show(await gw.call("POST", f"/v1/batches/{args.id}/cancel"), args.json)
            return 0
        batch = await gw.call("GET", f"/v1/batches/{args.id}")
        file_id = batch.get("error_file_id" if args.errors else "output_file_id")
        if file_id is None:
            raise RemoteError(f"batch {args.id} ({batch['status']}) has no {'error' if args.errors else 'output'} file")
        _write(await gw.content(file_id), args.output)
        return 0


async def _submit(gw: _Gateway, args: argparse.Namespace) -> int:
    try:
        content = args.file.read_bytes()
    except OSError as exc:
        raise RemoteError(f"cannot read {args.file}: {exc.strerror}") from exc
    lines = sum(1 for x in content.splitlines() if x.strip())
    print(f"uploading {args.file} ({len(content) / 1e6:.1f} MB, {lines} requests) ...", file=sys.stderr)
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename=args.file.name, content_type="application/jsonl")
    file = await gw.call("POST", "/v1/files", data=form)
    batch = await gw.call(
        "POST",
        "/v1/batches",
        data=orjson.dumps({"input_file_id": file["id"], "endpoint": args.endpoint, "completion_window": args.window}),
        headers={"content-type": "application/json"},
    )
    if batch["status"] == "failed":
        _show(batch, args.json)
        return 1
    print(f"batch {batch['id']}: {batch['request_counts']['total']} requests, {batch['status']}", file=sys.stderr)
    if not args.wait:
        _show(batch, args.json)
        return 0
    batch = await _follow(gw, batch)
    _show(batch, args.json)
    if args.output is not None and batch.get("output_file_id"):
        _write(await gw.content(batch["output_file_id"]), args.output)
    return 0 if batch["status"] == "completed" else 1


async def _follow(gw: _Gateway, batch: dict[str, Any]) -> dict[str, Any]:
    """Poll once a second, drawing a progress bar on standard error, until the batch ends."""
    import asyncio

    started = time.monotonic()
    tty = sys.stderr.isatty()
    last = ""
    while batch["status"] not in _ENDED:
        await asyncio.sleep(1.0)
        batch = await gw.call("GET", f"/v1/batches/{batch['id']}")
        line = progress_line(batch, time.monotonic() - started)
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif line != last:
            print(line, file=sys.stderr, flush=True)
        last = line
    if tty:
        print(file=sys.stderr)
    return batch


def progress_line(batch: dict[str, Any], elapsed_s: float, width: int = 30) -> str:
    counts = batch["request_counts"]
    total = max(1, counts["total"])
    done = counts["completed"] + counts["failed"]
    filled = round(width * done / total)
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = f", ETA {round((total - done) / rate)}s" if rate > 0 and done < total else ""
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{counts['total']} "
        f"({counts['failed']} failed) {rate:.1f}/s{eta}  {batch['status']}"
    )


def _show(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(obj).decode())
        return
    counts = obj.get("request_counts") or {}
    print(
        f"{obj['id']}: {obj['status']}  {counts.get('completed', 0)}/{counts.get('total', 0)} completed, "
        f"{counts.get('failed', 0)} failed"
    )
    for name in ("endpoint", "model", "input_file_id", "output_file_id", "error_file_id", "completion_window"):
        if obj.get(name):
            print(f"  {name}: {obj[name]}")
    for name in ("created_at", "expires_at", "completed_at", "failed_at", "expired_at", "cancelled_at"):
        if obj.get(name):
            print(f"  {name}: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(obj[name]))}")
    for error in (obj.get("errors") or {}).get("data", []):
        print(f"  line {error.get('line')}: {error.get('code')}: {error.get('message')}")


def _write(content: bytes, path: Path | None) -> None:
    if path is None:
        sys.stdout.buffer.write(content)
        sys.stdout.flush()
        return
    path.write_bytes(content)
    print(f"wrote {path} ({len(content)} bytes)", file=sys.stderr)


# -- route explain -----------------------------------------------------------------------------------


async def _explain(args: argparse.Namespace) -> int:
    try:
        payload = orjson.loads(args.request.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise RemoteError(f"cannot read the request {args.request}: {exc}") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise RemoteError("the request must be a JSON object with a 'model'")
    headers = {}
    if args.max_cost is not None:
        headers["x-portcullis-max-cost"] = args.max_cost
    if args.latency_budget_ms is not None:
        headers["x-portcullis-latency-budget-ms"] = args.latency_budget_ms
    if args.config and not args.url:
        explained = await _explain_offline(args.config, payload, headers)
    else:
        async with _Gateway(args) as gw:
            explained = await gw.call(
                "POST",
                "/admin/route",
                data=orjson.dumps(payload),
                headers={"content-type": "application/json", **headers},
            )
    if args.json:
        print(orjson.dumps(explained).decode())
        return 0
    print(render_explanation(explained))
    return 0


async def _explain_offline(path: str, payload: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    from portcullis.config import ConfigError, load_config
    from portcullis.errors import GatewayError
    from portcullis.obs.metrics import Metrics
    from portcullis.routing.admission import Admission
    from portcullis.routing.affinity import Affinity
    from portcullis.routing.catalog import Catalog, ReplicaState
    from portcullis.routing.router import Router

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise RemoteError(exc.render()) from exc
    catalog = Catalog.from_config(config)
    for replica in catalog.all_replicas():
        replica.state = ReplicaState.READY  # assumed: nothing is probed offline
    admission = Admission(config, catalog, Metrics(catalog))
    router = Router(config, catalog, admission, Affinity(config.routing.affinity))

    class _Headers:  # the Request interface constraints() reads
        def header(self, name: bytes) -> bytes | None:
            value = headers.get(name.decode())
            return value.encode() if value is not None else None

    try:
        name = catalog.resolve(payload["model"])
        constraints = router.constraints(_Headers(), payload)  # type: ignore[arg-type]
        decision = await router.decide(name, payload, constraints, None, asked=payload["model"])
    except GatewayError as exc:
        raise RemoteError(f"the gateway would answer {exc.status}: {exc.message}") from exc
    chosen = router.explain_replica(decision, payload)
    return {
        **decision.public(),
        "replica": chosen.name if chosen is not None else None,
        "header": decision.header().decode() if decision.router is not None else None,
        "note": "from the configuration alone: every replica assumed ready and idle, nothing observed yet",
    }


def render_explanation(e: dict[str, Any]) -> str:
    lines = [f"{e['asked']} -> model {e['model']}" + (f", replica {e['replica']}" if e.get("replica") else "")]
    lines.append(f"  reason: {e['reason']}")
    if e.get("complexity") is not None:
        lines.append(f"  complexity: {e['complexity']:.3f}   prompt tokens (estimate): {e['prompt_tokens_estimate']}")
    if e.get("estimated_cost") is not None:
        lines.append(f"  estimated cost: {e['estimated_cost']:.6g}")
    if e.get("need_tokens"):
        lines.append(f"  needs a context of {e['need_tokens']} tokens")
    for c in e.get("candidates") or []:
        verdict = c["excluded"] or ("chosen" if c["model"] == e["model"] else "eligible")
        latency = f"{c['estimated_latency_s']}s" if c["estimated_latency_s"] is not None else "unknown"
        lines.append(
            f"  - {c['model']:20s} quality {c['quality']:.2f}  cost {c['estimated_cost']:.6g}  "
            f"latency {latency}  free slot {'yes' if c['free_slot'] else 'no'}  {verdict}"
        )
    if e.get("note"):
        lines.append(f"  ({e['note']})")
    return "\n".join(lines)
