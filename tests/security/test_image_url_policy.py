"""Issue 17, point 10 (image URLs): a chat message cannot make the upstream fetch an internal address.

llama-server and vLLM download an http(s) image_url themselves, from inside the network. The gateway
(a real process: `gw` with the default policy, `gw_listed` with the allow-list
`images.example.com`, `gw_any` allowing every public host over http and https) accepts data: URLs and
URLs on the allow-list, and refuses loopback, private and link-local addresses in the spellings a
fetching client reads (IPv4 as inet_aton takes it, IPv4 carried in IPv6), whatever the allow-list says,
with a 400 naming the message.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from procs import Proc, gateway_config, http_post, start_gateway

PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """The default policy: data: URLs only."""
    proc = start_gateway(gateway_config({"tiny": [sim.url]}), module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw_listed(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """https URLs on images.example.com allowed too."""
    cfg = gateway_config({"tiny": [sim.url]}, validation={"image_urls": {"allowed_hosts": ["images.example.com"]}})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw_any(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """Every public host, plain http too: only the address check stands between a URL and the upstream."""
    cfg = gateway_config({"tiny": [sim.url]}, validation={"image_urls": {"allowed_hosts": ["*"], "allow_http": True}})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def with_image(url: str, *, kind: str = "image_url") -> dict[str, Any]:
    """The image is in messages[1], content part 1."""
    return {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": "describe images"},
            {"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": kind, kind: {"url": url}}]},
        ],
    }


# Refused whatever the allow-list says.
INTERNAL_HOSTS = [
    "http://127.0.0.1:{sim_port}/slots",  # the upstream's own admin endpoints
    "https://169.254.169.254/latest/meta-data/iam/",  # cloud metadata
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://10.0.0.5/x.png",
    "https://[::1]/x.png",
    "https://[::ffff:127.0.0.1]/x.png",
    "https://2130706433/x.png",  # 127.0.0.1 as one number
    "https://0x7f.1/x.png",
    "https://localhost/x.png",
    "https://images.example.com@127.0.0.1/x.png",  # the allowed name as userinfo
    "https://127.0.0.1\\@images.example.com/x.png",  # parsers split this one differently
]
INTERNAL = [
    *INTERNAL_HOSTS,
    "https://evil.example.net/x.png",  # not on the allow-list
    "http://images.example.com/x.png",  # plain http
    "file:///etc/passwd",
]


def refused(gw: Proc, url: str) -> None:
    status, raw = http_post(gw.url + "/v1/chat/completions", with_image(url))
    assert status == 400, f"{url} was forwarded: {status} {raw[:200]!r}"
    error = orjson.loads(raw)["error"]
    assert error["code"] == "url_not_allowed", error
    assert error["param"] == "messages[1].content[1].image_url.url"
    assert "messages[1]" in error["message"]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_and_remote_urls_are_refused_by_default(gw: Proc, sim: Proc, url: str) -> None:
    refused(gw, url.format(sim_port=sim.port))


@pytest.mark.parametrize("url", INTERNAL)
def test_an_allow_list_never_opens_internal_addresses(gw_listed: Proc, sim: Proc, url: str) -> None:
    refused(gw_listed, url.format(sim_port=sim.port))


# IPv4 addresses carried in IPv6: a NAT64 gateway or a dual-stack host delivers these to the IPv4 address.
CARRIED = [
    ("http://[64:ff9b::7f00:1]/x.png", "loopback"),  # NAT64 well-known prefix: 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "link-local"),  # NAT64: 169.254.169.254
    ("https://[64:ff9b::a00:5]/x.png", "private"),  # NAT64: 10.0.0.5
    ("https://[64:ff9b:1::808:808]/x.png", "private or reserved"),  # local-use NAT64: internal whatever it holds
    ("http://[::127.0.0.1]/", "loopback"),  # IPv4-compatible
    ("http://[::a9fe:a9fe]/", "link-local"),
    ("http://[::ffff:0:7f00:1]/", "loopback"),  # SIIT
    ("http://[::ffff:0:c0a8:101]/", "private"),  # SIIT: 192.168.1.1
    ("http://[::1:2:3:4]/", "private or reserved"),  # the rest of ::/8: nothing public lives there
    ("http://[::ffff:127.1]/", "malformed"),  # no IPv6 address: Python's URL parser raised on it
    ("http://[v1.fe80::a+en1]/", "malformed"),  # an IPvFuture literal this check cannot read
]


@pytest.mark.parametrize(("url", "reason"), CARRIED)
def test_ipv4_carried_in_ipv6_is_judged_as_ipv4(gw_any: Proc, url: str, reason: str) -> None:
    status, raw = http_post(gw_any.url + "/v1/chat/completions", with_image(url))
    assert status == 400, f"{url} was forwarded: {status} {raw[:200]!r}"
    error = orjson.loads(raw)["error"]
    assert (error["code"], error["param"]) == ("url_not_allowed", "messages[1].content[1].image_url.url"), error
    assert reason in error["message"], error


@pytest.mark.parametrize("url", INTERNAL_HOSTS)
def test_every_host_allowed_still_refuses_internal_addresses(gw_any: Proc, sim: Proc, url: str) -> None:
    refused(gw_any, url.format(sim_port=sim.port))


def test_public_addresses_pass_with_every_host_allowed(gw_any: Proc) -> None:
    # The control: a public IPv4 address behind NAT64 or compatible, and a public IPv6 address, still pass.
    for url in ("https://[64:ff9b::808:808]/x.png", "https://[::8.8.8.8]/x.png", "https://[2606:4700::1111]/x.png"):
        status, raw = http_post(gw_any.url + "/v1/chat/completions", with_image(url))
        assert status == 200, (url, raw[:300])


def test_other_fetched_media_follow_the_same_policy(gw: Proc) -> None:
    # vLLM fetches video_url and audio_url parts the same way.
    for kind in ("video_url", "audio_url"):
        status, raw = http_post(gw.url + "/v1/chat/completions", with_image("https://169.254.169.254/", kind=kind))
        assert status == 400, f"{kind} was forwarded: {status}"
        assert orjson.loads(raw)["error"]["param"] == f"messages[1].content[1].{kind}.url"


def test_data_and_allowed_urls_still_pass(gw: Proc, gw_listed: Proc) -> None:
    # The control: the policy refuses by address, not every image.
    status, raw = http_post(gw.url + "/v1/chat/completions", with_image(PNG))
    assert status == 200, raw[:300]
    for url in (PNG, "https://images.example.com/cat.png", "https://IMAGES.example.com./cat.png"):
        status, raw = http_post(gw_listed.url + "/v1/chat/completions", with_image(url))
        assert status == 200, (url, raw[:300])


def test_an_internal_host_on_the_allow_list_stops_startup(tmp_path: Path) -> None:
    cfg = gateway_config(
        {"tiny": ["http://127.0.0.1:9"]}, validation={"image_urls": {"allowed_hosts": ["169.254.169.254"]}}
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "portcullis", "config", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "validation.image_urls.allowed_hosts" in out and "link-local" in out, out
    assert str(path) in out or path.name in out, out
