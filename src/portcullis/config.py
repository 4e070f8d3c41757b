"""The configuration: one YAML file, validated once at startup, overridable from the environment.

Every section is a frozen pydantic model that forbids unknown keys: a typo is an error that names the
file, the field path and the reason, never a silently ignored setting. Secrets are never values in the
file: a deployment names the environment variable (`api_key_env`) or the file (`api_key_file`) that
holds its key.

Environment overrides: `PORTCULLIS_<SECTION>__<FIELD>[__<FIELD>...]=value`, for example
`PORTCULLIS_SERVER__PORT=9000`. Values are parsed as YAML scalars (so `true`, `3`, `[a, b]` work).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from portcullis.identity import scopes as scope_names
from portcullis.identity.principal import unstorable

ENV_PREFIX = "PORTCULLIS_"
# Variables with the prefix that are not config overrides.
_ENV_NOT_OVERRIDES = {"PORTCULLIS_CONFIG"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]


class ServerConfig(_Section):
    # Address to listen on.
    host: str = "127.0.0.1"
    # Port to listen on (0: any free port).
    port: int = Field(default=8000, ge=0, le=65535)
    # Larger request bodies get 413.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # On SIGTERM /readyz turns 503 at once; the listener stays open this long so load balancers
    # notice before connections are refused.
    drain_grace_s: float = Field(default=5.0, ge=0)
    # From SIGTERM, how long in-flight requests and streams may run before they are cut (a cut
    # stream ends with an error event).
    shutdown_timeout_s: PositiveFloat = 30.0
    # One JSON line per request.
    access_log: bool = True
    # The least severe log level written.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Keep-alive for client connections (seconds idle before the server closes one).
    keep_alive_s: PositiveFloat = 75.0
    # The most bytes a request's line and headers may take together; more gets 431 and the connection closes.
    head_max_bytes: int = Field(default=65_536, ge=4096, le=16_777_216)
    # The most header fields a request may have; more gets 431 and the connection closes.
    head_max_fields: int = Field(default=100, ge=16, le=10_000)
    # A request's line and headers must arrive within this many seconds (of connecting, or of the request's
    # first byte on a kept-alive connection); late: 408, closed. Slow and silent sockets cannot pile up.
    head_timeout_s: PositiveFloat = 10.0
    # A request's body must arrive within this many seconds of its headers, plus a second for each body_min_rate
    # bytes received (a large upload on a slow link is not cut, a trickle is); late: 408, closed.
    body_timeout_s: PositiveFloat = 120.0
    # Bytes per second that earn a body another second (see body_timeout_s).
    body_min_rate: int = Field(default=65_536, ge=1)
    # A client that reads nothing of its answer for this many seconds (the answer backs up in the socket) is
    # disconnected: a stream nobody reads would hold its task and an upstream slot.
    write_timeout_s: PositiveFloat = 60.0
    # Client connections one process keeps open (0: half the open-files limit, at most 16,384). At the cap the
    # oldest connection with no request in progress is closed to make room; if all are busy, the new one gets 503.
    max_connections: int = Field(default=0, ge=0)
    # Client connections from one address (0: no cap); over it, 503. Behind a proxy every connection comes from
    # the proxy's address: raise this above the proxy's connection pool, or set 0.
    max_connections_per_client: int = Field(default=1024, ge=0)
    # Browser origins allowed to call the API (CORS). None by default: no cross-origin access.
    cors_origins: list[str] = []
    # Addresses (CIDRs) of your own proxies in front of the gateway, whose X-Forwarded-For is believed; everyone
    # else is identified by the socket. List only the proxies: any peer in these ranges can claim any address.
    trusted_proxies: list[str] = []
    # How many trusted proxies a request passes (each appends to X-Forwarded-For): at most this many entries are
    # read from the right, so anything a client wrote to the left of them is ignored.
    trusted_proxy_hops: int = Field(default=1, ge=1, le=16)
    # Serve TLS with this certificate (PEM).
    ssl_certfile: Path | None = None
    # The certificate's private key (PEM).
    ssl_keyfile: Path | None = None
    # With TLS: the Strict-Transport-Security max-age.
    hsts_max_age_s: int = Field(default=31_536_000, ge=0)
    # /metrics needs the admin:read scope unless this is true (e.g. scraped on a private network).
    metrics_public: bool = False
    # Also export requests, tokens and spend per API key (a series per key: only with a bounded number of keys).
    metrics_per_key: bool = False

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            if ipaddress.ip_network(cidr, strict=False).prefixlen == 0:
                # Trusting every peer lets any client choose the address it is throttled under.
                raise ValueError(f"{cidr} trusts every peer: list the addresses of your proxies")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        return self


class StoreConfig(_Section):
    # SQLAlchemy URL of the database (SQLite for one host, PostgreSQL for several).
    database_url: str = "sqlite+aiosqlite:///portcullis.db"
    # Redis for limits, cache, revocations and events shared between processes (none: in-process).
    redis_url: str | None = None
    # Apply pending migrations at startup instead of refusing to start (the demo does this).
    auto_migrate: bool = False
    # Deadline of the gateway's own database work (connecting, waiting for a pooled connection, a usage
    # batch, a health probe). Key lookups on the request path have their own, shorter one.
    timeout_s: PositiveFloat = 5.0
    # Redis calls of the event bus (publishing a revocation, its liveness pings) fail after this.
    redis_timeout_s: PositiveFloat = 1.0

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST/DB")
        return value


JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384"]


def _default_algorithms() -> list[JwtAlgorithm]:
    # A function rather than a lambda: mypy infers a lambda's ["HS256"] as list[str], not the Literal.
    return ["HS256"]


class JwtConfig(_Section):
    # Accept JWT bearer tokens.
    enabled: bool = False
    # Algorithms accepted (never none).
    algorithms: list[JwtAlgorithm] = Field(default_factory=_default_algorithms, min_length=1)
    # HS*: the environment variable holding the shared secret.
    secret_env: str | None = "PORTCULLIS_JWT_SECRET"
    # HS*: or a file holding it.
    secret_file: Path | None = None
    # RS*/PS*/ES*: the issuer's public key (PEM).
    public_key_file: Path | None = None
    # Or: a JWKS file (keys chosen by kid).
    jwks_file: Path | None = None
    # Required iss claim.
    issuer: str | None = None
    # Required aud claim.
    audience: str | None = None
    # Clock skew allowed on exp/nbf/iat.
    leeway_s: float = Field(default=30.0, ge=0)
    # The claim naming the caller's tier.
    tier_claim: str = "tier"
    # The tier of a token without that claim.
    default_tier: str = "free"
    # The claim listing the models the caller may use (absent: all; present, it must be a list of names).
    models_claim: str = "models"
    # The claim naming the caller's team (identity/tenancy.py), e.g. "groups": a team id (team_...) or
    # "<organisation name>/<team name>", or a list of them (the first that names a team counts). The token's
    # principal then has the team's and its organisation's model grants, limits and budgets. None: tokens belong
    # to no team.
    team_claim: str | None = None
    # Refuse (401) a token whose team claim names no team (else it is served as belonging to none).
    team_required: bool = False
    # The scopes a token may grant; any other scope it claims is dropped. Default: inference only (no
    # models:write/delete, usage:read, keys:admin, admin:read); list them to let tokens administer.
    allowed_scopes: list[str] = Field(default_factory=lambda: list(scope_names.DEFAULT))
    # The tiers a token may claim; a token claiming another is refused (401). None: every configured tier.
    allowed_tiers: list[str] | None = None
    # A token's user is `jwt:` + its subject, apart from API-key users; this maps a subject to another user id
    # (e.g. an API-key user's, to share their files, batches, cache and budget). Empty: no mapping.
    users: dict[str, Annotated[str, Field(min_length=1, max_length=256)]] = {}

    @field_validator("allowed_scopes")
    @classmethod
    def _known_scopes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - scope_names.ALL)
        if unknown:
            raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(sorted(scope_names.ALL))}")
        return value

    @field_validator("users")
    @classmethod
    def _storable_users(cls, value: dict[str, str]) -> dict[str, str]:
        # A mapped user is stored as it is, like any other (identity/principal.py).
        for sub, user in value.items():
            problem = unstorable(user)
            if problem is not None:
                raise ValueError(f"the user that subject {sub!r} maps to cannot be stored: {problem}")
        return value


class AuthConfig(_Section):
    # Accept Portcullis API keys (pc-...).
    api_keys: bool = True
    # The server secret keyed into every stored key hash (HMAC-SHA256). Never in this file.
    key_secret_env: str = "PORTCULLIS_KEY_SECRET"
    # Or: a file holding that secret.
    key_secret_file: Path | None = None
    # How long a verified key is trusted without asking the database. Default: 30 s while the Redis
    # bus is connected (revocations are pushed over pub/sub), 1 s without it or while it is away
    # (revocation must bite within 1 s).
    key_cache_ttl_s: float | None = Field(default=None, gt=0)
    # A key lookup in the database that takes longer fails; a key verified before is then served from
    # the cache (below), a key never seen gets 503.
    key_lookup_timeout_s: PositiveFloat = 0.5
    # While the database fails or hangs, a key verified at most this long ago is still served from the
    # cache (revocations pushed over the bus still apply). 0: never serve a stale key.
    key_cache_stale_s: float = Field(default=600.0, ge=0)
    # After a rotation the old key keeps working this long.
    rotation_grace_s: float = Field(default=86_400.0, ge=0)
    # JWT bearer tokens (off by default).
    jwt: JwtConfig = JwtConfig()
    # Requests without credentials get an anonymous principal with every scope. Only for local
    # trials and benchmarks; startup logs a warning.
    allow_anonymous: bool = False
    # Failed authentications a client address may make per minute before 429.
    failed_auth_per_minute: int = Field(default=20, ge=1)


class RequestWindows(_Section):
    """Requests admitted per sliding window; None: no limit on that window."""

    # Requests per sliding minute.
    minute: int | None = Field(default=None, ge=1)
    # Requests per sliding hour.
    hour: int | None = Field(default=None, ge=1)
    # Requests per sliding day.
    day: int | None = Field(default=None, ge=1)


class TokenWindows(_Section):
    """Tokens (prompt + completion) per sliding window; None: no limit on that window."""

    # Tokens per sliding minute.
    minute: int | None = Field(default=None, ge=1)
    # Tokens per sliding day.
    day: int | None = Field(default=None, ge=1)


class LimitsConfig(_Section):
    """Rate limits of one principal (an API key, or the user of a JWT). Per-key overrides use this shape."""

    # Requests per sliding window.
    requests: RequestWindows = RequestWindows()
    # Prompt + completion tokens per sliding window.
    tokens: TokenWindows = TokenWindows()
    # Requests of this principal in flight at once; None: unlimited.
    concurrency: int | None = Field(default=None, ge=1)


class BudgetRange(_Section):
    """A budget for a fixed span of days: spend from `start` (00:00 UTC) until `end` (00:00 UTC, not included)."""

    # The first day it counts.
    start: date
    # The day it stops counting (outside [start, end) the budget does not apply).
    end: date
    # Spend allowed over the whole span, in quota.currency.
    amount: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> BudgetRange:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    def bounds(self) -> tuple[datetime, datetime]:
        """Its first instant and the one it stops at, UTC."""
        return (
            datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC),
            datetime(self.end.year, self.end.month, self.end.day, tzinfo=UTC),
        )


class BudgetConfig(_Section):
    """Spend limits in `quota.currency` per UTC calendar day, week and month, and over a fixed span of days; None:
    no limit."""

    # Spend allowed per UTC day, in quota.currency.
    day: float | None = Field(default=None, gt=0)
    # Spend allowed per UTC week (Monday to Sunday, ISO 8601).
    week: float | None = Field(default=None, gt=0)
    # Spend allowed per UTC month.
    month: float | None = Field(default=None, gt=0)
    # Spend allowed from one day to another (a grant for an event, a trial): {start, end, amount}.
    range: BudgetRange | None = None


class ModerationPolicy(_Section):
    """Which moderators check a request's input and its output, and how: set on a model or a tier, each
    field overriding the `moderation` section's (a model's own setting wins over its tier's)."""

    # Moderators that check user and tool messages (or the prompt).
    input: list[str] | None = None
    # Moderators that check answers and streams.
    output: list[str] | None = None
    # sequential: judged before the request goes on; parallel: beside the upstream call.
    mode: Literal["sequential", "parallel"] | None = None


