"""Failed-authentication throttling per client address, checked before credentials are looked at.

The address is the socket's peer, or, when that peer is a configured trusted proxy, the right-most
address in X-Forwarded-For that is not itself a trusted proxy (the left part of that header is whatever
the client chose to write).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(scope: dict[str, Any], trusted: list[_Network]) -> str:
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = b""
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            forwarded = forwarded + b"," + value if forwarded else value
    hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: list[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


class FailedAuthThrottle:
    """At most `per_minute` failed authentications per address in a fixed one-minute window."""

    def __init__(self, per_minute: int, *, clock: Any = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._windows: dict[str, list[float]] = {}  # address → [window start, failures]
        self.blocked = 0  # addresses at their limit right now (lets the hot path skip the lookup)

    def retry_after(self, address: str) -> float | None:
        """Seconds until this address may try again, or None when it may try now."""
        window = self._windows.get(address)
        if window is None:
            return None
        elapsed = self.clock() - window[0]
        if elapsed >= 60:
            if window[1] >= self.per_minute:
                self.blocked -= 1
            del self._windows[address]
            return None
        return 60 - elapsed if window[1] >= self.per_minute else None

    def failed(self, address: str) -> None:
        now = self.clock()
        window = self._windows.get(address)
        if window is None or now - window[0] >= 60:
            if window is not None and window[1] >= self.per_minute:
                self.blocked -= 1
            if len(self._windows) > 100_000:  # forget stale windows rather than grow without bound
                self._windows = {a: w for a, w in self._windows.items() if now - w[0] < 60}
                self.blocked = sum(1 for w in self._windows.values() if w[1] >= self.per_minute)
            self._windows[address] = window = [now, 0]
        window[1] += 1
        if window[1] == self.per_minute:
            self.blocked += 1
