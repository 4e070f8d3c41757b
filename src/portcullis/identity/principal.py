"""Who is calling: the result of authentication, read by every later stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
