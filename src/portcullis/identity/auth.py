"""The authentication stage: credentials → Principal, or a 401/429 refusal.

Keys stay off the database on the hot path: a verified record is cached in process for `ttl` seconds
(30 s while the Redis bus is connected, where revocations are pushed to every process and evict at
once; 1 s without it, and while it is away, so a revocation bites everywhere within 1 s). Concurrent
misses for one key share one load. `last_used_at` is collected in memory and written in one batch every
few seconds.

The database may fail or hang. A lookup has a deadline (`auth.key_lookup_timeout_s`); when it fails, a key
verified within `auth.key_cache_stale_s` is served from its cached record (stale-if-error), and while the
database is known to be degraded (store/health.py) such a key is served at once, without a lookup: a hung
database costs one lookup's deadline, not every request's, and thousands of keys do not storm it. A
revocation pushed over the bus removes the record, so a revoked key is never served stale; a key never
verified gets 503.

Every refusal of a credential looks the same ("Incorrect API key provided"), whether the id is unknown,
the secret wrong, or the key revoked or expired: a response never tells whether a key id exists.

A request carrying one credential header more than once is refused (400): which copy counts would differ
between a proxy in front and us. That refusal, and every refusal of a token, counts as a failed
authentication for the address's throttle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from portcullis.config import Config
from portcullis.errors import Forbidden, InvalidRequest, ServiceUnavailable, TooManyRequests, Unauthenticated
from portcullis.identity import scopes as scope_names
from portcullis.identity.jwt import InvalidToken, JwtVerifier
from portcullis.identity.keys import KeyHasher, KeyRecord, KeyStore, key_id_of
from portcullis.identity.principal import Placement, Principal
from portcullis.identity.tenancy import TenancyStore
from portcullis.identity.throttle import FailedAuthThrottle, client_address, trusted_networks
from portcullis.obs.lag import LAG
from portcullis.obs.logging import get_logger

if TYPE_CHECKING:
    from portcullis.http import Request
    from portcullis.store.health import DatabaseHealth

log = get_logger("portcullis.identity")

ANONYMOUS = Principal(user="anonymous", tier="free", scopes=scope_names.ALL, via="anonymous")
_BAD_KEY = "Incorrect API key provided."
_NO_KEY = (
    "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
    "(or in an 'api-key' / 'x-api-key' header)."
)
_NEGATIVE_TTL_S = 1.0
_POLLED_TTL_S = 1.0  # without pushed revocations
_PUSHED_TTL_S = 30.0  # while the bus pushes them
_TOUCH_EVERY_S = 5.0
# Ids found unknown are cached a second, at most this many: random ids sprayed at the gateway must not grow
# the cache without bound. (Known ids are as many as there are keys.)
_UNKNOWN_MAX = 50_000


class Identity:
    def __init__(
        self,
        config: Config,
        store: KeyStore | None,
        hasher: KeyHasher | None,
        jwt: JwtVerifier | None,
        *,
        pushed_invalidation: bool,
        health: DatabaseHealth | None = None,
        tenancy: TenancyStore | None = None,
    ) -> None:
        self.config = config.auth
        self.tenancy = tenancy  # where a token's team claim is looked up
        self.store = store
        self.hasher = hasher
        self.jwt = jwt
        self.health = health
        # Whether revocations reach this process as they happen (the bus is connected); set by the gateway.
        self.pushed = pushed_invalidation
        self.throttle = FailedAuthThrottle(self.config.failed_auth_per_minute)
        self.trusted = trusted_networks(config.server.trusted_proxies)
        self.proxy_hops = config.server.trusted_proxy_hops
        # key id → (record, its principal, usable until (POSIX time), fresh until (monotonic), loaded at
        # (monotonic))
        self._cache: dict[str, tuple[KeyRecord | None, Principal | None, float, float, float]] = {}
        self._loading: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self._unknown: dict[str, float] = {}  # ids cached as unknown, oldest first → their expiry
        self._last_used: dict[str, float] = {}
        self._toucher: asyncio.Task[None] | None = None
        # a token's team claim → (the team it names, or None; fresh until (monotonic)), like a key's record
        self._placements: dict[tuple[str, ...], tuple[Placement | None, float]] = {}
        self.stale_served = 0  # requests authenticated from a stale record while the database was away

    @property
    def ttl(self) -> float:
        if self.config.key_cache_ttl_s is not None:
            return self.config.key_cache_ttl_s
        return _PUSHED_TTL_S if self.pushed else _POLLED_TTL_S

    def revocations_pushed(self, pushed: bool) -> None:
        """The bus connected (True) or went away (False). Without it, no cached record may outlive the
        polled TTL: a revocation published meanwhile may never arrive."""
        self.pushed = pushed
        if not pushed:
            horizon = time.monotonic() + self.ttl
            self._cache = {k: (*v[:3], min(v[3], horizon), v[4]) for k, v in self._cache.items()}

    # -- the hot path ---------------------------------------------------------------------------

    async def authenticate(self, req: Request, credential: str | None = None) -> Principal:
        """The request's principal, from its Authorization (or api-key) header, or from `credential` (the
        dashboard's cookie)."""
        if self.throttle.blocked:  # only look the address up while someone is being throttled
            wait = self.throttle.retry_after(client_address(req.scope, self.trusted, self.proxy_hops))
            if wait is not None:
                raise _too_many_failures(wait)
        if credential is None:
            try:
                credential = _credential(req)
            except InvalidRequest:
                await self._failed(req)
                raise
        if credential is None:
            if self.config.allow_anonymous:
                return ANONYMOUS
            await self._failed(req)
            raise Unauthenticated(_NO_KEY, headers={"WWW-Authenticate": 'Bearer realm="portcullis"'})
        try:
            if credential.startswith("pc-") and self.store is not None:
                # The usual case, a cached key, is checked without creating a coroutine.
                principal = self._cached_key(credential)
                return principal if principal is not None else await self._api_key(credential)
            if self.jwt is not None and credential.count(".") == 2:
                principal = self._token(credential)
                return await self._placed(principal) if principal.claimed_teams else principal
            raise Unauthenticated(_BAD_KEY, headers={"WWW-Authenticate": 'Bearer realm="portcullis"'})
        except Unauthenticated:
            await self._failed(req)
            raise

    async def _failed(self, req: Request) -> None:
        """Count a failed authentication. The count is one atomic step taken after the credential was judged,
        and past the limit the answer becomes 429: attempts sent all at once all pass the check above, but at
        most `failed_auth_per_minute` of them are told 401 (identity/throttle.py)."""
        wait = await self.throttle.record(client_address(req.scope, self.trusted, self.proxy_hops))
        if wait is not None:
            raise _too_many_failures(wait)

    def _cached_key(self, presented: str) -> Principal | None:
        """A principal from the cache; None when the id is not cached (or its entry went stale)."""
        key_id = key_id_of(presented)
        entry = self._cache.get(key_id) if key_id is not None else None
        if entry is None or entry[3] <= time.monotonic():
            return None
        return self._verify(presented, entry[0], entry[1], entry[2])

    async def _api_key(self, presented: str) -> Principal:
        key_id = key_id_of(presented)
        if key_id is None:
            return self._verify(presented, None, None, 0.0)
        stale = self._stale(key_id)
        if stale is not None and self.health is not None and self.health.degraded:
            # The database is known to be away: serve the verified record now. No lookup per key meanwhile
            # (thousands of keys would storm a database that is down); the health probe sees it come back,
            # and the next expiry after that asks again.
            return self._serve_stale(presented, stale)
        try:
            record = await self._load(key_id)
        except ServiceUnavailable:
            if stale is None:
                raise
            return self._serve_stale(presented, stale)
        entry = self._remember(key_id, record)
        return self._verify(presented, record, entry[1], entry[2])

    def _stale(self, key_id: str) -> tuple[KeyRecord | None, Principal | None, float, float, float] | None:
        """A cached verified record young enough to serve while the database is away."""
        entry = self._cache.get(key_id)
        if entry is None or entry[0] is None or time.monotonic() - entry[4] > self.config.key_cache_stale_s:
            return None
        return entry

    def _serve_stale(
        self, presented: str, entry: tuple[KeyRecord | None, Principal | None, float, float, float]
    ) -> Principal:
        principal = self._verify(presented, entry[0], entry[1], entry[2])
        assert entry[0] is not None
        # Served from the cache again for a polled TTL, so the database is asked about this key once a
        # second while it is away, not once a request. Its age (loaded at) stays what it was.
        self._cache[entry[0].id] = (*entry[:3], time.monotonic() + _POLLED_TTL_S, entry[4])
        self.stale_served += 1
        return principal

    def _remember(
        self, key_id: str, record: KeyRecord | None
    ) -> tuple[KeyRecord | None, Principal | None, float, float, float]:
        principal, usable_until = None, 0.0
        if record is not None:
            principal, usable_until = record.principal(), record.usable_until()
        now = time.monotonic()
        entry = (record, principal, usable_until, now + (self.ttl if record is not None else _NEGATIVE_TTL_S), now)
        self._cache[key_id] = entry
        if record is None:
            self._forget_unknown(now)
            self._unknown[key_id] = entry[3]
        return entry

    def _forget_unknown(self, now: float) -> None:
        """Drop expired unknown ids (oldest first: they expire in the order they came), and the oldest beyond
        the cap. Amortised O(1) per miss, however many ids are cached."""
        unknown, cache = self._unknown, self._cache
        while unknown:
            key_id, expires = next(iter(unknown.items()))
            if expires > now and len(unknown) < _UNKNOWN_MAX:
                break
            del unknown[key_id]
            entry = cache.get(key_id)
            if entry is not None and entry[0] is None:
                del cache[key_id]

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

    async def _load(self, key_id: str) -> KeyRecord | None:
        """The key's record from the database, waiting at most `key_lookup_timeout_s`.

        The lookup runs in a task of its own that concurrent misses of the key share, and each waits on it
        with its own deadline: a driver cancelled mid-query (a hung server) may take seconds to let go,
        and no request should wait for that."""
        assert self.store is not None
        task = self._loading.get(key_id)
        if task is None:
            task = self._loading[key_id] = asyncio.get_running_loop().create_task(self._fetch(key_id))
            task.add_done_callback(lambda done: self._loaded(key_id, done))
        try:
            async with asyncio.timeout(self.config.key_lookup_timeout_s):
                record = await asyncio.shield(task)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if self.health is not None and self.health.degraded:
            self.health.succeeded()
        return record

    def _unavailable(self, exc: Exception) -> ServiceUnavailable:
        """The database failed a lookup (a key's record, a token's team): told to the health, and a 503."""
        # The health logs an outage once; a deadline passed while our own loop was busy is none.
        known = self.health is not None and self.health.degraded
        if not known and not (isinstance(exc, TimeoutError) and LAG.busy()):
            log.warning("key_store_unavailable", error=type(exc).__name__)
        if self.health is not None:
            self.health.failed(exc)
        return ServiceUnavailable(
            "Credentials cannot be checked right now; try again shortly.",
            code="auth_store_unavailable",
            headers={"Retry-After": "2"},
        )

    async def _fetch(self, key_id: str) -> KeyRecord | None:
        assert self.store is not None
        async with asyncio.timeout(self.config.key_lookup_timeout_s):
            return await self.store.get(key_id)

    def _loaded(self, key_id: str, task: asyncio.Task[KeyRecord | None]) -> None:
        if self._loading.get(key_id) is task:
            del self._loading[key_id]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters have seen it (or gave up waiting)

    async def _placed(self, principal: Principal) -> Principal:
        """A token's principal in the team its claim names (auth.jwt.team_claim), with that team's and its
        organisation's grants and limits; the lookup cached like a key's record."""
        claimed = principal.claimed_teams
        entry = self._placements.get(claimed)
        if entry is None or entry[1] <= time.monotonic():
            placement = None
            if self.tenancy is not None:
                try:
                    async with asyncio.timeout(self.config.key_lookup_timeout_s):
                        for ref in claimed:
                            placement = await self.tenancy.placement(ref)
                            if placement is not None:
                                break
                except Exception as exc:
                    raise self._unavailable(exc) from exc
            if len(self._placements) >= _UNKNOWN_MAX:
                self._placements.clear()
            entry = self._placements[claimed] = (placement, time.monotonic() + self.ttl)
        if entry[0] is None:
            if self.config.jwt.team_required:
                raise Unauthenticated(
                    "Invalid bearer token: its team claim names no team.",
                    code="invalid_token",
                    headers={"WWW-Authenticate": 'Bearer realm="portcullis", error="invalid_token"'},
                )
            return replace(principal, claimed_teams=())
        return entry[0].apply(principal)

    def _token(self, token: str) -> Principal:
        assert self.jwt is not None
        try:
            return self.jwt.verify(token)
        except InvalidToken as exc:
            # The description may quote the token (an algorithm's name, PyJWT's reason): in a header it keeps
            # printable ASCII without quotes or backslashes (RFC 6750 §3), so it can neither end the quoted
            # string nor the header.
            described = "".join(c for c in str(exc) if " " <= c <= "~" and c not in '"\\')[:200]
            raise Unauthenticated(
                f"Invalid bearer token: {exc}.",
                code="invalid_token",
                headers={
                    "WWW-Authenticate": (
                        f'Bearer realm="portcullis", error="invalid_token", error_description="{described}"'
                    )
                },
            ) from exc

    # -- cache upkeep -----------------------------------------------------------------------------

    def invalidate(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    def invalidate_all(self) -> None:
        self._cache.clear()
        self._unknown.clear()
        self._placements.clear()

    def start(self) -> None:
        if self.store is not None:
            self._toucher = asyncio.create_task(self._touch_loop())

    async def stop(self) -> None:
        if self._toucher is not None:
            self._toucher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._toucher
        for task in self._loading.values():
            task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.config.key_lookup_timeout_s * 4):
                await self._flush_last_used()

    async def _touch_loop(self) -> None:
        while True:
            await asyncio.sleep(_TOUCH_EVERY_S)
            if self.health is not None and self.health.degraded:
                continue  # the times wait (the newest per key is kept) until the database is back
            try:
                async with asyncio.timeout(_TOUCH_EVERY_S):
                    await self._flush_last_used()
            except Exception as exc:
                log.warning("last_used_flush_failed", error=type(exc).__name__)

    async def _flush_last_used(self) -> None:
        if self._last_used and self.store is not None:
            batch, self._last_used = self._last_used, {}
            try:
                await self.store.touch({key_id: datetime.fromtimestamp(t, UTC) for key_id, t in batch.items()})
            except BaseException:
                self._last_used = {**batch, **self._last_used}  # kept for the next try
                raise