class TierConfig(_Section):
    # Higher is more important: queued first, degraded last.
    priority: int = 0
    # Each principal of the tier gets these limits (a key's own `limits` override them field by field).
    limits: LimitsConfig = LimitsConfig()
    # Each user of the tier gets this budget (across all their keys); `quota.users` overrides it.
    user_budget: BudgetConfig = BudgetConfig()
    # The tier's moderation policy.
    moderation: ModerationPolicy | None = None


class UserQuota(_Section):
    # The user's budget across all their keys.
    budget: BudgetConfig = BudgetConfig()


class UsageConfig(_Section):
    # Records wait in a bounded in-memory queue and are written in batches; a full queue drops
    # (and counts) records rather than slow requests down.
    queue_size: int = Field(default=100_000, ge=1)
    # Records written per INSERT at most.
    batch_size: int = Field(default=500, ge=1)
    # How often queued records are written.
    flush_interval_s: PositiveFloat = 1.0
    # Each record is also appended to a local file before it is queued, and a process that starts
    # replays the files of processes that died (SIGKILL, a crash, a lost database meanwhile), so records
    # not yet written to the database are not lost. Off: a crash loses what was queued.
    spool: bool = True
    # Where the spool files are. Default: beside the SQLite database file, or for PostgreSQL under
    # $XDG_STATE_HOME (~/.local/state)/portcullis/usage-spool/, a folder per database. It must survive
    # the process (not a tmpfs a restart clears) and be private to the processes of this gateway.
    spool_dir: Path | None = None


class QuotaConfig(_Section):
    # Where counters live: "auto" is Redis when store.redis_url is set, else this process's memory.
    backend: Literal["auto", "memory", "redis"] = "auto"
    # Redis in cluster mode (every key of one user shares a hash slot, so one script still does it all).
    redis_cluster: bool = False
    # When Redis fails: fall back to in-process limits (each process taking `fallback_share` of every
    # limit) or refuse with 503 until it is back.
    on_store_error: Literal["fail_open", "fail_closed"] = "fail_open"
    # With fail_open: the share of every limit each process enforces alone while Redis is away.
    fallback_share: float = Field(default=1.0, gt=0, le=1)
    # A Redis call slower than this counts as a failure.
    store_timeout_s: PositiveFloat = 0.5
    # A concurrency slot is a lease in Redis: it expires by itself if the process holding it dies;
    # live requests renew theirs.
    concurrency_lease_s: PositiveFloat = 60.0
    # The reservation for a request without max_tokens (completion tokens), and the prompt estimate.
    default_max_tokens: int = Field(default=1024, ge=1)
    # The most completion tokens one request reserves, whatever its max_tokens (None: all of them). Agents ask for
    # far more than they use (Claude Code sends max_tokens 32000 each turn): reserving it all refuses a key with
    # budget left. A stream past its reservation takes more as it goes and is ended when a budget is spent; a
    # whole answer is charged what it spent.
    max_reserved_tokens: int | None = Field(default=None, ge=1)
    # For prompt estimates before the upstream's count is known.
    chars_per_token: PositiveFloat = 4.0
    # The currency of prices and budgets.
    currency: str = "USD"
    # Budgets of named users (override their tier's user_budget).
    users: dict[str, UserQuota] = {}
    # Fractions of a budget at which an alert is logged (and sent).
    alert_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0], min_length=1)
    # Budget alerts are also POSTed here.
    alert_webhook_url: str | None = None
    # A webhook call's time limit.
    alert_webhook_timeout_s: PositiveFloat = 5.0
    # Retries of a failed webhook call.
    alert_webhook_retries: int = Field(default=3, ge=0, le=10)
    # The usage records' queue.
    usage: UsageConfig = UsageConfig()

    @field_validator("alert_thresholds")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in value):
            raise ValueError("thresholds are fractions of the budget in (0, 1]")
        return sorted(set(value))


def _default_tiers() -> dict[str, TierConfig]:
    # Conservative starting points for a shared self-hosted model; every deployment should set its own.
    free = LimitsConfig(
        requests=RequestWindows(minute=60, day=5_000), tokens=TokenWindows(minute=100_000), concurrency=4
    )
    premium = LimitsConfig(requests=RequestWindows(minute=600), tokens=TokenWindows(minute=1_000_000), concurrency=32)
    return {
        "free": TierConfig(priority=0, limits=free),
        "premium": TierConfig(priority=1, limits=premium),
        "enterprise": TierConfig(priority=2),
    }


FailureKind = Literal["connect", "timeout", "5xx", "429"]


def _default_failure_kinds() -> list[FailureKind]:
    # (A function for the Literal type, as _default_algorithms.)
    return ["connect", "timeout", "5xx"]


