"""JWT bearer tokens (PyJWT): HS* with a secret, RS*/PS*/ES* with a PEM public key or a JWKS file.

The algorithm is decided by the configuration, never by the token: a token whose `alg` is not in
`auth.jwt.algorithms` is refused (this covers `none`), and the key is picked by the algorithm's family,
so an HS256 token "signed" with our RSA public key meets the HMAC secret, not the public key, and fails.
With a JWKS file the key is chosen by `kid`; an unknown `kid`, or one naming a key of another family than
the token's `alg` (a JWKS may mix RSA, EC and symmetric keys), is refused. `exp` and `sub` are required;
`nbf`/`iat`/`exp` are checked with leeway; `iss`/`aud` when configured. A `sub` that could not be stored as
the user (over 252 characters with the `jwt:` prefix, or holding control characters) is refused too.

Every claim we read is type-checked: a signed token is still input, and a claim of the wrong type (`tier: []`,
`scope: 5`, `models: "x"`) is refused as invalid rather than crashing the stage (a 500 that the failed-auth
throttle never counted) or being read loosely (a `models` claim that is not a list used to mean every model).
What a token may claim is capped by the configuration: scopes beyond `allowed_scopes` are dropped (as names
that are not Portcullis scopes are), a tier outside `allowed_tiers` is refused.

The principal's user is `jwt:<sub>` (or the user `auth.jwt.users` maps the subject to): API-key users live in
a namespace of their own, and no key user may be called `jwt:...` (identity/keys.py), so a token whose `sub`
is an API-key user's name reaches none of that user's files, batches, cache entries or budgets.
"""

from __future__ import annotations

import os
from typing import Any

import jwt as pyjwt
import orjson

from portcullis.config import JwtConfig
from portcullis.identity.principal import JWT_USER_PREFIX, USER_MAX_CHARS, Principal, unstorable


class JwtSetupError(Exception):
    """The configuration names no usable key material."""


class InvalidToken(Exception):
    pass


# The JWK key type each family of algorithms verifies with. HS* never reads the JWKS (the configured secret).
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC"}


class JwtVerifier:
    def __init__(self, config: JwtConfig, tiers: set[str]) -> None:
        self.config = config
        self.tiers = tiers
        self.secret: bytes | None = None
        self.public_key: Any = None
        self.jwks: dict[str, pyjwt.PyJWK] = {}
        self.allowed_scopes = frozenset(config.allowed_scopes)
        self.allowed_tiers = set(config.allowed_tiers) if config.allowed_tiers is not None else tiers
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
                self.jwks[jwk.key_id] = jwk
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
            jwk = self.jwks.get(kid) if isinstance(kid, str) else None
            if jwk is None:
                raise InvalidToken("unknown signing key (kid)")
            # PyJWT given a key of the wrong family raises TypeError, not one of its own errors.
            if jwk.key_type != _KEY_TYPE.get(alg[:2]):
                raise InvalidToken(f"the signing key (kid) is not a key for {alg}")
            return jwk.key
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
        except (TypeError, ValueError, AttributeError) as exc:
            # Key material PyJWT cannot use with this token (it raises these, not its own errors): still the
            # token's fault as far as the client is concerned, and a failed authentication.
            raise InvalidToken("the token cannot be verified with the configured key") from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("the token has no subject")
        user = cfg.users.get(sub)
        if user is None:
            # `jwt:<sub>` is stored as the user (identity/principal.py): one that cannot be stored is refused
            # here, counted as a failed authentication, rather than failing every later write that names it.
            # (A mapped subject's user is the configuration's, checked when it is loaded.)
            problem = unstorable(sub, USER_MAX_CHARS - len(JWT_USER_PREFIX))
            if problem is not None:
                raise InvalidToken(f"the subject (sub) cannot be a user: {problem}")
            user = JWT_USER_PREFIX + sub
        tier = claims.get(cfg.tier_claim, cfg.default_tier)
        if not isinstance(tier, str):
            raise InvalidToken(f"the claim {cfg.tier_claim!r} must be a string")
        if tier not in self.tiers:
            raise InvalidToken("the token names an unknown tier")
        if tier not in self.allowed_tiers:
            raise InvalidToken(f"the tier {tier!r} may not be claimed by a token")
        scope_claim = next((c for c in ("scope", "scp", "permissions") if c in claims), None)
        raw_scopes = claims[scope_claim] if scope_claim is not None else ""
        if isinstance(raw_scopes, str):
            raw_scopes = raw_scopes.split()
        elif not _strings(raw_scopes):
            raise InvalidToken(f"the claim {scope_claim!r} must be a string or a list of strings")
        granted = frozenset(s for s in raw_scopes if s in self.allowed_scopes)
        models: frozenset[str] | None = None
        if cfg.models_claim in claims:
            listed = claims[cfg.models_claim]
            # Strictly a list: anything else read as "absent" would grant every model.
            if not _strings(listed):
                raise InvalidToken(f"the claim {cfg.models_claim!r} must be a list of strings")
            models = frozenset(listed)
        claimed: tuple[str, ...] = ()
        if cfg.team_claim is not None and cfg.team_claim in claims:
            value = claims[cfg.team_claim]
            if isinstance(value, str):
                claimed = (value,)
            elif _strings(value):
                claimed = tuple(value[:_MAX_TEAMS_CLAIMED])
            else:
                raise InvalidToken(f"the claim {cfg.team_claim!r} must be a string or a list of strings")
        if cfg.team_required and not claimed:
            raise InvalidToken(f"the token has no {cfg.team_claim!r} claim naming its team")
        return Principal(
            user=user,
            tier=tier,
            scopes=granted,
            via="jwt",
            models=models,
            claimed_teams=claimed,
        )


_MAX_TEAMS_CLAIMED = 32  # (an identity provider's groups claim can be long: only the first ones are looked up)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


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
