"""Issue 17, point 7: failed-authentication throttling that a client cannot steer.

Every attack runs against real gateway processes. The test client plays the proxy: it connects from
127.0.0.1 (a trusted proxy in these configs) and writes X-Forwarded-For the way a proxy does, the client's
own header first and the address the proxy saw appended last. On the build before the issue (the configs
shipped trusting every private range) the forged part of the header chose the identity, non-addresses became
identities, attempts sent at once all got 401, and each process counted alone.
"""

from __future__ import annotations

import asyncio
import http.client
import secrets
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from procs import ADMIN_KEY, Proc, gateway_config, start_gateway

LIMIT = 20
# What the shipped configs trusted before the issue, plus the loopback the test connects from.
PRIVATE_RANGES = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
ATTACKER = "10.20.30.40"  # inside the private network (a pod, a VM): its proxy appends this
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _bad_key() -> str:
    # Well-formed with an unknown id: each one is looked up in the key store (an await), like a guess.
    return f"pc-{secrets.token_hex(8)}-{secrets.token_urlsafe(30)}"


def _attempt(gw: Proc, key: str, forwarded_for: str | None = None) -> tuple[int, dict]:
    headers = {"authorization": f"Bearer {key}"}
    if forwarded_for is not None:
        headers["x-forwarded-for"] = forwarded_for
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", "/v1/models", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status == 429:
        error = orjson.loads(body)["error"]
        assert error["code"] == "too_many_failed_auth" and error["type"] == "rate_limit_error"
        assert 0 < int(resp.getheader("retry-after")) <= 61
    return resp.status, orjson.loads(body)


def _statuses(gw: Proc, attempts: int, forwarded_for: object) -> Counter[int]:
    return Counter(
        _attempt(gw, _bad_key(), forwarded_for(i) if callable(forwarded_for) else None)[0] for i in range(attempts)
    )


def _gateway(sim: Proc, tmp_path: Path, trusted: list[str], **store: str) -> Proc:
    cfg = gateway_config(
        {"tiny": [sim.url]},
        # 200 lookups at once in SQLite on a busy machine can pass the default 0.5 s deadline (503)
        auth={"failed_auth_per_minute": LIMIT, "key_lookup_timeout_s": 20},
        server={"trusted_proxies": trusted},
        store=store,
    )
    return start_gateway(cfg, tmp_path, ready_path="/readyz")


def test_rotating_forwarded_for_from_a_trusted_peer_is_throttled(sim: Proc, tmp_path: Path) -> None:
    """50 bad keys, each with a fresh forged address; the proxy appends the attacker's real one."""
    gw = _gateway(sim, tmp_path, PRIVATE_RANGES)
    try:
        seen = _statuses(gw, 50, lambda i: f"203.0.113.{i + 1}, {ATTACKER}")
        assert seen == {401: LIMIT, 429: 50 - LIMIT}, seen
        # the attacker's own address is the one throttled, whatever it writes
        assert _attempt(gw, ADMIN_KEY, f"198.51.100.200, {ATTACKER}")[0] == 429
        assert _attempt(gw, ADMIN_KEY, "198.51.100.201")[0] == 200
    finally:
        gw.stop()


def test_a_victim_cannot_be_locked_out_by_a_forged_header(sim: Proc, tmp_path: Path) -> None:
    victim = "198.51.100.50"
    gw = _gateway(sim, tmp_path, PRIVATE_RANGES)
    try:
        seen = _statuses(gw, LIMIT + 5, lambda i: f"{victim}, {ATTACKER}")
        assert seen == {401: LIMIT, 429: 5}, seen
        # the victim, arriving through the same proxy, is not affected
        assert _attempt(gw, ADMIN_KEY, victim)[0] == 200
        assert _attempt(gw, _bad_key(), victim)[0] == 401
    finally:
        gw.stop()