class BackoffConfig(_Section):
    """Delay before retry n (1-based): uniform in [0, min(max_s, base_s * 2**(n-1))] ("full" jitter)."""

    # The first retry's delay ceiling; doubles per attempt.
    base_s: PositiveFloat = 0.2
    # The longest delay between attempts.
    max_s: PositiveFloat = 5.0
    # full: a random delay up to the ceiling (spreads retries); none: the ceiling itself.
    jitter: Literal["full", "none"] = "full"


class RetryBudgetConfig(_Section):
    """Retries of a model stay below `ratio` of its requests over `window_s` (plus `min_per_s`)."""

    # Retries allowed per request, over the window.
    ratio: float = Field(default=0.2, ge=0, le=1)
    # The window the budget is counted over.
    window_s: PositiveFloat = 10.0
    # Retries allowed regardless of the ratio (per second of window), so a quiet model can retry.
    min_per_s: float = Field(default=1.0, ge=0)


class BreakerConfig(_Section):
    """A circuit breaker per replica (per gateway process)."""

    # Opens after this many failures within `window_s` ...
    failures: int = Field(default=5, ge=1)
    # ... or, when set, once this fraction of at least `min_requests` requests in the window failed.
    failure_rate: float | None = Field(default=None, gt=0, le=1)
    # Requests in the window before failure_rate is judged.
    min_requests: int = Field(default=10, ge=1)
    # The rolling window failures are counted in.
    window_s: PositiveFloat = 30.0
    # How long an open breaker refuses before letting probes through.
    open_s: PositiveFloat = 30.0
    # Requests let through at once when open_s has passed; `close_after` successes close it again,
    # one failure reopens it.
    half_open_probes: int = Field(default=1, ge=1)
    # Successful probes needed to close again.
    close_after: int = Field(default=1, ge=1)
    # What counts as a failure. A client's 4xx never does.
    count: list[FailureKind] = Field(default_factory=_default_failure_kinds, min_length=1)

    @field_validator("count", mode="before")
    @classmethod
    def _status_as_text(cls, value: Any) -> Any:
        # YAML reads an unquoted 429 as a number.
        return [str(v) if isinstance(v, int) else v for v in value] if isinstance(value, list) else value


class ResilienceConfig(_Section):
    # Retries after the first attempt (so at most retries + 1 attempts), each preferably on another
    # replica or the model's fallback. Only before anything was sent to the client.
    retries: int = Field(default=2, ge=0, le=10)
    # Delay between attempts.
    backoff: BackoffConfig = BackoffConfig()
    # Retries allowed as a share of requests.
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    # A circuit breaker per replica.
    breaker: BreakerConfig = BreakerConfig()


class DegradeConfig(_Section):
    """Serve a cheaper answer when a model is slow to start answering; the client is told."""

    # Degrade while the model's observed time to first token (p95 over window_s) exceeds this.
    # None: never.
    ttft_p95_s: PositiveFloat | None = None
    # The window time-to-first-token p95 is measured over.
    window_s: PositiveFloat = 60.0
    # Requests in the window before degradation may start.
    min_samples: int = Field(default=20, ge=1)
    # Cap max_tokens at this, and/or route to this (cheaper) model.
    max_tokens: int | None = Field(default=None, ge=1)
    # Degrade to this model instead (told in x-portcullis-degraded).
    model: str | None = None
    # Only principals of these tiers are degraded; None: every tier.
    tiers: list[str] | None = None


class AdmissionConfig(_Section):
    # When every slot of a model is busy: wait in a bounded queue (ordered by tier priority, fair
    # between keys of a tier), or answer 503 at once. Both say when to come back (Retry-After).
    when_full: Literal["queue", "reject"] = "queue"
    # Requests that may wait for a slot per model; beyond it: 503 queue_full.
    max_queue: int = Field(default=64, ge=0)
    # The longest a request waits for a slot before a 503 with Retry-After. In a sustained overload the
    # queue stays full and every served request waits about this long: keep it below your clients'
    # patience less one service time (docs/resilience.md, bench/RESULTS.md "overload").
    max_wait_s: PositiveFloat = 5.0
    # Graceful degradation when a model is slow (models.<name>.degrade overrides it).
    degrade: DegradeConfig = DegradeConfig()


class SemanticCacheConfig(_Section):
    """Opt-in: a deterministic chat request whose conversation is close enough to a cached one (cosine
    similarity of their embeddings ≥ threshold, same scope and same other parameters) gets that answer.
    Needs numpy (pip install 'portcullis[semantic]')."""

    # Answer from the nearest earlier conversation of the same family.
    enabled: bool = False
    # A configured model that answers /v1/embeddings (llama-server with --embeddings works).
    model: str | None = None
    # Cosine similarity needed for a hit.
    threshold: float = Field(default=0.95, gt=0, le=1)
    # Conversations indexed at most.
    max_entries: int = Field(default=10_000, ge=1)
    # An embedding call slower than this: a miss.
    timeout_s: PositiveFloat = 2.0


class CacheConfig(_Section):
    """The exact response cache (docs/caching.md). Only deterministic requests are ever cached."""

    # The exact response cache (deterministic requests only: temperature 0, or a seed with `seeded`).
    enabled: bool = True
    # memory: this process (an LRU bounded in bytes); redis: shared by every process (store.redis_url);
    # auto: redis when store.redis_url is set.
    backend: Literal["auto", "memory", "redis"] = "memory"
    # How long an answer is kept.
    ttl_s: PositiveFloat = 3600.0
    # The memory backend's size bound (least recently used evicted).
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # Answers larger than this are not cached.
    max_entry_bytes: int = Field(default=4 * 1024 * 1024, ge=256)
    # tenant: entries are per user; global: shared by everyone (only for answers that may be shared).
    scope: Literal["tenant", "global"] = "tenant"
    # Also cache requests with a fixed `seed` (not only temperature 0): deterministic on one build of one
    # backend, not necessarily across replicas.
    seeded: bool = False
    # Identical cacheable requests in flight share one upstream call.
    coalesce: bool = True
    # The Redis backend's calls fail after this; the cache then steps aside (every lookup a miss, no
    # coalescing across processes) for `store_retry_s` before one request tries Redis again.
    store_timeout_s: PositiveFloat = 0.25
    # How long the cache leaves Redis alone after a failed or late call.
    store_retry_s: PositiveFloat = 5.0
    # The opt-in semantic cache (nearest earlier conversation).
    semantic: SemanticCacheConfig = SemanticCacheConfig()


class EmbeddingBatchingConfig(_Section):
    """Merge concurrent /v1/embeddings requests of one model into one upstream call (cache/batching.py)."""

    # Merge concurrent /v1/embeddings requests into one upstream call.
    enabled: bool = False
    # Inputs per merged call at most.
    max_batch_inputs: int = Field(default=256, ge=2)
    # The longest a request waits for others to join.
    max_wait_ms: PositiveFloat = 5.0


class ImageUrlPolicy(_Section):
    """Which URLs a chat message's image_url (and video_url, audio_url) parts may carry. Upstreams such as
    llama-server and vLLM fetch an http(s) URL themselves, from inside the network: an unchecked URL lets
    any client make them fetch internal addresses (cloud metadata, admin ports)."""

    # Accept data: URLs (the image inline).
    allow_data: bool = True
    # Hosts whose https:// URLs are accepted: exact names, "*.example.com" for its subdomains, or "*" for
    # any public host. Empty: data: URLs only. Loopback, private and link-local addresses (and names such
    # as localhost) are refused whatever this says.
    allowed_hosts: list[str] = []
    # Also accept plain http:// URLs on the allowed hosts.
    allow_http: bool = False

    @field_validator("allowed_hosts")
    @classmethod
    def _public_hosts(cls, value: list[str]) -> list[str]:
        # Lazy: the checker lives with the request validation, which imports this module.
        from portcullis.safety.validation import HOST_NAME, internal_host

        hosts = []
        for entry in value:
            host = entry.strip().lower().rstrip(".")
            if host != "*":
                name = host.removeprefix("*.")
                if not HOST_NAME.fullmatch(name):
                    raise ValueError(f"{entry!r} is not a host name (give images.example.com, *.example.com or *)")
                reason = internal_host(name)
                if reason:
                    raise ValueError(f"{entry!r} is {reason}: image URLs there are never allowed")
            hosts.append(host)
        return hosts


