"""The database schema, one for SQLite and PostgreSQL. Changes go through an Alembic migration."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    # The lookup id (also the public part of the key: pc-<id>-<secret>); never the secret.
    Column("id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False),  # hex HMAC-SHA256(server secret, whole key)
    Column("user", String(256), nullable=False, index=True),
    Column("tier", String(64), nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("models", JSON, nullable=True),  # None: every model
    Column("label", String(256), nullable=True),
    Column("limits", JSON, nullable=True),  # per-key overrides (quotas)
    Column("budget", JSON, nullable=True),  # (quotas)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("rotated_to", String(32), nullable=True),  # successor id, once rotated
    Column("grace_until", DateTime(timezone=True), nullable=True),  # a rotated key works until then
)

model_state = Table(
    "model_state",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("disabled", Boolean, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# One row per API request (quota/usage.py writes them in batches).
usage = Table(
    "usage",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("day", String(10), nullable=False),  # UTC "YYYY-MM-DD", for grouping on any database
    Column("request_id", String(128), nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("user", String(256), nullable=True),
    Column("route", String(64), nullable=False),
    Column("model", String(256), nullable=True),
    Column("deployment", String(256), nullable=True),
    Column("stream", Boolean, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("status", Integer, nullable=False),
    Column("error", String(64), nullable=True),
    Column("cache_hit", Boolean, nullable=False),
    Index("ix_usage_day_user", "day", "user"),
    Index("ix_usage_key_id", "key_id"),
)
