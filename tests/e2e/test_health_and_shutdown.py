"""Health states from the prober, readiness, and the graceful shutdown sequence."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import orjson
from procs import Proc, gateway_config, http_get, http_post, sim_control, start_gateway, start_sim, wait_until


def _replica_state(gw: Proc, model: str) -> str:
    _, text = http_get(gw.url + "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(f'portcullis_replica_state{{model="{model}"') and line.endswith(" 1.0"):
            return line.split('state="')[1].split('"')[0]
    return "?"


def test_readiness_follows_replica_health(tmp_path: Path) -> None:
    sim = start_sim("--loading-s", "60", log_dir=tmp_path, ready_status=(503,))
    other = start_sim(log_dir=tmp_path)
    gw = start_gateway(gateway_config({"a": [sim.url], "b": [other.url]}), tmp_path)
    try:
        assert http_get(gw.url + "/healthz")[0] == 200
        # a loading llama-server is warming, not down, and its model makes the gateway unready
        status, body = http_get(gw.url + "/readyz")
        assert status == 503
        assert orjson.loads(body)["models_without_ready_replica"] == ["a"]
        assert _replica_state(gw, "a") == "warming"
        sim_control(sim, loading=False)
        wait_until(lambda: http_get(gw.url + "/readyz")[0] == 200, what="ready after loading")
        assert _replica_state(gw, "a") == "ready"
        # a replica that stops answering is down; its model unready; requests get 503, not a hang
        sim.stop()
        wait_until(lambda: _replica_state(gw, "a") == "down", what="replica seen down")
        status, body = http_get(gw.url + "/readyz")
        assert status == 503 and orjson.loads(body)["models_without_ready_replica"] == ["a"]
        status, raw = http_post(
            gw.url + "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}]}
        )
        assert status == 503 and orjson.loads(raw)["error"]["code"] == "no_ready_replica"
        assert http_get(gw.url + "/healthz")[0] == 200
    finally:
        gw.stop()
        sim.stop()
        other.stop()


def _stream_in_thread(url: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["status"], result["raw"] = http_post(
                url + "/v1/chat/completions",
                {
                    "model": "m",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": max_tokens,
                    "stream": True,
                },
                timeout=30,
            )
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _events(raw: bytes) -> list[str]:
    return [e for e in raw.decode().split("\n\n") if e.strip()]


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


SLOW_SIM = ("--tokens-per-s", "10", "--default-max-tokens", "1000")  # conftest's slow_sim


def test_sigterm_drains_in_flight_streams_then_exits_0(slow_sim: Proc, tmp_path: Path) -> None:
    cfg = gateway_config({"m": [slow_sim.url]}, server={"drain_grace_s": 0.5, "shutdown_timeout_s": 10})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        thread, result = _stream_in_thread(gw.url, max_tokens=30)  # 3 s of streaming
        wait_until(
            lambda: "m" in http_get(gw.url + "/metrics")[1].decode() and _in_flight(gw) == 1, what="stream started"
        )
        gw.signal(signal.SIGTERM)
        # at once: not ready any more, but still accepting during the grace
        wait_until(lambda: http_get(gw.url + "/readyz")[0] == 503, timeout=0.4, what="readyz 503 at once")
        # after the grace: new connections are refused while the stream still runs
        wait_until(lambda: not _connectable(gw.port), timeout=3, what="listener closed")
        assert thread.is_alive()
        thread.join(timeout=15)
        assert result.get("status") == 200, result
        events = _events(result["raw"])
        assert events[-1] == "data: [DONE]"  # the stream ran to completion
        assert gw.wait(timeout=10) == 0
    finally:
        gw.stop()


def test_stream_cut_at_shutdown_deadline_ends_with_error_event(slow_sim: Proc, tmp_path: Path) -> None:
    cfg = gateway_config({"m": [slow_sim.url]}, server={"drain_grace_s": 0.1, "shutdown_timeout_s": 1})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        thread, result = _stream_in_thread(gw.url, max_tokens=100)  # about 10 s: longer than the deadline
        wait_until(lambda: _in_flight(gw) == 1, what="stream started")
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        thread.join(timeout=15)
        assert time.monotonic() - started < 5
        assert result.get("status") == 200, result
        last = _events(result["raw"])[-1]
        assert last.startswith("data: {")
        assert orjson.loads(last[6:])["error"]["code"] == "server_shutting_down"
        assert gw.wait(timeout=10) == 0
    finally:
        gw.stop()


def _in_flight(gw: Proc) -> float:
    _, text = http_get(gw.url + "/metrics")
    return sum(
        float(line.split()[-1])
        for line in text.decode().splitlines()
        if line.startswith("portcullis_replica_in_flight{")
    )
