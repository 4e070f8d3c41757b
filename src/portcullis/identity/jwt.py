"""JWT bearer tokens (PyJWT): HS* with a secret, RS*/PS*/ES* with a PEM public key or a JWKS file.

The algorithm is decided by the configuration, never by the token: a token whose `alg` is not in
`auth.jwt.algorithms` is refused (this covers `none`), and the key is picked by the algorithm's family,
so an HS256 token "signed" with our RSA public key meets the HMAC secret, not the public key, and fails.
With a JWKS file the key is chosen by `kid`; an unknown `kid` is refused. `exp` and `sub` are required;
`nbf`/`iat`/`exp` are checked with leeway; `iss`/`aud` when configured.
"""

from __future__ import annotations

import os
from typing import Any

import jwt as pyjwt
import orjson

from portcullis.config import JwtConfig
from portcullis.identity import scopes as scope_names
from portcullis.identity.principal import Principal


class JwtSetupError(Exception):
    """The configuration names no usable key material."""


class InvalidToken(Exception):
    pass


class JwtVerifier:
    def __init__(self, config: JwtConfig, tiers: set[str]) -> None:
        self.config = config
        self.tiers = tiers
        self.secret: bytes | None = None
        self.public_key: Any = None
        self.jwks: dict[str, Any] = {}
        if config.secret_file:
            self.secret = config.secret_file.read_bytes().strip()
        elif config.secret_env and os.environ.get(config.secret_env):
            self.secret = os.environ[config.secret_env].encode()
        if config.public_key_file:
            self.public_key = config.public_key_file.read_bytes()
        if config.jwks_file:
            for jwk in pyjwt.PyJWKSet.from_dict(orjson.loads(config.jwks_file.read_bytes())).keys:
                if not jwk.key_id:
                    raise JwtSetupError(f"{config.jwks_file}: every key in the JWKS needs a 'kid'")
                self.jwks[jwk.key_id] = jwk.key
        wants_secret = any(a.startswith("HS") for a in config.algorithms)
        wants_public = any(not a.startswith("HS") for a in config.algorithms)
        if wants_secret and not self.secret:
            raise JwtSetupError(
                f"auth.jwt allows {[a for a in config.algorithms if a.startswith('HS')]} but no secret is set "
                f"(environment variable {config.secret_env} or auth.jwt.secret_file)"
            )
        if wants_secret and self.secret is not None and len(self.secret) < 32:
            raise JwtSetupError("the JWT secret must be at least 32 bytes")
        if wants_public and self.public_key is None and not self.jwks:
            raise JwtSetupError("auth.jwt allows public-key algorithms but sets neither public_key_file nor jwks_file")

    def _key_for(self, alg: str, kid: str | None) -> Any:
        if alg.startswith("HS"):
            return self.secret
        if self.jwks:
            if kid is None or kid not in self.jwks:
                raise InvalidToken("unknown signing key (kid)")
            return self.jwks[kid]
        return self.public_key

    def verify(self, token: str) -> Principal:
        cfg = self.config
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError as exc:
            raise InvalidToken("malformed token") from exc
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            raise InvalidToken(f"algorithm {alg!r} is not accepted")
        key = self._key_for(alg, header.get("kid"))
        try:
            claims = pyjwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": cfg.audience is not None},
            )
        except pyjwt.ExpiredSignatureError as exc:
            raise InvalidToken("the token has expired") from exc
        except pyjwt.PyJWTError as exc:
            raise InvalidToken(f"the token is not valid: {exc}") from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("the token has no subject")
        tier = claims.get(cfg.tier_claim, cfg.default_tier)
        if tier not in self.tiers:
            raise InvalidToken("the token names an unknown tier")
        raw_scopes = claims.get("scope", claims.get("scp", claims.get("permissions", "")))
        if isinstance(raw_scopes, str):
            raw_scopes = raw_scopes.split()
        granted = frozenset(s for s in raw_scopes if isinstance(s, str) and s in scope_names.ALL)
        models = claims.get(cfg.models_claim)
        return Principal(
            user=sub,
            tier=tier,
            scopes=granted,
            via="jwt",
            models=frozenset(m for m in models if isinstance(m, str)) if isinstance(models, list) else None,
        )


def mint(
    secret: bytes,
    *,
    sub: str,
    tier: str,
    scopes: list[str],
    ttl_s: float,
    issuer: str | None,
    audience: str | None,
    algorithm: str = "HS256",
) -> str:
    import time

    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "tier": tier,
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl_s),
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return pyjwt.encode(claims, secret, algorithm=algorithm)