class ValidationLimits(_Section):
    # Messages per chat request.
    max_messages: int = Field(default=2048, ge=1)
    # Characters per message.
    max_message_chars: int = Field(default=1_000_000, ge=1)
    # Characters of all messages together (of a completion: its prompts, a token id counting as one).
    max_total_chars: int = Field(default=4_000_000, ge=1)
    # Requests asking for more max_tokens are refused (none: no ceiling). It bounds the request's one
    # length (the smallest of max_tokens, max_completion_tokens and native_length_fields), and a request
    # giving none is forwarded with max_tokens set to it.
    max_tokens_ceiling: int | None = Field(default=None, ge=1)
    # Backend-native fields that also bound an answer's length (llama-server's n_predict); each one a
    # request gives is validated and forwarded holding the request's one length.
    native_length_fields: list[str] = ["n_predict"]
    # Choices per request at most: n, best_of and llama-server's n_cmpl (each choice is a whole answer);
    # a completion with several prompts gets them for each, so its prompts times its choices are held to it.
    max_choices: int = Field(default=8, ge=1, le=128)
    # Which image URLs chat messages may carry.
    image_urls: ImageUrlPolicy = ImageUrlPolicy()
    # Nesting depth of the request body.
    max_json_depth: int = Field(default=32, ge=2, le=256)
    # Inputs per embeddings (or moderations) request.
    max_embedding_inputs: int = Field(default=2048, ge=1)

    @field_validator("native_length_fields")
    @classmethod
    def _native_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or name in ("max_tokens", "max_completion_tokens"):
                raise ValueError(f"{name!r}: name backend-native fields only (the OpenAI ones always count)")
        return list(dict.fromkeys(value))


class UpstreamTimeouts(_Section):
    """Limits on one upstream call. Each model can override any of them (`models.<m>.timeouts`)."""

    # Opening a connection.
    connect_s: PositiveFloat = 5.0
    # Longest wait for a free pooled connection.
    pool_s: PositiveFloat = 10.0
    # Streams: from sending the request to the first event. Past it, nothing has reached the client,
    # so the request is retried on another replica (llama-server beyond its slots queues silently:
    # this is what catches a replica that accepted work it will not start soon). At least the prefill
    # of the longest prompt on the slowest replica (its context / prompt tokens per second), doubled.
    ttft_s: PositiveFloat = 60.0
    # Streams: longest silence between two events once the stream has started. Past it the client's
    # stream ends with an error event and the upstream call is cancelled.
    idle_s: PositiveFloat = 30.0
    # The whole upstream part of a request, attempts and streaming included. A non-streamed answer
    # arrives in one piece at the end, so this is its only bound after connecting: at least the
    # longest answer (max_tokens / decoding tokens per second) plus ttft_s. (A replica whose probes
    # fail has the requests waiting on it retried elsewhere long before.)
    total_s: PositiveFloat = 300.0


class ModelTimeouts(_Section):
    """Per-model overrides of `upstream.timeouts` (unset fields keep the global value)."""

    # Overrides upstream.timeouts.connect_s.
    connect_s: PositiveFloat | None = None
    # Overrides upstream.timeouts.pool_s.
    pool_s: PositiveFloat | None = None
    # Overrides upstream.timeouts.ttft_s.
    ttft_s: PositiveFloat | None = None
    # Overrides upstream.timeouts.idle_s.
    idle_s: PositiveFloat | None = None
    # Overrides upstream.timeouts.total_s.
    total_s: PositiveFloat | None = None

    def over(self, base: UpstreamTimeouts) -> UpstreamTimeouts:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class UpstreamConfig(_Section):
    # Time limits of every upstream call (models.<name>.timeouts override them).
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    # Pooled connections to one replica for traffic (each open stream holds one), unless its deployment
    # sets max_connections. Waiting for one is the gateway's congestion, never counted against the replica.
    max_connections_per_replica: int = Field(default=8192, ge=1)
    # A pooled connection idle this long is not reused. Below the 5 s after which llama-server
    # (cpp-httplib) and uvicorn close an idle keep-alive connection, so the gateway rarely picks one up
    # just as the server closes it (when it does, the request goes again on a fresh connection).
    keepalive_s: PositiveFloat = 4.0


class HealthConfig(_Section):
    # How often each replica is probed.
    interval_s: PositiveFloat = 2.0
    # A probe's time limit.
    timeout_s: PositiveFloat = 2.0
    # Consecutive failed probes (no answer, an error) before a ready replica is marked down: one slow
    # probe under load is not an outage. (A refused connection during a request marks it down at once.)
    down_after: int = Field(default=3, ge=1)
    # Consecutive good probes before a replica that was down receives traffic again.
    up_after: int = Field(default=2, ge=1)
    # Wait this long at startup for a first probe of every replica before serving.
    startup_probe_timeout_s: float = Field(default=5.0, ge=0)
    # With each probe of a ready llama-server, read its own load: /metrics (requests processing and deferred, when
    # started with --metrics) and /slots (busy slots, the KV cache they hold). What it carries beyond the gateway's
    # requests (other clients) counts against its capacity in balancing and admission; exported per replica in the
    # shape of the Gateway API Inference Extension's model-server protocol (docs/llama-server.md).
    load_signals: bool = True