def test_strings_that_are_not_addresses_are_no_identity(sim: Proc, tmp_path: Path) -> None:
    """Rotating junk in the hop a trusted proxy is supposed to have written counts under the proxy's own
    address, not under the junk."""
    junk = [
        "not-an-ip-{}",
        "unknown{}",
        "' OR 1={}--",
        "10.0.0.{}.evil",
        "{0}" * 3 + "z" * 300,
        "_hidden{}",
        "fe80::{}::1",
        "1.2.3.4 {}",
    ]
    gw = _gateway(sim, tmp_path, ["127.0.0.1/32"])
    try:
        seen = _statuses(gw, 50, lambda i: junk[i % len(junk)].format(i))
        assert seen == {401: LIMIT, 429: 50 - LIMIT}, seen
        assert _attempt(gw, ADMIN_KEY, "whatever")[0] == 429  # the proxy's address is what was counted
    finally:
        gw.stop()


def test_simultaneous_bad_attempts_get_at_most_the_limit_of_401s(sim: Proc, tmp_path: Path) -> None:
    """200 bad keys sent at once (all pass the check made before their keys are looked up): the count
    decides each answer atomically, so at most LIMIT (+0) are told 401 and the rest get 429."""
    gw = _gateway(sim, tmp_path, [])

    async def burst() -> Counter[int]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            start = asyncio.Event()

            async def one() -> int:
                await start.wait()
                async with session.get(
                    gw.url + "/v1/models", headers={"authorization": f"Bearer {_bad_key()}"}
                ) as resp:
                    await resp.read()
                    return resp.status

            tasks = [asyncio.create_task(one()) for _ in range(200)]
            await asyncio.sleep(0)  # every task is waiting on the event
            start.set()
            return Counter(await asyncio.gather(*tasks))

    try:
        seen = asyncio.run(burst())
        assert seen[401] <= LIMIT and seen[401] + seen[429] == 200, seen
        assert seen[429] >= 200 - LIMIT
    finally:
        gw.stop()


def test_two_gateways_sharing_redis_share_the_count(sim: Proc, redis_url: str, tmp_path: Path) -> None:
    import redis

    # A fresh client address per run: the count lives in the shared Redis for a minute.
    client = f"198.18.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
    first = _gateway(sim, tmp_path, ["127.0.0.1/32"], redis_url=redis_url)
    second = _gateway(sim, tmp_path, ["127.0.0.1/32"], redis_url=redis_url)
    try:
        a = _statuses(first, 15, lambda i: client)
        b = _statuses(second, 15, lambda i: client)
        assert a == {401: 15} and b == {401: LIMIT - 15, 429: 30 - LIMIT}, (a, b)
        # the first gateway learns it from the shared count at its next failure
        assert _attempt(first, _bad_key(), client)[0] == 429
        # and both now refuse the address before looking at its credentials
        assert _attempt(first, ADMIN_KEY, client)[0] == 429
        assert _attempt(second, ADMIN_KEY, client)[0] == 429
        assert 0 < redis.Redis.from_url(redis_url).pttl(f"pc:authfail:{client}") <= 60_000
    finally:
        first.stop()
        second.stop()
        redis.Redis.from_url(redis_url).delete(f"pc:authfail:{client}")


def test_trusting_every_peer_stops_startup(sim: Proc, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)trusted_proxies.*trusts every peer"):
        gw = _gateway(sim, tmp_path, ["0.0.0.0/0"])
        gw.stop()


def _trusted_lists() -> dict[str, list[str]]:
    found = {"deploy/portcullis.yaml": yaml.safe_load((DEPLOY / "portcullis.yaml").read_text())}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for name, text in ((doc or {}).get("data") or {}).items():
                if name.endswith((".yaml", ".yml")):
                    found[f"{path.relative_to(DEPLOY.parent)}:{name}"] = yaml.safe_load(text)
    lists = {where: ((cfg or {}).get("server") or {}).get("trusted_proxies") or [] for where, cfg in found.items()}
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in (compose.get("services") or {}).items():
        env = service.get("environment") or {}
        value = env.get("PORTCULLIS_SERVER__TRUSTED_PROXIES") if isinstance(env, dict) else None
        lists[f"docker-compose.yml:{name}"] = yaml.safe_load(value) if value else []
    return lists


def test_the_shipped_configs_trust_no_address_range() -> None:
    """What ships trusts no proxy at all: the operator lists theirs (docs/operations.md)."""
    lists = _trusted_lists()
    assert len(lists) >= 3
    assert {where: trusted for where, trusted in lists.items() if trusted} == {}


def _scope(peer: str, *forwarded: str) -> dict:
    return {"client": (peer, 5000), "headers": [(b"x-forwarded-for", f.encode()) for f in forwarded]}


