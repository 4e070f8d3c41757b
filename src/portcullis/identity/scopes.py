"""Scopes: what a principal may do. Every route declares exactly one (or is public)."""

from __future__ import annotations

CHAT = "chat:write"
COMPLETIONS = "completions:write"
EMBEDDINGS = "embeddings:write"
MODERATIONS = "moderations:write"
RESPONSES = "responses:write"  # the Responses API (create, read and delete one's stored responses)
MESSAGES = "messages:write"  # Anthropic's Messages API
TOKENS = "tokens:read"  # counting, tokenizing and templating (no generation)
RERANK = "rerank:write"
MODELS_READ = "models:read"
MODELS_WRITE = "models:write"
MODELS_DELETE = "models:delete"
BATCHES = "batches:write"
USAGE = "usage:read"
KEYS_ADMIN = "keys:admin"
ORGS_ADMIN = "orgs:admin"  # organisations, teams and their members (reading them: admin:read)
ROLES = "roles:act"  # do what the user's roles in organisations and teams allow (identity/roles.py)
ADMIN_READ = "admin:read"

ALL = frozenset(
    {
        CHAT,
        COMPLETIONS,
        EMBEDDINGS,
        MODERATIONS,
        RESPONSES,
        MESSAGES,
        TOKENS,
        RERANK,
        MODELS_READ,
        MODELS_WRITE,
        MODELS_DELETE,
        BATCHES,
        USAGE,
        KEYS_ADMIN,
        ORGS_ADMIN,
        ROLES,
        ADMIN_READ,
    }
)
# What a new key gets when its creator names no scopes: inference (batch jobs included), nothing administrative.
DEFAULT = (CHAT, COMPLETIONS, EMBEDDINGS, MODERATIONS, RESPONSES, MESSAGES, TOKENS, RERANK, MODELS_READ, BATCHES)

PUBLIC = ""  # routes anyone may call: /healthz, /readyz


def parse(value: str | list[str] | tuple[str, ...] | None, *, default: tuple[str, ...] = DEFAULT) -> tuple[str, ...]:
    """Comma/space separated or a list → validated, de-duplicated, sorted scopes."""
    if value is None:
        return default
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    unknown = sorted(set(items) - ALL)
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(sorted(ALL))}")
    return tuple(sorted(set(items)))
