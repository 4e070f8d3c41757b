"""Failed-authentication throttling per client address.

Whose address: the socket's peer, unless that peer is one of `server.trusted_proxies`. Then
X-Forwarded-For is read from the right, at most `server.trusted_proxy_hops` entries (one per proxy in
front of the gateway, each of which appended the address it saw), stopping at the first entry that is not
itself a trusted proxy. Everything left of that was written by the client and is never read: a client
cannot choose its identity, nor take a victim's. An entry that is not an IP address ends the walk (the
last address proven stands), so arbitrary strings never become identities. IPv6 clients count per /64 (one
subscriber's allocation: rotating through it must not reset the count); IPv4-mapped IPv6 as IPv4.

The count: a fixed one-minute window per address, from its first failure. It is taken after a credential
was judged and decides the answer in the same atomic step: a failure past the limit is answered 429, not
401. So however many attempts arrive at once (they all pass the check made before the credential is looked
at), at most `failed_auth_per_minute` of them per window are told 401. With Redis (the quota store) the
count is one script call shared by every process and gateway; without it, or while Redis fails, each
process counts alone. This process remembers addresses over the limit, so later attempts are refused before
any credential is looked at (`retry_after`).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from typing import Any, Protocol

from portcullis.obs.logging import get_logger
from portcullis.quota.resp import RedisReplyError, RedisUnavailable

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

WINDOW_S = 60.0
# Ended windows forgotten per new window at most: a failure's bookkeeping costs the same however many
# addresses are remembered, and ended windows still go faster than new ones arrive.
_SWEEP_BATCH = 8
_SHARED_RETRY_S = 5.0  # after a Redis failure, count in process this long before asking Redis again
_KEY_PREFIX = "pc:authfail:"

log = get_logger("portcullis.identity")


def trusted_networks(cidrs: list[str]) -> list[_Network]:
    """`server.trusted_proxies` as networks (validated at startup: config.py)."""
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def client_address(scope: dict[str, Any], trusted: list[_Network], hops: int = 1) -> str:
    """The identity failed authentications are counted under (see the module docstring): the client's address,
    an IPv6 client's /64 (one host has them all)."""
    address = _client(scope, trusted, hops)
    return address if isinstance(address, str) else _identity(address)


def peer_address(scope: dict[str, Any], trusted: list[_Network], hops: int = 1) -> str:
    """The client's address itself, read the same way (the audit log's `source`)."""
    return str(_client(scope, trusted, hops))


def _client(scope: dict[str, Any], trusted: list[_Network], hops: int) -> _Address | str:
    peer = (scope.get("client") or ("unknown", 0))[0]
    address = _parse(peer) if isinstance(peer, str) else None
    if address is None:
        return str(peer)  # a Unix socket or no peer at all: nothing better is known
    if trusted and _in(address, trusted):
        forwarded = b""
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                forwarded = forwarded + b"," + value if forwarded else value
        # Only the last `hops` entries can have been written by our proxies: split no further than that.
        entries = forwarded.decode("latin-1").rsplit(",", hops)[-hops:] if forwarded else []
        for _ in range(hops):
            if not entries or not _in(address, trusted):
                break
            hop = _parse(entries.pop().strip())
            if hop is None:
                break
            address = hop
    return address


def _parse(text: str) -> _Address | None:
    """An IP address, also as some proxies write it with a port ("1.2.3.4:5678", "[2001:db8::1]:443")."""
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: _Address, trusted: list[_Network]) -> bool:
    return any(address in net for net in trusted)


def _identity(address: _Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class SharedCounter(Protocol):
    """Where failures are counted across processes (RedisQuotaStore)."""

    async def count_failure(self, key: str, window_s: float) -> tuple[int, float]: ...


class FailedAuthThrottle:
    """At most `per_minute` failed authentications per address in a fixed one-minute window."""

    def __init__(self, per_minute: int, *, clock: Any = time.monotonic, shared: SharedCounter | None = None) -> None:
        self.per_minute = per_minute
        self.clock = clock
        # Counts in Redis when set (the gateway sets it when quotas live there).
        self.shared = shared
        self._shared_down_until = 0.0
        # address → [window start, failures], oldest window first (so the ended ones are at the front)
        self._windows: OrderedDict[str, list[float]] = OrderedDict()
        self.blocked = 0  # addresses at their limit right now (lets the hot path skip the lookup)

    def retry_after(self, address: str) -> float | None:
        """Seconds until this address may try again, or None when it may try now."""
        window = self._windows.get(address)
        if window is None:
            return None
        elapsed = self.clock() - window[0]
        if elapsed >= WINDOW_S:
            if window[1] >= self.per_minute:
                self.blocked -= 1
            del self._windows[address]
            return None
        return WINDOW_S - elapsed if window[1] >= self.per_minute else None

    async def record(self, address: str) -> float | None:
        """Count one failure from `address`. Returns the seconds to wait when it is past the limit (the
        attempt is then refused with 429 instead of 401), else None."""
        shared = self.shared
        if shared is not None and self.clock() >= self._shared_down_until:
            try:
                count, left = await shared.count_failure(_KEY_PREFIX + address, WINDOW_S)
            except (RedisUnavailable, RedisReplyError) as exc:
                # Fail open to this process's own count: still a limit, only not shared.
                if self._shared_down_until == 0.0:
                    log.warning("failed_auth_count_unshared", error=str(exc), retry_s=_SHARED_RETRY_S)
                self._shared_down_until = self.clock() + _SHARED_RETRY_S
            else:
                self._shared_down_until = 0.0
                return self._mirror(address, count, left)
        return self.failed(address)

    def failed(self, address: str) -> float | None:
        """Count one failure in this process; the wait when past the limit, else None."""
        now = self.clock()
        window = self._windows.get(address)
        if window is None or now - window[0] >= WINDOW_S:
            if window is not None:
                del self._windows[address]  # reopened below as the newest, at the end
                if window[1] >= self.per_minute:
                    self.blocked -= 1
            self._sweep(now)
            self._windows[address] = window = [now, 0]
        window[1] += 1
        if window[1] == self.per_minute:
            self.blocked += 1
        return WINDOW_S - (now - window[0]) if window[1] > self.per_minute else None

    def _mirror(self, address: str, count: int, left_s: float) -> float | None:
        """Redis's count for `address`: remembered here once at the limit, so this process refuses the
        address before looking at credentials until the shared window ends."""
        if count >= self.per_minute:
            now = self.clock()
            window = self._windows.pop(address, None)  # put back at the end, where new windows go
            if window is None or window[1] < self.per_minute:
                self.blocked += 1
            self._sweep(now)
            self._windows[address] = [now - (WINDOW_S - left_s), float(count)]
        return left_s if count > self.per_minute else None

    def _sweep(self, now: float) -> None:
        """Forget ended windows from the front, at most _SWEEP_BATCH of them: a flood of new addresses must
        not make each failure scan every address remembered. (A window mirrored from Redis may have started
        before those queued ahead of it; it is forgotten when they are, or when its address is next seen.)"""
        windows = self._windows
        for _ in range(_SWEEP_BATCH):
            if not windows:
                return
            address = next(iter(windows))
            window = windows[address]
            if now - window[0] < WINDOW_S:
                return
            del windows[address]
            if window[1] >= self.per_minute:
                self.blocked -= 1
