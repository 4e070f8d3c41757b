"""The database schema, one for SQLite and PostgreSQL. Changes go through an Alembic migration."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

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
    # Its team (identity/tenancy.py); null only in a row written by a gateway older than migration 0009: the default
    # team's.
    Column("team_id", String(32), nullable=True),
)

# Organisation → team → user → key (identity/tenancy.py). A level's `models` (null: every model) narrows what the
# levels below it may use; `default_tier` is the tier of a key made in it without one.
organizations = Table(
    "organizations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("models", JSON, nullable=True),
    Column("default_tier", String(64), nullable=True),
    Column("limits", JSON, nullable=True),  # LimitsConfig's shape: windows and concurrency of the whole level
    Column("budget", JSON, nullable=True),  # BudgetConfig's shape
    Column("moderation", JSON, nullable=True),  # ModerationPolicy's shape: which moderators check its keys' requests
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

teams = Table(
    "teams",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("org_id", String(32), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("models", JSON, nullable=True),
    Column("default_tier", String(64), nullable=True),
    Column("limits", JSON, nullable=True),  # LimitsConfig's shape: windows and concurrency of the whole level
    Column("budget", JSON, nullable=True),  # BudgetConfig's shape
    Column("moderation", JSON, nullable=True),  # ModerationPolicy's shape: which moderators check its keys' requests
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("org_id", "name", name="uq_teams_org_name"),
)

# Who has which role where: team_id "" is a role in the organisation itself.
memberships = Table(
    "memberships",
    metadata,
    Column("org_id", String(32), primary_key=True),
    Column("team_id", String(32), primary_key=True),
    Column("user", String(256), primary_key=True),
    Column("role", String(16), nullable=False),
    # "admin": given with the admin API or the CLI; "sso": from the identity provider's claim at a console sign-in
    # (replaced at the next one: the provider stays the source of truth for what it gave).
    Column("source", String(8), nullable=False, server_default="admin"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_memberships_user", "user"),
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
    # What moderation did, e.g. "input:redact,output:block" (safety/moderation.py); null when nothing.
    Column("moderation", String(64), nullable=True),
    # Unique per record (quota/usage.py): a replayed or re-run record replaces its earlier copy. Null in
    # rows written before it existed.
    Column("record_id", String(160), nullable=True),
    Index("ix_usage_day_user", "day", "user"),
    Index("ix_usage_key_id", "key_id"),
    Index("ux_usage_record_id", "record_id", unique=True),
)

# Files of the Batch API: uploaded input (purpose "batch") and generated output ("batch_output").
# Times here and in the batch tables are POSIX seconds (floats): compared in SQL the same way on
# SQLite and PostgreSQL.
files = Table(
    "files",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(256), nullable=False, index=True),  # the user who uploaded it (or the batch's)
    Column("purpose", String(32), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("content", LargeBinary, nullable=False),  # inline part (generated files); uploads keep b"" here
)

# An uploaded file's content in bounded pieces, so neither an upload nor a read holds a whole file in memory
# (a file's bytes are files.content followed by its chunks in seq order).
file_chunks = Table(
    "file_chunks",
    metadata,
    Column("file_id", String(40), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(256), nullable=False, index=True),
    Column("principal", JSON, nullable=False),  # who the lines run as (jobs/store.py)
    Column("endpoint", String(64), nullable=False),
    Column("model", String(256), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("output_file_id", String(40), nullable=True),
    Column("error_file_id", String(40), nullable=True),
    Column("errors", JSON, nullable=True),
    Column("metadata", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float, nullable=True),
    Column("finalizing_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("expired_at", Float, nullable=True),
    Column("cancelling_at", Float, nullable=True),
    Column("cancelled_at", Float, nullable=True),
)

# One row per input line: leased by the process that runs it, written once when it ends.
batch_lines = Table(
    "batch_lines",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("batch_id", String(40), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("custom_id", String(512), nullable=False),
    Column("body", Text, nullable=False),  # the request's JSON
    Column("state", String(12), nullable=False),  # pending, leased, done, failed
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("not_before", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("result", Text, nullable=True),  # the output (or error) file's line, once ended
    Column("finished_at", Float, nullable=True),
    UniqueConstraint("batch_id", "line_no", name="uq_batch_lines_batch_line"),
    Index("ix_batch_lines_batch_state", "batch_id", "state"),
)

# The Responses API's stored responses (surfaces/store.py): what GET /v1/responses/{id} shows and what
# previous_response_id continues. `context`: the items of the conversation before this response's own input.
responses = Table(
    "responses",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(256), nullable=False, index=True),  # the user who created it
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
    Column("context", JSON, nullable=False),
    Column("input", JSON, nullable=False),
    Column("response", JSON, nullable=False),
)

# The audit log (store/audit.py): one row per administrative change. Append-only: migration 0008 adds a trigger
# that refuses UPDATE and DELETE on both dialects. `before`/`after`: the object's public form (never a key's hash).
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),  # POSIX seconds
    Column("actor", String(256), nullable=False, index=True),  # the user who made the change ("system" at startup)
    Column("actor_key", String(32), nullable=True),  # the API key it was made with
    Column("via", String(16), nullable=False),  # api_key, jwt, cli, system
    Column("action", String(64), nullable=False, index=True),  # e.g. key.create, model.disable
    Column("target", String(256), nullable=False, index=True),  # what changed: a key id, a model name, ...
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=True),
    Column("source", String(64), nullable=True),  # the client's address (server.trusted_proxies applied), or "cli"
    Column("request_id", String(128), nullable=True),
)