def _too_many_failures(wait: float) -> TooManyRequests:
    return TooManyRequests(
        "Too many failed authentication attempts from your address; try again later.",
        code="too_many_failed_auth",
        headers={"Retry-After": str(int(wait) + 1)},
    )


_CREDENTIAL_HEADERS = (b"authorization", b"api-key", b"x-api-key")


def _credential(req: Request) -> str | None:
    auth = req.header(b"authorization")
    # The header dict (built for every request) keeps the last of repeated names, so fewer names than headers
    # is the one cheap sign of a repeat; only then are the headers counted.
    if req._headers is not None and len(req._headers) < len(req.scope["headers"]):
        _refuse_repeated(req.scope["headers"])
    if auth:
        if auth[:7].lower() == b"bearer ":
            value = auth[7:].strip()
            if value:
                return value.decode("latin-1")
    for name in (b"api-key", b"x-api-key"):
        header = req.header(name)
        if header:
            return header.decode("latin-1").strip()
    return None


def _refuse_repeated(headers: list[tuple[bytes, bytes]]) -> None:
    for name in _CREDENTIAL_HEADERS:
        if sum(1 for key, _ in headers if key == name) > 1:
            shown = name.decode()
            raise InvalidRequest(
                f"The request carries the '{shown}' header more than once; send exactly one credential.",
                param=shown,
                code="duplicate_credentials",
            )


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
