"""Who is calling: the result of authentication, read by every later stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# One namespace per identity source: the user of a JWT is "jwt:<sub>" (unless auth.jwt.users maps the subject),
# and an API key's user may not start with this, so a token's subject never names a key user's data.
JWT_USER_PREFIX = "jwt:"


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    tier: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None  # None: every model
    key_id: str | None = None  # for API keys; None for JWT and anonymous
    via: str = "api_key"  # "api_key" | "jwt" | "anonymous"
    limits: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