class CostConfig(_Section):
    """What a deployment costs, in `quota.currency`: a price per 1,000 tokens, or what its machine costs
    an hour (`gpu_hour`), from which the gateway derives a price per token using the throughput it
    measures (routing/catalog.py)."""

    # Price of 1,000 prompt tokens in quota.currency.
    prompt_per_1k: float = Field(default=0.0, ge=0)
    # Price of 1,000 completion tokens.
    completion_per_1k: float = Field(default=0.0, ge=0)
    # Or: the machine's price an hour; per-token prices then follow from measured throughput.
    gpu_hour: float | None = Field(default=None, gt=0)
    # With gpu_hour: the completion tokens per second the deployment gives at full load, assumed until
    # the gateway has measured it. Prompt tokens are priced at `prompt_ratio` of a completion token
    # (prefill is that much cheaper than decoding) until measured too.
    tokens_per_s: float | None = Field(default=None, gt=0)
    # With gpu_hour: a prompt token's price as a share of a completion token's.
    prompt_ratio: float = Field(default=0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _one_way(self) -> CostConfig:
        if self.gpu_hour is not None and (self.prompt_per_1k or self.completion_per_1k):
            raise ValueError("give per-1k prices or gpu_hour, not both")
        if (self.gpu_hour is None) != (self.tokens_per_s is None):
            raise ValueError("gpu_hour needs tokens_per_s (the throughput assumed until it is measured), and back")
        return self


class _KeySource(_Section):
    """A section naming where a secret key is (`api_key_env` or `api_key_file`, declared by the subclass
    where it reads best): never in the file itself, and from one place only."""

    @model_validator(mode="after")
    def _one_secret_source(self) -> _KeySource:
        if getattr(self, "api_key_env", None) and getattr(self, "api_key_file", None):
            raise ValueError("set api_key_env or api_key_file, not both")
        return self

    def api_key(self) -> str | None:
        """The key, read from the environment or a file (never from the config itself)."""
        env: str | None = getattr(self, "api_key_env", None)
        path: Path | None = getattr(self, "api_key_file", None)
        if env:
            return os.environ.get(env)
        if path:
            return path.read_text().strip()
        return None


# The endpoints a deployment may answer natively (DeploymentConfig.native): the APIs the gateway can also translate.
NATIVE_PATHS = frozenset(
    {
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/chat/completions/input_tokens",
        "/completion",
        "/infill",
    }
)


class HostSchedulingConfig(_Section):
    """How a host that holds fewer models than it serves decides when to switch (docs/llama-server.md)."""

    # swap_aware: the loaded models' requests go first, a switch happens when another model's oldest request
    # has waited `max_wait_s` or a loaded model is idle. fifo: strictly in arrival order (a switch whenever the
    # oldest request wants a model that is not loaded): fewer surprises, many more swaps.
    policy: Literal["swap_aware", "fifo"] = "swap_aware"
    # The longest a request waits for its model before a switch to it begins (the loaded model's requests in
    # flight then finish, new ones wait, and the switch takes one load time). Tiers' priorities order the models
    # that wait; batch lines never cause a switch in peak hours.
    max_wait_s: PositiveFloat = 10.0
    # A loaded model with nothing in flight for this long is idle: another model's request switches at once.
    idle_s: float = Field(default=0.5, ge=0)
    # Requests waiting for a model on this host, at most; beyond it a 503 with Retry-After.
    max_queue: int = Field(default=256, ge=1)
    # A model's load time assumed until one was measured (Retry-After, the switch's timing).
    load_s: PositiveFloat = 30.0
    # A load that takes longer has failed.
    load_timeout_s: PositiveFloat = 600.0
    # After a failed load, the model is not tried again for this long (its requests get 503 with Retry-After).
    failed_retry_s: PositiveFloat = 30.0


class HostConfig(_Section):
    """A machine that holds fewer models at once than it serves: a llama-server in router mode (`kind: router`,
    one server that loads and unloads models: --models-dir or --models-preset), or one llama-server process
    per model started and stopped by the gateway (`kind: launch`). Deployments name it (`host:`)."""

    # router: a llama-server in router mode; launch: one server process per model, started by the gateway.
    kind: Literal["router", "launch"]
    # router: the router's http(s)://host:port. launch: not used (each process gets a port of its own).
    url: str | None = None
    # Models loaded at once. router: the server's --models-max when not set (its /props max_instances);
    # launch: 1 when not set.
    max_models: int | None = Field(default=None, ge=1)
    # Sets of models of which at most one runs at a time (they need the same GPU memory).
    exclusive: list[list[str]] = []
    # Unload a model after this long without a request (None: only to make room).
    ttl_s: PositiveFloat | None = None
    scheduling: HostSchedulingConfig = HostSchedulingConfig()
    # launch: the address the processes listen on (each on a port the gateway chooses).
    listen_host: str = "127.0.0.1"
    # launch: the time a starting process has to answer /health 200 (a model's load).
    start_timeout_s: PositiveFloat = 120.0
    # launch: the time a stopping process has after SIGTERM before SIGKILL.
    stop_timeout_s: PositiveFloat = 10.0
    # launch: crashes in a row (without a minute of serving between) after which the model is failed for
    # scheduling.failed_retry_s.
    max_restarts: int = Field(default=5, ge=0)

    @field_validator("url")
    @classmethod
    def _host_url(cls, value: str | None) -> str | None:
        return None if value is None else DeploymentConfig._http_url(value)

    @model_validator(mode="after")
    def _kind_fields(self) -> HostConfig:
        if self.kind == "router" and self.url is None:
            raise ValueError("a router host needs url (the llama-server started with --models-dir/--models-preset)")
        if self.kind == "launch" and self.url is not None:
            raise ValueError("a launch host has no url: each model's process gets a port chosen by the gateway")
        return self


class WarmRestartConfig(_Section):
    """Save the KV cache of a model's most used system prompts on the replica's disk and restore it when the replica
    comes back (llama-server started with --slot-save-path; docs/llama-server.md, "Warm restarts")."""

    # System prompts kept warm, the most used first (one slot each: at most the replica's slots).
    prefixes: int = Field(default=2, ge=1, le=64)
    # How often they are primed and saved again.
    save_every_s: PositiveFloat = 300.0
    # A system prompt shorter than this many characters is not worth a slot.
    min_chars: int = Field(default=512, ge=1)


class DeploymentConfig(_KeySource):
    # http(s)://host:port of the backend (no path). Not with `host`.
    url: str = ""
    # The host (hosts.<name>) this model runs on, loaded when needed: a router-mode llama-server (upstream_model
    # names the model there) or launched processes (`command`).
    host: str | None = None
    # launch hosts: the command that serves this model, one argument per item; `{port}` is replaced by the port the
    # gateway chose, e.g. [llama-server, -m, /models/a.gguf, --port, "{port}"].
    command: list[str] | None = None
    # llama_cpp: probed on /health, slots and context from /props; openai: any OpenAI-compatible server.
    kind: Literal["llama_cpp", "openai"] = "llama_cpp"
    # The model name sent upstream, when the backend knows the model by another name.
    upstream_model: str | None = None
    # The environment variable holding the backend's API key (sent as Authorization: Bearer).
    api_key_env: str | None = None
    # Or: a file holding it.
    api_key_file: Path | None = None
    # Capacity relative to other replicas (openai backends; llama-server reports its slots).
    weight: int = Field(default=1, ge=1)
    # The replica's name in metrics and logs (default host:port).
    name: str | None = None
    # Prices, for budgets, usage and cost-aware routing.
    cost: CostConfig = CostConfig()
    # Requests the gateway sends this replica at once; beyond it they wait in the gateway's queue
    # (admission). None: llama-server's slot count (/props total_slots); unlimited for other kinds.
    max_in_flight: int | None = Field(default=None, ge=1)
    # Pooled connections to this replica for traffic (each open stream holds one; a request waits at most
    # upstream.timeouts.pool_s for a free one). None: upstream.max_connections_per_replica.
    max_connections: int | None = Field(default=None, ge=1)
    # Context per slot, in tokens. llama-server tells it (/props); give it for other backends, where a
    # request that cannot fit is then never sent here.
    n_ctx: int | None = Field(default=None, ge=16)
    # How capable this deployment is, 0..1, for cost-aware routers (a router sends a request to the
    # cheapest candidate whose quality covers the request's estimated complexity).
    quality: float | None = Field(default=None, ge=0, le=1)
    # Free labels, shown by /admin/models.
    tags: list[str] = []
    # The API endpoints this backend answers itself, which get their requests as sent (others are translated to
    # chat completions and back): "/v1/responses", "/v1/messages" and the token counting and llama.cpp ones.
    # None: every one of them for llama_cpp (a path it answers 404 or 501 is then learned and translated), none
    # for openai.
    native: list[str] | None = None
    # llama_cpp: keep the most used system prompts' KV cache on the server's disk and restore it after a restart.
    warm_restart: WarmRestartConfig | None = None

    @field_validator("native")
    @classmethod
    def _native_paths(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted(set(value or ()) - NATIVE_PATHS)
        if unknown:
            raise ValueError(f"unknown endpoint(s) {', '.join(unknown)}; known: {', '.join(sorted(NATIVE_PATHS))}")
        return value

    @model_validator(mode="after")
    def _url_or_host(self) -> DeploymentConfig:
        if self.host is None and not self.url:
            raise ValueError("give url (a backend) or host (hosts.<name>)")
        if self.host is not None and self.url:
            raise ValueError("give url or host, not both: a host's models are reached through it")
        if self.command is not None and (not self.command or not any("{port}" in a for a in self.command)):
            raise ValueError("command must name the port the gateway chose as {port}")
        return self

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")


class ModelConfig(_Section):
    # The replicas serving this model (one per backend).
    deployments: list[DeploymentConfig] = Field(min_length=1)
    # Other names clients may use for this model (listed by GET /v1/models).
    aliases: list[str] = []
    # Models tried, in order, when every replica of this one has failed or is unavailable (a retry
    # may go there; the answer's `model` then names the model that served it).
    fallbacks: list[str] = []
    # Also when every slot of this model is taken: a request goes to the first fallback with a free
    # slot instead of queueing (told in x-portcullis-route).
    spill_to_fallbacks: bool = False
    # The model's quality for routers, 0..1, where its deployments do not give their own.
    quality: float | None = Field(default=None, ge=0, le=1)
    # Overrides of upstream.timeouts for this model.
    timeouts: ModelTimeouts = ModelTimeouts()
    # Overrides `admission.degrade` for this model.
    degrade: DegradeConfig | None = None
    # This model's moderation policy (over its tier's and the section's).
    moderation: ModerationPolicy | None = None


class RouterConfig(_Section):
    """A logical model that picks one of its candidate models per request (routing/router.py)."""

    # The only strategy so far.
    strategy: Literal["cost_aware"] = "cost_aware"
    # Configured models, from cheap to capable.
    candidates: list[str] = Field(min_length=1)
    # Other names for the router.
    aliases: list[str] = []
    # The complexity scorer: `heuristic` (routing/complexity.py) or `package.module:function`, called
    # with the request's Features and returning 0..1.
    scorer: str = "heuristic"
    # Candidates without a quality of their own get these, in candidates' order (cheap to capable).
    # None: evenly spread over [0.3, 1].
    default_quality: list[float] | None = None
    # When the candidate the request deserves has no free slot, use a more expensive one that has
    # (rather than queueing); the latency budget, when given, decides too.
    spill_when_full: bool = True
    # A latency budget for every request through this router (a client's header or field overrides it).
    latency_budget_ms: float | None = Field(default=None, gt=0)
    # Completion tokens assumed for cost and latency estimates when the request sets no max_tokens.
    expected_completion_tokens: int = Field(default=256, ge=1)


class AffinityConfig(_Section):
    """Prefix affinity: requests that share a prompt prefix go to the llama-server replica that saw it."""

    # Send a conversation's turns to the replica holding its prompt prefix (2+ llama-server replicas).
    enabled: bool = True
    # The prompt is cut into blocks of this many characters; a request is matched on its longest run of
    # leading blocks seen before.
    block_chars: int = Field(default=256, ge=16)
    # Prefix keys per request at most (one per block_chars of the rendered prompt).
    max_blocks: int = Field(default=64, ge=1)
    # Remembered prefixes (block hashes), least recently used forgotten first.
    max_entries: int = Field(default=100_000, ge=16)
    # A replica keeps its prefixes while it has a free slot and at most this many times the average load.
    load_factor: float = Field(default=2.0, ge=1.0)
    # Check each placement against the answer (llama-server's timings.cache_n, usage.prompt_tokens_details.
    # cached_tokens): learn how well each replica keeps the prefixes placed on it, and place new prefixes in
    # proportion to it (a replica whose cache does not keep them, too few slots for its conversations, gets fewer).
    learn: bool = True


class ContextFitConfig(_Section):
    """Never send a request to a deployment whose context per slot cannot hold it."""

    # Never send a request where its context cannot hold it; 400 before any upstream call if nowhere.
    enabled: bool = True
    # auto: ask the upstream's /tokenize (llama-server) only when the estimate is close to a context
    # limit; always: whenever a limit is known; never: estimates only.
    tokenize: Literal["auto", "always", "never"] = "auto"
    # The estimate's uncertainty: a prompt estimated at N tokens may really be N*(1±margin).
    margin: float = Field(default=0.5, ge=0, le=4)
    # A /tokenize call slower than this: the estimate decides.
    tokenize_timeout_s: PositiveFloat = 2.0
    # Token counts of message texts remembered (exact counts from /tokenize).
    cache_entries: int = Field(default=20_000, ge=1)


class RoutingConfig(_Section):
    # Prefix affinity (routing.md).
    affinity: AffinityConfig = AffinityConfig()
    # Context fit (routing.md).
    context: ContextFitConfig = ContextFitConfig()


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class OffPeakWindow(_Section):
    """Part of the week when capacity is cheap: `days` (mon-fri, sat,sun, daily), `from`-`to` local time
    in `tz` (a window may pass midnight: from 19:00 to 07:00 ends the next morning)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # daily, mon-fri, sat,sun, ...
    days: str = "daily"
    # Local start time (HH:MM).
    start: str = Field(default="00:00", alias="from")
    # Local end time; a window ending at or before its start runs past midnight.
    end: str = Field(default="24:00", alias="to")
    # IANA time zone of the times.
    tz: str = "UTC"

    @field_validator("days")
    @classmethod
    def _days(cls, value: str) -> str:
        day_set(value)
        return value

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        clock_minutes(value)
        return value

    @field_validator("tz")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


def day_set(text: str) -> frozenset[int]:
    """'mon-fri', 'sat,sun', 'daily' → weekday numbers (Monday 0)."""
    text = text.strip().lower()
    if text in ("daily", "all", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = (p.strip()[:3] for p in part.split("-", 1))
            if a not in _DAYS or b not in _DAYS:
                raise ValueError(f"{part!r} is not a day range like mon-fri")
            i, j = _DAYS.index(a), _DAYS.index(b)
            days.update((i + k) % 7 for k in range((j - i) % 7 + 1))
        elif part[:3] in _DAYS:
            days.add(_DAYS.index(part[:3]))
        else:
            raise ValueError(f"{part!r} is not a day (mon..sun, mon-fri, daily)")
    return frozenset(days)


def clock_minutes(text: str) -> int:
    """'19:30' → minutes after midnight (24:00 is the end of the day)."""
    hours, _, minutes = text.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ValueError(f"{text!r} is not a time like 19:00")
    value = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or value > 24 * 60:
        raise ValueError(f"{text!r} is not a time of day")
    return value


class LowPriorityConfig(_Section):
    # Requests sent with `x-portcullis-priority: low` queue behind every tier. During peak hours
    # (outside `off_peak`) they can instead be refused with 503 and a Retry-After that points to the
    # next off-peak window.
    in_peak: Literal["queue", "refuse"] = "queue"


class SchedulingConfig(_Section):
    # When capacity is cheap (batch jobs prefer these; low-priority requests may be held to them).
    # Empty: every hour is off-peak.
    off_peak: list[OffPeakWindow] = []
    # What x-portcullis-priority: low requests get.
    low_priority: LowPriorityConfig = LowPriorityConfig()


class ResponsesConfig(_Section):
    """The Responses API's stored responses (surfaces/store.py)."""

    # How long a stored response (`store: true`, the default) can be read and continued (previous_response_id).
    retention_s: PositiveFloat = 30 * 86400.0
    # The most items a conversation continued by previous_response_id may hold (older turns are kept whole).
    max_items: int = Field(default=2000, ge=1)


class BatchConfig(_Section):
    """The Batch API, run on this gateway's own backends (jobs/)."""

    # The Batch API (/v1/files, /v1/batches) and this process's batch runner.
    enabled: bool = True
    # The largest input file accepted.
    max_file_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    # The most requests one batch file may hold.
    max_lines: int = Field(default=50_000, ge=1)
    # completion_window values accepted: 24h as OpenAI, and any duration like 90m, 12h, 2d within these.
    min_window_s: PositiveFloat = 60.0
    # The longest completion_window accepted.
    max_window_s: PositiveFloat = 7 * 86400.0
    # A line being executed is leased for this long (renewed while it runs); a process that dies loses
    # its leases when they expire and another process (or itself, restarted) runs the lines again.
    lease_s: PositiveFloat = 60.0
    # How often the runner looks for work (and at once when a line ends or a batch arrives).
    poll_s: PositiveFloat = 1.0
    # Lines this process runs at once at most (besides the free slots it finds).
    max_in_flight: int = Field(default=64, ge=1)
    # Slots of each model left free for interactive requests (batch lines are also preempted, and run
    # again later, when an interactive request would otherwise queue).
    reserve_slots: int = Field(default=1, ge=0)
    # Outside off-peak windows: run only when the batch could not finish in the off-peak time left
    # before its deadline (`when_needed`), always, or never.
    in_peak: Literal["when_needed", "always", "never"] = "when_needed"
    # Transient refusals (overload, rate limits, no replica) are retried after this at least.
    retry_delay_s: PositiveFloat = 1.0
    # Uploaded and generated files are kept this long (None: until deleted).
    file_ttl_s: PositiveFloat | None = 30 * 86400.0
    # Files one principal may keep stored at once, input and output (uploads past it get 400
    # file_quota_exceeded). A batch's output and error files are always written, and count: while they put
    # the principal over a limit, uploads and new batches are refused until files are deleted or expire.
    max_files_per_owner: int = Field(default=100, ge=1)
    # Bytes of files (input and output) one principal may keep stored at once (an upload past it gets 413).
    max_bytes_per_owner: int = Field(default=1024 * 1024 * 1024, ge=1024)
    # Uploads one principal may have in progress at once in this process (more get 429 too_many_uploads).
    max_uploads_in_progress: int = Field(default=2, ge=1)
    # Batch creations one principal may have in progress at once in this process (more get 429
    # too_many_batch_creations): each reads its input file (up to max_file_bytes) twice and writes its lines.
    max_creations_in_progress: int = Field(default=2, ge=1)
    # Batches not yet ended (in progress or being cancelled) one principal may have at once (more get 429
    # too_many_batches): each keeps a copy of its lines in the database until it ends.
    max_live_batches_per_owner: int = Field(default=100, ge=1)
    # Requests one principal's unfinished batches may hold in all (a batch that would pass it gets 429
    # too_many_queued_requests; one larger than it alone, 400).
    max_queued_lines_per_owner: int = Field(default=1_000_000, ge=1)
    # Where uploads are spooled while they arrive, before they are stored (unset: the system's temp dir).
    spool_dir: Path | None = None


ModerationAction = Literal["block", "redact", "flag"]
PiiKind = Literal["email", "phone", "card", "iban", "national_id"]


class _ModeratorBase(_Section):
    # A moderator that cannot answer within `timeout_s` (or fails) lets the content through
    # (fail_open) or refuses it with 503 moderation_unavailable (fail_closed).
    timeout_s: PositiveFloat = 2.0
    # fail_open: let the content through when the moderator fails; fail_closed: refuse it (503).
    on_error: Literal["fail_open", "fail_closed"] = "fail_closed"
    # What a flagged verdict does: refuse (block) or only count and log it (flag: a dry run).
    action: Literal["block", "flag"] = "block"


class OpenAIModerationConfig(_ModeratorBase, _KeySource):
    """Any OpenAI-compatible moderation endpoint (hosted or self-hosted)."""

    # openai_moderation
    kind: Literal["openai_moderation"]
    url: str  # base URL; the gateway posts to {url}/v1/moderations
    # The environment variable holding the endpoint's API key.
    api_key_env: str | None = None
    # Or: a file holding it.
    api_key_file: Path | None = None
    model: str | None = None  # sent as `model` (e.g. omni-moderation-latest); the endpoint's default if unset
    # category → score at or above which it counts; categories without one count when the endpoint flags them
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/").removesuffix("/v1/moderations")


class GuardModelConfig(_ModeratorBase):
    """A guard model (Llama Guard style) served by a model of the catalog, prompted with a template."""

    # guard_model
    kind: Literal["guard_model"]
    # The configured model that serves the guard.
    model: str
    # The category codes the model answers with → the names the gateway reports (default: Llama Guard 3's).
    categories: dict[str, str] | None = None
    # The prompt, with {role} ('User' or 'Agent'), {categories} and {conversation}; default: Llama Guard 3's task.
    template: str | None = None
    # The guard's answer length limit.
    max_tokens: int = Field(default=16, ge=2, le=256)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None and "{conversation}" not in value:
            raise ValueError("the template must contain {conversation}")
        return value


class PatternRule(_Section):
    name: str = Field(min_length=1, max_length=64)  # the category reported (never the matched text)
    # A Python regular expression (checked at startup).
    regex: str
    # block, redact or flag.
    action: ModerationAction = "block"
    replacement: str | None = None  # for redact; default "[REDACTED:<name>]"
    # Match regardless of case.
    ignore_case: bool = True

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class KeywordRule(_Section):
    # The category reported (never the matched text).
    name: str = Field(min_length=1, max_length=64)
    words: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)  # whole words or phrases, any case
    # block, redact or flag.
    action: ModerationAction = "block"
    # For redact; default "[REDACTED:<name>]".
    replacement: str | None = None


class RulesConfig(_Section):
    """Local rules: PII detectors, regular expressions, keyword lists. They never fail and cost microseconds."""

    # rules
    kind: Literal["rules"]
    # PII detectors and their actions (email, phone, card, iban, national_id).
    pii: dict[PiiKind, ModerationAction] = {}
    # Regular-expression rules.
    patterns: list[PatternRule] = []
    # Keyword and phrase lists.
    keywords: list[KeywordRule] = []
    # Optional sets shipped with the gateway: "markup_injection" (<script, javascript:, onerror= ...) blocks
    # legitimate questions about HTML, hence off unless named here.
    rule_sets: list[Literal["markup_injection"]] = []


ModeratorConfig = Annotated[OpenAIModerationConfig | GuardModelConfig | RulesConfig, Field(discriminator="kind")]


class ModerationConfig(_Section):
    """Moderation (safety/moderation.py): named moderators, and which of them check input and output."""

    # Named moderators (kind: rules, guard_model or openai_moderation).
    moderators: dict[str, ModeratorConfig] = {}
    input: list[str] = []  # user and tool messages (chat), the prompt (completions)
    output: list[str] = []  # the answer's text, streamed or not
    # parallel: the upstream call starts while the (remote) input moderators run; the answer is held until
    # they pass, and the call is cancelled if they do not.
    mode: Literal["sequential", "parallel"] = "sequential"
    endpoint: list[str] | None = None  # what serves POST /v1/moderations (default: `input`)
    # Streams are checked in windows of this many characters; nothing reaches the client unchecked.
    stream_window_chars: int = Field(default=200, ge=8, le=100_000)
    # Each window is checked with this much of the text already sent before it (a phrase split across two
    # windows is still seen whole).
    stream_context_chars: int = Field(default=100, ge=0, le=10_000)
    # The most characters a remote moderator is sent (the newest; longer input is cut from the front).
    max_chars: int = Field(default=32_000, ge=100)
    # Inputs one POST /v1/moderations may carry (more: 400 too_many_inputs); each may cost a remote moderator call.
    max_inputs: int = Field(default=32, ge=1, le=2048)
    # Inputs of one POST /v1/moderations judged at once (guard calls also wait for a slot of the guard model).
    endpoint_concurrency: int = Field(default=4, ge=1, le=256)

    @model_validator(mode="after")
    def _window_holds_its_context(self) -> ModerationConfig:
        if self.stream_context_chars >= self.stream_window_chars:
            raise ValueError("stream_context_chars must be smaller than stream_window_chars")
        return self


class TracingConfig(_Section):
    """OpenTelemetry traces (obs/tracing.py): a span per request and per stage. Off by default, and free then."""

    # Trace requests (needs the tracing extra: pip install 'portcullis[tracing]').
    enabled: bool = False
    # otlp: OTLP over HTTP/protobuf to `endpoint` (batched, from a background thread); console: stdout.
    exporter: Literal["otlp", "console"] = "otlp"
    # The collector's traces URL (an OpenTelemetry Collector, Jaeger, Tempo, ...).
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    # Sent with every export (e.g. a collector's auth header).
    headers: dict[str, str] = {}
    # The service.name resource attribute.
    service_name: str = "portcullis"
    # Share of requests traced (a client's sampled traceparent is always followed).
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class SsoConfig(_Section):
    """Single sign-on to the console (/dashboard) over OpenID Connect: the authorization code flow with PKCE, with
    any standard provider named by its issuer URL. The user's role comes from a claim (api/console.py)."""

    # The provider's issuer URL; its endpoints are read from <issuer>/.well-known/openid-configuration.
    issuer: str = Field(min_length=1)
    # This gateway's client id at the provider.
    client_id: str = Field(min_length=1)
    # The environment variable holding the client secret (the gateway is a confidential client).
    client_secret_env: str = "PORTCULLIS_SSO_CLIENT_SECRET"
    # Where the provider sends the browser back, as registered there: <this gateway's URL>/dashboard/sso/callback.
    redirect_uri: str = Field(min_length=1)
    # The scopes asked for (openid is always asked).
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email"])
    # The claim that is the user's name at the gateway.
    user_claim: str = "email"
    # The claim holding the user's role: admin (every scope), org_admin, team_admin, member or viewer.
    role_claim: str = "portcullis_role"
    # The claim naming where that role applies: an organisation's name (org_admin), or "<organisation>/<team>".
    team_claim: str = "portcullis_team"


class DashboardConfig(_Section):
    """The operator dashboard (/dashboard): sign-in sessions kept server-side (Redis when configured)."""

    # How long a dashboard sign-in lasts; signing out ends it at once, in every process.
    session_ttl_s: float = Field(default=28_800.0, ge=1, le=604_800)
    # Single sign-on over OpenID Connect (None: only admin keys sign in).
    sso: SsoConfig | None = None


class Config(_Section):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    tiers: dict[str, TierConfig] = Field(default_factory=_default_tiers, min_length=1)
    validation: ValidationLimits = ValidationLimits()
    upstream: UpstreamConfig = UpstreamConfig()
    health: HealthConfig = HealthConfig()
    quota: QuotaConfig = QuotaConfig()
    admission: AdmissionConfig = AdmissionConfig()
    resilience: ResilienceConfig = ResilienceConfig()
    cache: CacheConfig = CacheConfig()
    embedding_batching: EmbeddingBatchingConfig = EmbeddingBatchingConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)
    # Machines that hold fewer models at once than they serve (router-mode llama-servers, launched servers).
    hosts: dict[str, HostConfig] = {}
    # Logical models that choose one of their candidates per request (e.g. `auto`).
    routers: dict[str, RouterConfig] = {}
    routing: RoutingConfig = RoutingConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    batch: BatchConfig = BatchConfig()
    responses: ResponsesConfig = ResponsesConfig()
    moderation: ModerationConfig = ModerationConfig()
    tracing: TracingConfig = TracingConfig()
    dashboard: DashboardConfig = DashboardConfig()

    @model_validator(mode="after")
    def _moderation_references(self) -> Config:
        m = self.moderation
        for name, spec in m.moderators.items():
            if isinstance(spec, GuardModelConfig) and spec.model not in self.models:
                raise ValueError(f"moderation.moderators.{name}.model: '{spec.model}' is not a configured model")
        lists: list[tuple[str, list[str] | None]] = [
            ("moderation.input", m.input),
            ("moderation.output", m.output),
            ("moderation.endpoint", m.endpoint),
        ]
        for section, owners in (("models", self.models), ("tiers", self.tiers)):
            for owner, conf in owners.items():
                if conf.moderation is not None:
                    lists.append((f"{section}.{owner}.moderation.input", conf.moderation.input))
                    lists.append((f"{section}.{owner}.moderation.output", conf.moderation.output))
        for where, names in lists:
            for name in names or ():
                if name not in m.moderators:
                    raise ValueError(f"{where}: '{name}' is not in moderation.moderators")
        return self

    @model_validator(mode="after")
    def _host_references(self) -> Config:
        on_host: dict[str, set[str]] = {name: set() for name in self.hosts}
        upstreams: dict[str, set[str]] = {}  # a router's model names taken (two seats for one model: unloaded twice)
        for model, conf in self.models.items():
            for i, dep in enumerate(conf.deployments):
                where = f"models.{model}.deployments.{i}"
                if dep.warm_restart is not None and (dep.host is not None or dep.kind != "llama_cpp"):
                    raise ValueError(f"{where}.warm_restart: only a llama-server deployment of its own (not on a host)")
                if dep.host is None:
                    if dep.command is not None:
                        raise ValueError(f"{where}.command: only a deployment on a launch host has a command")
                    continue
                host = self.hosts.get(dep.host)
                if host is None:
                    raise ValueError(f"{where}.host: '{dep.host}' is not in hosts")
                if dep.kind != "llama_cpp":
                    raise ValueError(f"{where}.kind: a host's models are llama-servers (llama_cpp)")
                if host.kind == "launch" and dep.command is None:
                    raise ValueError(f"{where}.command: a launch host starts each model with its command")
                if host.kind == "router" and dep.command is not None:
                    raise ValueError(f"{where}.command: a router host loads its models itself (no command)")
                if model in on_host[dep.host]:
                    raise ValueError(f"{where}.host: model '{model}' is on host '{dep.host}' twice")
                upstream = dep.upstream_model or model
                taken = upstreams.setdefault(dep.host, set())
                if host.kind == "router" and upstream in taken:
                    raise ValueError(
                        f"{where}.upstream_model: '{upstream}' is already a model of host '{dep.host}' (use aliases)"
                    )
                taken.add(upstream)
                on_host[dep.host].add(model)
        for name, host in self.hosts.items():
            for j, group in enumerate(host.exclusive):
                unknown = sorted(set(group) - on_host[name])
                if unknown:
                    raise ValueError(f"hosts.{name}.exclusive.{j}: {', '.join(unknown)} not deployed on this host")
        return self

    @model_validator(mode="after")
    def _jwt_default_tier(self) -> Config:
        if self.auth.jwt.enabled and self.auth.jwt.default_tier not in self.tiers:
            raise ValueError(f"auth.jwt.default_tier '{self.auth.jwt.default_tier}' is not a configured tier")
        for tier in self.auth.jwt.allowed_tiers or ():
            if self.auth.jwt.enabled and tier not in self.tiers:
                raise ValueError(f"auth.jwt.allowed_tiers: '{tier}' is not a configured tier")
        if self.quota.backend == "redis" and not self.store.redis_url:
            raise ValueError("quota.backend is 'redis' but store.redis_url is not set")
        if self.cache.backend == "redis" and not self.store.redis_url:
            raise ValueError("cache.backend is 'redis' but store.redis_url is not set")
        semantic = self.cache.semantic
        if semantic.enabled and semantic.model not in self.models:
            raise ValueError(f"cache.semantic.model: {semantic.model!r} is not a configured model")
        return self

    @model_validator(mode="after")
    def _model_references(self) -> Config:
        for name, model in self.models.items():
            for fallback in model.fallbacks:
                if fallback == name or fallback not in self.models:
                    raise ValueError(f"models.{name}.fallbacks: '{fallback}' is not another configured model")
            for where, degrade in (
                ("admission.degrade", self.admission.degrade),
                (f"models.{name}.degrade", model.degrade),
            ):
                if degrade is None:
                    continue
                if degrade.model is not None and degrade.model not in self.models:
                    raise ValueError(f"{where}.model: '{degrade.model}' is not a configured model")
                unknown = set(degrade.tiers or ()) - set(self.tiers)
                if unknown:
                    raise ValueError(f"{where}.tiers: {sorted(unknown)} are not configured tiers")
        return self

    @model_validator(mode="after")
    def _names(self) -> Config:
        """Models, routers and aliases share one namespace: every name a client may send means one thing."""
        owner: dict[str, str] = {name: f"models.{name}" for name in self.models}
        for name, model in self.models.items():
            if model.spill_to_fallbacks and not model.fallbacks:
                raise ValueError(f"models.{name}.spill_to_fallbacks: the model has no fallbacks to spill to")
        for name, router in self.routers.items():
            where = f"routers.{name}"
            _check_name(name, where)
            if name in owner:
                raise ValueError(f"{where}: the name is already {owner[name]}")
            owner[name] = where
            for candidate in router.candidates:
                if candidate not in self.models:
                    raise ValueError(f"{where}.candidates: '{candidate}' is not a configured model")
            if len(set(router.candidates)) != len(router.candidates):
                raise ValueError(f"{where}.candidates: a model is listed twice")
            if router.default_quality is not None and len(router.default_quality) != len(router.candidates):
                raise ValueError(f"{where}.default_quality: give one value per candidate")
            if router.scorer != "heuristic" and ":" not in router.scorer:
                raise ValueError(f"{where}.scorer: 'heuristic' or 'package.module:function'")
        aliases = [(f"models.{n}.aliases", a) for n, m in self.models.items() for a in m.aliases]
        aliases += [(f"routers.{n}.aliases", a) for n, r in self.routers.items() for a in r.aliases]
        for where, alias in aliases:
            _check_name(alias, where)
            if alias in owner:
                raise ValueError(f"{where}: '{alias}' is already {owner[alias]}")
            owner[alias] = where
        return self

    def degrade_for(self, model: str) -> DegradeConfig:
        return self.models[model].degrade or self.admission.degrade

    def timeouts_for(self, model: str) -> UpstreamTimeouts:
        return self.models[model].timeouts.over(self.upstream.timeouts)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in value:
            if not name or len(name) > 256 or any(c.isspace() for c in name):
                raise ValueError(f"model name {name!r} must be 1-256 characters without spaces")
        return value


