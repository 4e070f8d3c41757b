"""API keys: generation, keyed hashing, and the key store (SQLAlchemy Core over SQLite or PostgreSQL).

A key looks like `pc-<id>-<secret>`: `id` is 16 hex characters used to find the record, `secret` is
32 bytes from the CSPRNG (base64url). Only HMAC-SHA256(server secret, whole key) is stored; a stolen
database does not yield usable keys without the server secret, and lookups never compare secrets in
variable time.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, overload

from sqlalchemy import Select, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from portcullis.config import Config
from portcullis.errors import InvalidRequest
from portcullis.identity import scopes as scope_names
from portcullis.identity.principal import (
    DEFAULT_TEAM,
    JWT_USER_PREFIX,
    Placement,
    Principal,
    unstorable,
)
from portcullis.store import audit
from portcullis.store.schema import api_keys, organizations, teams

PREFIX = "pc-"
_ID_LEN = 16


def generate_key() -> tuple[str, str]:
    key_id = secrets.token_hex(_ID_LEN // 2)
    return key_id, f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


_KEY_SHAPE = re.compile(r"pc-([0-9a-f]{16})-[A-Za-z0-9_\-]{32,}")


def key_id_of(presented: str) -> str | None:
    """The lookup id of a well-formed key, else None. Says nothing about validity."""
    match = _KEY_SHAPE.fullmatch(presented)
    return match.group(1) if match else None


class _Hash(Protocol):
    """What KeyHasher uses of a hash object (hashlib's, or CPython's builtin one)."""

    def copy(self) -> _Hash: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


def _builtin_sha256() -> Callable[[bytes], _Hash]:
    """CPython's own SHA-256 (not OpenSSL's), where this Python has it under a known name."""
    for module in ("_sha2", "_sha256"):  # 3.12+, 3.11
        try:
            builtin: Callable[[bytes], _Hash] = importlib.import_module(module).sha256
        except (ImportError, AttributeError):
            continue
        return builtin
    return hashlib.sha256


_SHA256 = _builtin_sha256()
_BLOCK = 64  # SHA-256's block size (RFC 2104)


class KeyHasher:
    """HMAC-SHA256 (RFC 2104) over inner and outer states keyed once at startup.

    Written out rather than `hmac.digest(secret, key, "sha256")` because of what that costs inside the
    running gateway (probed per request under wrk, this machine): hmac.digest 10.9 µs, a copied
    `hmac.new` context 3.6-7.6 µs, these pre-keyed states on CPython's own SHA-256 1.9 µs. The result is
    the standard HMAC (tests/identity/test_key_hashing.py checks it against the hmac module).
    """

    def __init__(self, server_secret: bytes) -> None:
        if len(server_secret) < 16:
            raise ValueError("the key secret must be at least 16 bytes")
        block = server_secret if len(server_secret) <= _BLOCK else hashlib.sha256(server_secret).digest()
        block = block.ljust(_BLOCK, b"\0")
        self._inner = _SHA256(bytes(b ^ 0x36 for b in block))
        self._outer = _SHA256(bytes(b ^ 0x5C for b in block))

    def hash(self, key: str) -> str:
        inner = self._inner.copy()
        inner.update(key.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def matches(self, key: str, stored_hash: str) -> bool:
        return hmac.compare_digest(self.hash(key), stored_hash)


class KeySecretMissing(Exception):
    """The server secret for key hashes is not configured (or too short); the message says how to set it."""


def key_secret(config: Config) -> bytes:
    auth = config.auth
    if auth.key_secret_file:
        return auth.key_secret_file.read_bytes().strip()
    value = os.environ.get(auth.key_secret_env)
    if not value:
        raise KeySecretMissing(
            f"API keys are on but the key secret is not set: put at least 32 random bytes in the environment "
            f"variable {auth.key_secret_env} (or set auth.key_secret_file), e.g. "
            f"`export {auth.key_secret_env}=$(openssl rand -hex 32)`."
        )
    if len(value) < 32:
        raise KeySecretMissing(f"{auth.key_secret_env} must hold at least 32 characters.")
    if PLACEHOLDER_SECRET.search(value):
        raise KeySecretMissing(
            f"{auth.key_secret_env} holds a template's placeholder, not a secret: generate one, e.g. "
            f"`export {auth.key_secret_env}=$(openssl rand -hex 32)`."
        )
    return value.encode()


# Words of a template's placeholder ("replace-with-...", "change-me", "<your secret>"): a deployment example
# copied with its placeholder left in must not start with a secret anyone can read in the repository.
PLACEHOLDER_SECRET = re.compile(r"replace|change[-_ ]?me|placeholder|example|your[-_ ]|fill[-_ ]?in|[<>]", re.I)


def now() -> datetime:
    return datetime.now(UTC)


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: None) -> None: ...
def aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


DEFAULT_PLACEMENT = Placement()  # the default organisation's default team (immutable: one shared instance)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    key_hash: str
    user: str
    tier: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    label: str | None
    limits: dict[str, Any] | None
    budget: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    rotated_to: str | None = None
    grace_until: datetime | None = None
    team_id: str = DEFAULT_TEAM
    # Read with the key (KeyStore's queries join them): its team's organisation, what the two grant and limit.
    placement: Placement = DEFAULT_PLACEMENT

    @property
    def org_id(self) -> str:
        return self.placement.org_id

    @classmethod
    def from_row(cls, row: Any) -> KeyRecord:
        m = row._mapping
        team_id = m.get("team_id") or DEFAULT_TEAM
        return cls(
            id=m["id"],
            key_hash=m["key_hash"],
            user=m["user"],
            tier=m["tier"],
            scopes=tuple(m["scopes"]),
            models=tuple(m["models"]) if m["models"] is not None else None,
            label=m["label"],
            limits=m["limits"],
            budget=m["budget"],
            created_at=aware(m["created_at"]),
            expires_at=aware(m["expires_at"]),
            last_used_at=aware(m["last_used_at"]),
            revoked_at=aware(m["revoked_at"]),
            rotated_to=m["rotated_to"],
            grace_until=aware(m["grace_until"]),
            team_id=team_id,
            placement=Placement.from_mapping(m, team_id),
        )

    def usable_at(self, when: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        if self.expires_at is not None and when >= self.expires_at:
            return False
        return not (self.grace_until is not None and when >= self.grace_until)

    def usable_until(self) -> float:
        """The POSIX time at which this key stops working (0 when it already has, inf for never)."""
        if self.revoked_at is not None:
            return 0.0
        ends = [t.timestamp() for t in (self.expires_at, self.grace_until) if t is not None]
        return min(ends) if ends else float("inf")

    def principal(self) -> Principal:
        own = Principal(
            user=self.user,
            tier=self.tier,
            scopes=frozenset(self.scopes),
            models=frozenset(self.models) if self.models is not None else None,
            key_id=self.id,
            via="api_key",
            limits=self.limits,
            budget=self.budget,
        )
        return self.placement.apply(own)

    def public(self) -> dict[str, Any]:
        """What an operator sees: everything but the hash."""

        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        status = "active"
        when = now()
        if self.revoked_at:
            status = "revoked"
        elif self.expires_at and when >= self.expires_at:
            status = "expired"
        elif self.rotated_to:
            status = "rotated" if self.usable_at(when) else "retired"
        return {
            "id": self.id,
            "user": self.user,
            "team_id": self.team_id,
            "org_id": self.org_id,
            "tier": self.tier,
            "scopes": list(self.scopes),
            "models": list(self.models) if self.models is not None else None,
            "label": self.label,
            "limits": self.limits,
            "budget": self.budget,
            "status": status,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
            "rotated_to": self.rotated_to,
            "grace_until": iso(self.grace_until),
        }


class KeyStore:
    def __init__(self, engine: AsyncEngine, hasher: KeyHasher) -> None:
        self.engine = engine
        self.hasher = hasher

    async def create(
        self,
        *,
        user: str,
        tier: str,
        scopes: tuple[str, ...] = scope_names.DEFAULT,
        models: tuple[str, ...] | None = None,
        expires_at: datetime | None = None,
        label: str | None = None,
        limits: dict[str, Any] | None = None,
        budget: dict[str, Any] | None = None,
        key: str | None = None,
        actor: audit.Actor | None = None,
        team: str = DEFAULT_TEAM,
    ) -> tuple[str, KeyRecord]:
        """A new key; returns the key itself (shown once) and its record. `key` imports a given one. With an
        `actor`, the audit log's entry is written in the same transaction."""
        if user.startswith(JWT_USER_PREFIX):
            # The namespace of token subjects (identity/principal.py): a key user there would share their data.
            raise InvalidRequest(
                f"The user '{user}' is in the namespace of JWT subjects ('{JWT_USER_PREFIX}...'); choose another.",
                param="user",
                code="invalid_value",
            )
        # Stored as they are, in String(256) columns (principal.py). The admin API's schema caps the length and
        # its JSON parser drops NULs, but `keys create` passed a longer one (or undecodable bytes, as lone
        # surrogates) on to a failed INSERT; and a key user that could not be stored would fail every usage
        # write naming it. Control characters are refused as in a token's subject.
        for param, value in (("user", user), ("label", label)):
            problem = unstorable(value) if value is not None else None
            if problem is not None:
                raise InvalidRequest(f"The {param} cannot be stored: {problem}.", param=param, code="invalid_value")
        if key is None:
            key_id, key = generate_key()
        else:
            found = key_id_of(key)
            if found is None:
                raise ValueError("not a Portcullis key (pc-<16 hex>-<at least 32 characters>)")
            key_id = found
        record = KeyRecord(
            id=key_id,
            key_hash=self.hasher.hash(key),
            user=user,
            tier=tier,
            scopes=tuple(scopes),
            models=tuple(models) if models is not None else None,
            label=label,
            limits=limits,
            budget=budget,
            created_at=now(),
            expires_at=expires_at,
            team_id=team,
        )
        async with self.engine.begin() as conn:
            await conn.execute(insert(api_keys).values(**_row(record)))
            # Read back with its levels (its organisation, what they grant).
            record = KeyRecord.from_row((await conn.execute(_joined().where(api_keys.c.id == key_id))).one())
            if actor is not None:
                await audit.record(conn, audit.Change(actor, "key.create", key_id, None, record.public()))
        return key, record

    async def get(self, key_id: str) -> KeyRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_joined().where(api_keys.c.id == key_id))).first()
        return KeyRecord.from_row(row) if row is not None else None

    async def list(self, *, user: str | None = None, team: str | None = None) -> list[KeyRecord]:
        query = _joined().order_by(api_keys.c.created_at)
        if user is not None:
            query = query.where(api_keys.c.user == user)
        if team is not None:
            query = query.where(func.coalesce(api_keys.c.team_id, DEFAULT_TEAM) == team)
        async with self.engine.connect() as conn:
            return [KeyRecord.from_row(r) for r in (await conn.execute(query)).all()]

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return len((await conn.execute(select(api_keys.c.id))).all())

    async def revoke(self, key_id: str, *, actor: audit.Actor | None = None) -> KeyRecord | None:
        """Revoked now (None: no such key). Revoking a revoked key changes nothing and writes no audit entry."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
            if row is None:
                return None
            before = KeyRecord.from_row(row)
            at = now()
            result = await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=at)
            )
            if result.rowcount == 1 and actor is not None:  # (0: it was revoked already, or just now by another)
                after = replace(before, revoked_at=at)
                await audit.record(conn, audit.Change(actor, "key.revoke", key_id, before.public(), after.public()))
        return await self.get(key_id)

    async def rotate(
        self, key_id: str, *, grace_s: float, actor: audit.Actor | None = None
    ) -> tuple[str, KeyRecord, KeyRecord] | None:
        """A successor with the same attributes; the old key works `grace_s` longer, then stops."""
        old = await self.get(key_id)
        if old is None or not old.usable_at(now()) or old.rotated_to is not None:
            return None
        new_id, key = generate_key()
        successor = replace(
            old,
            id=new_id,
            key_hash=self.hasher.hash(key),
            created_at=now(),
            last_used_at=None,
            rotated_to=None,
            grace_until=None,
        )
        grace_until = now() + timedelta(seconds=grace_s)
        async with self.engine.begin() as conn:
            # Only one rotation of a key wins: two at once (two admins, a retried request) made two successors.
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.rotated_to.is_(None), api_keys.c.revoked_at.is_(None))
                .values(rotated_to=new_id, grace_until=grace_until)
            )
            if result.rowcount != 1:
                return None
            await conn.execute(insert(api_keys).values(**_row(successor)))
            if actor is not None:
                after = replace(old, rotated_to=new_id, grace_until=grace_until).public()
                await audit.record(conn, audit.Change(actor, "key.rotate", key_id, old.public(), after))
                await audit.record(conn, audit.Change(actor, "key.create", new_id, None, successor.public()))
        retired = await self.get(key_id)
        assert retired is not None
        return key, successor, retired

    async def touch(self, last_used: dict[str, datetime]) -> None:
        if not last_used:
            return
        async with self.engine.begin() as conn:
            for key_id, when in last_used.items():
                await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=when))


# What a key's team and its organisation say, as Placement.from_mapping reads it (a join of teams and organizations).
LEVEL_COLUMNS = (
    teams.c.org_id.label("org_id"),
    teams.c.models.label("team_models"),
    organizations.c.models.label("org_models"),
    teams.c.limits.label("team_limits"),
    teams.c.budget.label("team_budget"),
    organizations.c.limits.label("org_limits"),
    organizations.c.budget.label("org_budget"),
    teams.c.name.label("team_name"),
    organizations.c.name.label("org_name"),
    teams.c.moderation.label("team_moderation"),
    organizations.c.moderation.label("org_moderation"),
)


def _joined() -> Select[Any]:
    """Keys with what their levels say: the team's organisation and both levels' model grants."""
    team = func.coalesce(api_keys.c.team_id, DEFAULT_TEAM)
    return select(api_keys, *LEVEL_COLUMNS).select_from(
        api_keys.outerjoin(teams, teams.c.id == team).outerjoin(organizations, organizations.c.id == teams.c.org_id)
    )


def _row(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "key_hash": record.key_hash,
        "user": record.user,
        "tier": record.tier,
        "scopes": list(record.scopes),
        "models": list(record.models) if record.models is not None else None,
        "label": record.label,
        "limits": record.limits,
        "budget": record.budget,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "last_used_at": record.last_used_at,
        "revoked_at": record.revoked_at,
        "rotated_to": record.rotated_to,
        "grace_until": record.grace_until,
        "team_id": record.team_id,
    }
