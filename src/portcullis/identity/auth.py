"""The authentication stage: credentials → Principal, or a 401/429 refusal.

Keys stay off the database on the hot path: a verified record is cached in process for `ttl` seconds
(1 s without Redis, so a revocation bites everywhere within 1 s; 30 s with Redis, where revocations are
pushed to every process over pub/sub and evict at once). Concurrent misses for one key share one load.
`last_used_at` is collected in memory and written in one batch every few seconds.

Every refusal of a credential looks the same ("Incorrect API key provided"), whether the id is unknown,
the secret wrong, or the key revoked or expired: a response never tells whether a key id exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from portcullis.config import Config
from portcullis.errors import Forbidden, ServiceUnavailable, TooManyRequests, Unauthenticated
from portcullis.identity import scopes as scope_names
from portcullis.identity.jwt import InvalidToken, JwtVerifier
from portcullis.identity.keys import KeyHasher, KeyRecord, KeyStore, key_id_of
from portcullis.identity.principal import Principal
from portcullis.identity.throttle import FailedAuthThrottle, client_address
from portcullis.obs.logging import get_logger

if TYPE_CHECKING:
    from portcullis.http import Request

log = get_logger("portcullis.identity")

ANONYMOUS = Principal(user="anonymous", tier="free", scopes=scope_names.ALL, via="anonymous")
_BAD_KEY = "Incorrect API key provided."
_NO_KEY = (
    "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
    "(or in an 'api-key' / 'x-api-key' header)."
)
_NEGATIVE_TTL_S = 1.0
_TOUCH_EVERY_S = 5.0
# Past this many cached ids, expired entries are swept: random ids sprayed at the gateway (each cached
# as "unknown" for a second) must not grow the cache without bound.
_CACHE_SWEEP_AT = 50_000


class Identity:
    def __init__(
        self,
        config: Config,
        store: KeyStore | None,
        hasher: KeyHasher | None,
        jwt: JwtVerifier | None,
        *,
        pushed_invalidation: bool,
    ) -> None:
        self.config = config.auth
        self.store = store
        self.hasher = hasher
        self.jwt = jwt
        self.ttl = self.config.key_cache_ttl_s or (30.0 if pushed_invalidation else 1.0)
        self.throttle = FailedAuthThrottle(self.config.failed_auth_per_minute)
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in config.server.trusted_proxies]
        # key id → (record, its principal, usable until (POSIX time), cached until (monotonic))
        self._cache: dict[str, tuple[KeyRecord | None, Principal | None, float, float]] = {}
        self._loading: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._last_used: dict[str, float] = {}
        self._toucher: asyncio.Task[None] | None = None

    # -- the hot path ---------------------------------------------------------------------------

    async def authenticate(self, req: Request, credential: str | None = None) -> Principal:
        """The request's principal, from its Authorization (or api-key) header, or from `credential` (the
        dashboard's cookie)."""
        address = client_address(req.scope, self.trusted)
        if self.throttle.blocked:  # only look the address up while someone is being throttled
            wait = self.throttle.retry_after(address)
            if wait is not None:
                raise TooManyRequests(
                    "Too many failed authentication attempts from your address; try again later.",
                    code="too_many_failed_auth",
                    headers={"Retry-After": str(int(wait) + 1)},
                )
        if credential is None:
            credential = _credential(req)
        if credential is None:
            if self.config.allow_anonymous:
                return ANONYMOUS
            self.throttle.failed(address)
            raise Unauthenticated(_NO_KEY, headers={"WWW-Authenticate": 'Bearer realm="portcullis"'})
        try:
            if credential.startswith("pc-") and self.store is not None:
                # The usual case, a cached key, is checked without creating a coroutine.
                principal = self._cached_key(credential)
                return principal if principal is not None else await self._api_key(credential)
            if self.jwt is not None and credential.count(".") == 2:
                return self._token(credential)
            raise Unauthenticated(_BAD_KEY, headers={"WWW-Authenticate": 'Bearer realm="portcullis"'})
        except Unauthenticated:
            self.throttle.failed(address)
            raise

    def _cached_key(self, presented: str) -> Principal | None:
        """A principal from the cache; None when the id is not cached (or its entry went stale)."""
        key_id = key_id_of(presented)
        entry = self._cache.get(key_id) if key_id is not None else None
        if entry is None or entry[3] <= time.monotonic():
            return None
        return self._verify(presented, entry[0], entry[1], entry[2])

    async def _api_key(self, presented: str) -> Principal:
        key_id = key_id_of(presented)
        record, principal, usable_until = None, None, 0.0
        if key_id is not None:
            if len(self._cache) >= _CACHE_SWEEP_AT:
                self._sweep()
            record = await self._load(key_id)
            if record is not None:
                principal, usable_until = record.principal(), record.usable_until()
            ttl = self.ttl if record is not None else _NEGATIVE_TTL_S
            self._cache[key_id] = (record, principal, usable_until, time.monotonic() + ttl)
        return self._verify(presented, record, principal, usable_until)

    def _verify(
        self, presented: str, record: KeyRecord | None, principal: Principal | None, usable_until: float
    ) -> Principal:
        assert self.hasher is not None
        # Hash even when there is nothing to compare with, so an unknown id costs what a wrong secret costs.
        matches = self.hasher.matches(presented, record.key_hash if record is not None else "0" * 64)
        when = time.time()
        if record is None or principal is None or not matches or when >= usable_until:
            raise Unauthenticated(_BAD_KEY, headers={"WWW-Authenticate": 'Bearer realm="portcullis"'})
        self._last_used[record.id] = when
        return principal

    def _sweep(self) -> None:
        now_m = time.monotonic()
        self._cache = {k: v for k, v in self._cache.items() if v[3] > now_m}

    async def _load(self, key_id: str) -> KeyRecord | None:
        pending = self._loading.get(key_id)
        if pending is not None:
            return await asyncio.shield(pending)
        assert self.store is not None
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._loading[key_id] = future
        try:
            try:
                record = await self.store.get(key_id)
            except Exception as exc:
                log.warning("key_store_unavailable", error=type(exc).__name__)
                raise ServiceUnavailable(
                    "Credentials cannot be checked right now; try again shortly.",
                    code="auth_store_unavailable",
                    headers={"Retry-After": "2"},
                ) from exc
            future.set_result(record)
            return record
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._loading[key_id]

    def _token(self, token: str) -> Principal:
        assert self.jwt is not None
        try:
            return self.jwt.verify(token)
        except InvalidToken as exc:
            raise Unauthenticated(
                f"Invalid bearer token: {exc}.",
                code="invalid_token",
                headers={
                    "WWW-Authenticate": f'Bearer realm="portcullis", error="invalid_token", error_description="{exc}"'
                },
            ) from exc

    # -- cache upkeep -----------------------------------------------------------------------------

    def invalidate(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    def start(self) -> None:
        if self.store is not None:
            self._toucher = asyncio.create_task(self._touch_loop())

    async def stop(self) -> None:
        if self._toucher is not None:
            self._toucher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._toucher
        await self._flush_last_used()

    async def _touch_loop(self) -> None:
        while True:
            await asyncio.sleep(_TOUCH_EVERY_S)
            try:
                await self._flush_last_used()
            except Exception:
                log.exception("last_used_flush_failed")

    async def _flush_last_used(self) -> None:
        if self._last_used and self.store is not None:
            batch, self._last_used = self._last_used, {}
            await self.store.touch({key_id: datetime.fromtimestamp(t, UTC) for key_id, t in batch.items()})


def _credential(req: Request) -> str | None:
    auth = req.header(b"authorization")
    if auth:
        if auth[:7].lower() == b"bearer ":
            value = auth[7:].strip()
            if value:
                return value.decode("latin-1")
    for name in (b"api-key", b"x-api-key"):
        value = req.header(name)
        if value:
            return value.decode("latin-1").strip()
    return None


def require_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise Forbidden(
            f"Your credentials lack the scope '{scope}' needed for this request.", code="missing_scope", param=scope
        )


def may_use(principal: Principal | None, asked: str, resolved: str | None = None) -> bool:
    """A key's model allow-list may name the model, the alias the client used, or the router."""
    allowed = principal.models if principal is not None else None
    return allowed is None or asked in allowed or (resolved is not None and resolved in allowed)


def require_model(principal: Principal | None, asked: str, resolved: str | None = None) -> None:
    if not may_use(principal, asked, resolved):
        raise Forbidden(f"Your credentials do not allow the model '{asked}'.", code="model_not_allowed", param="model")