def _check_name(name: str, where: str) -> None:
    if not name or len(name) > 256 or any(c.isspace() for c in name):
        raise ValueError(f"{where}: name {name!r} must be 1-256 characters without spaces")


class ConfigError(Exception):
    """A config that cannot be used. `problems` is a list of (field path, reason)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: invalid configuration ({len(self.problems)} error(s))"]
        lines += [f"  {self.source}: {path or '(root)'}: {reason}" for path, reason in self.problems]
        return "\n".join(lines)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        out.append((_field_path(err["loc"]), reason))
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn PORTCULLIS_A__B=v into {"a": {"b": v}}."""
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in _ENV_NOT_OVERRIDES or "__" not in key:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(data: Any, *, source: str, environ: Mapping[str, str] | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the file must hold a mapping at the top level")])
    overrides = env_overrides(os.environ if environ is None else environ)
    if overrides:
        data = _merge(data, overrides)
        source = f"{source} (+ {ENV_PREFIX}* environment)"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from exc


def load_config(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Config:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read the file: {exc.strerror}")]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from exc
    return build_config(data, source=source, environ=environ)


_DEMO_COST = {"prompt_per_1k": 0.0001, "completion_per_1k": 0.0002}
_DEMO_LARGE_COST = {"prompt_per_1k": 0.001, "completion_per_1k": 0.002}


def demo_config(sim_url: str, database_url: str) -> Config:
    """Embedded defaults for `serve --demo`: chat and embedding models on the simulator, a router, and input
    moderation (PII rules, the simulator as guard model)."""
    return build_config(
        {
            "server": {"drain_grace_s": 0.5, "shutdown_timeout_s": 10},
            "store": {"database_url": database_url, "auto_migrate": True},
            "models": {
                "demo": {"deployments": [{"url": sim_url, "name": "sim", "cost": _DEMO_COST}], "quality": 0.4},
                "demo-large": {"deployments": [{"url": sim_url, "name": "sim", "cost": _DEMO_LARGE_COST}]},
                "demo-embed": {"deployments": [{"url": sim_url, "name": "sim"}]},
                # The simulator also plays a Llama Guard model (it flags "build a bomb", "hurt someone").
                "demo-guard": {"deployments": [{"url": sim_url, "name": "sim"}]},
            },
            # `auto` picks demo for simple requests and demo-large for demanding ones (x-portcullis-route).
            "routers": {"auto": {"candidates": ["demo", "demo-large"]}},
            "moderation": {
                "moderators": {
                    "pii": {"kind": "rules", "pii": {"email": "redact", "card": "block", "iban": "redact"}},
                    "guard": {"kind": "guard_model", "model": "demo-guard"},
                },
                "input": ["pii", "guard"],
            },
        },
        source="(demo defaults)",
    )