def test_the_address_is_read_from_the_configured_hops_only() -> None:
    from ipaddress import ip_network

    from portcullis.identity.throttle import client_address

    lb, cdn = [ip_network("10.0.5.10/32")], [ip_network("10.0.5.10/32"), ip_network("192.0.2.0/24")]
    assert client_address(_scope("198.51.100.1", "203.0.113.5"), lb) == "198.51.100.1"  # untrusted peer
    assert client_address(_scope("10.0.5.10"), lb) == "10.0.5.10"  # no header: the proxy itself
    assert client_address(_scope("10.0.5.10", "1.1.1.1, 2.2.2.2", "203.0.113.5"), lb) == "203.0.113.5"
    # two proxies: the CDN's entry is trusted, so one more hop is read; a client's entry never is
    assert client_address(_scope("10.0.5.10", "1.1.1.1, 203.0.113.5, 192.0.2.7"), cdn, 2) == "203.0.113.5"
    assert client_address(_scope("10.0.5.10", "1.1.1.1, 203.0.113.5"), cdn, 2) == "203.0.113.5"
    assert client_address(_scope("10.0.5.10", "192.0.2.1, 192.0.2.7"), cdn, 2) == "192.0.2.1"
    # forms proxies write; one identity per IPv6 /64 and for an IPv4-mapped address
    assert client_address(_scope("10.0.5.10", "203.0.113.5:41000"), lb) == "203.0.113.5"
    assert client_address(_scope("10.0.5.10", "[2001:db8:1:2::9]:443"), lb) == "2001:db8:1:2::/64"
    assert client_address(_scope("10.0.5.10", "2001:db8:1:2:ffff::1"), lb) == "2001:db8:1:2::/64"
    assert client_address(_scope("10.0.5.10", "::ffff:203.0.113.5"), lb) == "203.0.113.5"
    assert client_address(_scope("::ffff:10.0.5.10", "203.0.113.5"), lb) == "203.0.113.5"
    for junk in ("unknown", "", "203.0.113.5 x", "[::1", "1.2.3.4.5", "x" * 10_000):
        assert client_address(_scope("10.0.5.10", junk), lb) == "10.0.5.10"


def test_without_redis_each_process_counts_alone() -> None:
    from portcullis.identity.throttle import FailedAuthThrottle
    from portcullis.quota.resp import RedisUnavailable

    class Down:
        calls = 0

        async def count_failure(self, key: str, window_s: float) -> tuple[int, float]:
            Down.calls += 1
            raise RedisUnavailable("refused")

    async def run() -> list[float | None]:
        throttle = FailedAuthThrottle(3, shared=Down())
        return [await throttle.record("198.51.100.1") for _ in range(5)]

    waits = asyncio.run(run())
    assert waits[:3] == [None] * 3 and all(w is not None and 59 < w <= 60 for w in waits[3:])
    assert Down.calls == 1  # not asked again until it has had time to come back


def test_ended_windows_are_forgotten_as_new_failures_arrive() -> None:
    """The table of addresses is swept a few entries per new failure, oldest first, instead of all at once
    when it is full (which made every failure in a flood of new addresses scan it whole). Ended windows
    must still go: `blocked` (addresses at their limit) returns to what is current, and while it is above 0
    every request looks its address up."""
    from portcullis.identity.throttle import FailedAuthThrottle

    clock = [0.0]
    throttle = FailedAuthThrottle(1, clock=lambda: clock[0])
    first = [f"198.51.{i // 250}.{i % 250}" for i in range(1000)]
    for address in first:
        throttle.failed(address)
    assert throttle.blocked == 1000
    clock[0] = 61.0  # every window above has ended
    assert throttle.failed(first[0]) is None  # its window reopens (counted once, not twice)
    later = [f"203.0.113.{i}" for i in range(200)]
    for address in later:
        throttle.failed(address)
    assert throttle.blocked == 1 + len(later), throttle.blocked
    assert throttle.retry_after(first[1]) is None and throttle.retry_after(first[0]) is not None
    clock[0] = 200.0  # and now those have ended too
    for i in range(30):
        throttle.failed(f"192.0.2.{i}")
    assert throttle.blocked == 30, throttle.blocked
