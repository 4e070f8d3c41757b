"""Abuse controls before authentication, CORS, and TLS with HSTS."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path

import httpx2 as httpx  # the openai SDK 3.x transport
import openai
import orjson
import pytest
import trustme
from procs import ADMIN_KEY, Proc, gateway_config, http_get, start_gateway

from portcullis.identity.throttle import FailedAuthThrottle


def _models(gw: Proc, key: str | None, forwarded_for: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"authorization": f"Bearer {key}" if key else None, "x-forwarded-for": forwarded_for}
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/v1/models", headers={k: v for k, v in headers.items() if v is not None})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_failed_authentications_are_throttled_per_address(sim: Proc, tmp_path: Path) -> None:
    cfg = gateway_config({"tiny": [sim.url]}, auth={"failed_auth_per_minute": 3})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        for _ in range(3):
            assert _models(gw, "pc-0123456789abcdef-wrong-wrong-wrong-wrong-wrong-wrong")[0] == 401
        status, headers, body = _models(gw, "pc-0123456789abcdef-wrong-wrong-wrong-wrong-wrong-wrong")
        assert status == 429 and 0 < int(headers["retry-after"]) <= 60
        assert orjson.loads(body)["error"]["code"] == "too_many_failed_auth"
        # throttled before authentication: even a valid key from this address waits
        assert _models(gw, ADMIN_KEY)[0] == 429
        # X-Forwarded-For from an untrusted peer changes nothing
        assert _models(gw, ADMIN_KEY, forwarded_for="198.51.100.7")[0] == 429
    finally:
        gw.stop()


def test_forwarded_address_counts_only_behind_a_trusted_proxy(sim: Proc, tmp_path: Path) -> None:
    cfg = gateway_config(
        {"tiny": [sim.url]}, auth={"failed_auth_per_minute": 2}, server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:
        for _ in range(2):
            assert _models(gw, None, forwarded_for="203.0.113.9")[0] == 401
        assert _models(gw, ADMIN_KEY, forwarded_for="203.0.113.9")[0] == 429
        # another client behind the same proxy is not affected; a spoofed left-most hop is ignored
        assert _models(gw, ADMIN_KEY, forwarded_for="203.0.113.10")[0] == 200
        assert _models(gw, ADMIN_KEY, forwarded_for="203.0.113.9, 203.0.113.11")[0] == 200
    finally:
        gw.stop()


def test_throttle_window_reopens() -> None:
    clock = [0.0]
    throttle = FailedAuthThrottle(2, clock=lambda: clock[0])
    throttle.failed("a")
    throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(60)
    assert throttle.retry_after("b") is None
    clock[0] = 59.5
    assert throttle.retry_after("a") == pytest.approx(0.5)
    clock[0] = 60.0
    assert throttle.retry_after("a") is None


def test_cors_preflight_allowed_and_refused(sim: Proc, tmp_path: Path) -> None:
    cfg = gateway_config({"tiny": [sim.url]}, server={"cors_origins": ["https://app.example"]})
    gw = start_gateway(cfg, tmp_path, ready_path="/readyz")
    try:

        def preflight(origin: str) -> http.client.HTTPResponse:
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            conn.request(
                "OPTIONS",
                "/v1/chat/completions",
                headers={
                    "origin": origin,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization, content-type",
                },
            )
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp

        allowed = preflight("https://app.example")
        assert allowed.status == 204
        assert allowed.getheader("content-length") is None  # (a 204 has no length: RFC 9110 section 8.6)
        assert allowed.getheader("access-control-allow-origin") == "https://app.example"
        assert "POST" in allowed.getheader("access-control-allow-methods")
        assert "authorization" in allowed.getheader("access-control-allow-headers")
        refused = preflight("https://evil.example")
        assert refused.status == 403 and refused.getheader("access-control-allow-origin") is None
        status, _ = http_get(gw.url + "/v1/models", headers={"origin": "https://app.example"})
        assert status == 200
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.request(
            "GET", "/v1/models", headers={"origin": "https://app.example", "authorization": f"Bearer {ADMIN_KEY}"}
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("access-control-allow-origin") == "https://app.example"
        exposed = resp.getheader("access-control-expose-headers")
        assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed and "retry-after-ms" in exposed
    finally:
        gw.stop()


def test_no_cors_by_default(gateway: Proc) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request(
        "OPTIONS", "/v1/models", headers={"origin": "https://app.example", "access-control-request-method": "GET"}
    )
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 403 and resp.getheader("access-control-allow-origin") is None


def test_tls_round_trip_with_hsts(sim: Proc, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = gateway_config({"tiny": [sim.url]})
    gw = _start_tls_gateway(cfg, tmp_path, cert_file, key_file, ca_file)
    try:
        base = f"https://127.0.0.1:{gw.port}/v1"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file))) as http_client:
            client = openai.OpenAI(base_url=base, api_key=ADMIN_KEY, http_client=http_client, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
            assert raw.parse().model == "tiny"
            assert raw.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.ConnectError), httpx.Client() as untrusting:  # a client that does not trust the CA
            untrusting.get(base + "/models")
    finally:
        gw.stop()


def _start_tls_gateway(cfg: dict, tmp_path: Path, cert: Path, key: Path, ca: Path) -> Proc:
    """start_gateway's readiness probe speaks plain HTTP; poll over TLS here instead."""
    import procs

    original = procs.http_get

    def tls_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, bytes]:
        https = url.replace("http://", "https://")
        try:
            with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=timeout) as c:
                r = c.get(https)
                return r.status_code, r.content
        except httpx.TransportError:  # not serving yet (the socket accepts before uvicorn answers)
            return 0, b""

    procs.http_get = tls_get
    try:
        return start_gateway(
            cfg, tmp_path, ready_path="/healthz", extra_args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        )
    finally:
        procs.http_get = original
