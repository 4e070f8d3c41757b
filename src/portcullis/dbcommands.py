"""Running the operator commands whose arguments commands.py defines (db, keys, usage, orgs, teams, audit, token):
imported only when one of them runs."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from portcullis.config import BudgetConfig, Config, ConfigError, LimitsConfig, load_config
from portcullis.errors import GatewayError, InvalidRequest
from portcullis.identity import scopes
from portcullis.identity.keys import KeyHasher, KeyRecord, KeySecretMissing, KeyStore, key_secret, now
from portcullis.identity.principal import DEFAULT_TEAM
from portcullis.identity.tenancy import TenancyStore
from portcullis.obs.logging import configure_command_logging
from portcullis.store import audit
from portcullis.store.bus import EventBus
from portcullis.store.db import current_revision, head_revision, make_engine, pending, upgrade


def run(args: argparse.Namespace) -> int:
    import asyncio

    if not args.config:
        print(f"portcullis {args.command}: give --config FILE (or set PORTCULLIS_CONFIG)", file=sys.stderr)
        return 2
    configure_command_logging()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    try:
        if args.command == "token":
            return _mint(config, args)
        return asyncio.run(_db_or_keys(config, args))
    except OperatorError as exc:
        print(f"portcullis {args.command}: {exc}", file=sys.stderr)
        return 1


class OperatorError(Exception):
    pass


async def _db_or_keys(config: Config, args: argparse.Namespace) -> int:
    engine = make_engine(config.store.database_url)
    try:
        if args.command == "db":
            if args.db_command == "upgrade":
                await upgrade(engine)
            print(f"schema revision {await current_revision(engine)} (code expects {head_revision()})")
            return 0
        if await pending(engine):
            raise OperatorError("the database schema is not up to date: run `portcullis db upgrade` first")
        if args.command == "usage":
            return await _usage(config, engine, args)
        if args.command == "audit":
            return await _audit(engine, args)
        if args.command in ("orgs", "teams"):
            return await _levels(config, engine, args)
        try:
            store = KeyStore(engine, KeyHasher(key_secret(config)))
        except KeySecretMissing as exc:
            raise OperatorError(str(exc)) from exc
        return await _keys(config, store, args)
    finally:
        await engine.dispose()


async def _keys(config: Config, store: KeyStore, args: argparse.Namespace) -> int:
    cmd = args.keys_command
    if cmd == "create":
        try:
            granted = scopes.parse(args.scopes)
        except ValueError as exc:
            raise OperatorError(str(exc)) from exc
        team = args.team or DEFAULT_TEAM
        tenancy = TenancyStore(store.engine)
        found = await tenancy.team(team)
        if found is None:
            raise OperatorError(f"no team {team}")
        org = await tenancy.org(found.org_id or "")
        tier = args.tier or found.default_tier or (org.default_tier if org is not None else None)
        if tier is None:
            raise OperatorError("give --tier: the key's team and organisation have no default tier")
        limits = _json_spec("--limits", args.limits, LimitsConfig, exclude_unset=True)
        budget = _json_spec("--budget", args.budget, BudgetConfig, exclude_none=True)
        try:
            if tier not in config.tiers:
                raise OperatorError(f"unknown tier {tier!r}; configured: {', '.join(config.tiers)}")
            key, created = await store.create(
                user=args.user,
                tier=tier,
                team=team,
                scopes=granted,
                models=tuple(m for m in args.models.split(",") if m) if args.models else None,
                expires_at=now() + args.expires if args.expires else None,
                label=args.label,
                limits=limits,
                budget=budget,
                actor=audit.cli_actor(),
            )
        except InvalidRequest as exc:  # a user or label the store refuses: the operator's message, not a trace
            raise OperatorError(exc.message) from exc
        _print(
            {**created.public(), "key": key},
            args.json,
            headline=f"Created key {created.id}. The key, shown once:\n{key}",
        )
        return 0
    if cmd == "list":
        records = await store.list(user=args.user, team=args.team)
        if args.json:
            print(orjson.dumps([r.public() for r in records]).decode())
        else:
            for r in records:
                p = r.public()
                scope_list = ",".join(r.scopes)
                print(
                    f"{r.id}  {p['status']:8s}  user={r.user} team={r.team_id} tier={r.tier} scopes={scope_list} "
                    f"label={r.label or ''}"
                )
        return 0
    record: KeyRecord | None
    if cmd == "show":
        record = await store.get(args.id)
        if record is None:
            raise OperatorError(f"no key {args.id}")
        _print(record.public(), args.json)
        return 0
    if cmd == "revoke":
        record = await store.revoke(args.id, actor=audit.cli_actor())
        if record is None:
            raise OperatorError(f"no key {args.id}")
        await _announce(config, {"type": "key", "id": args.id})
        _print(record.public(), args.json, headline=f"Revoked key {args.id}.")
        return 0
    if cmd == "rotate":
        grace = args.grace.total_seconds() if args.grace is not None else config.auth.rotation_grace_s
        rotated = await store.rotate(args.id, grace_s=grace, actor=audit.cli_actor())
        if rotated is None:
            raise OperatorError(f"no active key {args.id}")
        key, successor, old = rotated
        await _announce(config, {"type": "key", "id": args.id})
        _print(
            {**successor.public(), "key": key, "replaces": old.public()},
            args.json,
            headline=f"Key {old.id} works until {old.grace_until.isoformat() if old.grace_until else '-'}; "
            f"its successor {successor.id}, shown once:\n{key}",
        )
        return 0
    raise OperatorError(f"unknown command {cmd}")


def _json_spec(
    flag: str, text: str | None, model: type[BaseModel], *, exclude_unset: bool = False, exclude_none: bool = False
) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        return model.model_validate_json(text).model_dump(
            mode="json", exclude_unset=exclude_unset, exclude_none=exclude_none
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "(value)"
        raise OperatorError(f"{flag}: {where}: {err['msg']}") from exc


async def _usage(config: Config, engine: Any, args: argparse.Namespace) -> int:
    from portcullis.quota import usage

    try:
        group_by = usage.parse_group_by(args.by)
    except ValueError as exc:
        raise OperatorError(str(exc)) from exc
    rows = await usage.aggregate(
        engine,
        group_by=group_by,
        since=args.since,
        until=args.until,
        user=args.user,
        key_id=args.key,
        model=args.model,
    )
    if args.json:
        print(orjson.dumps({"group_by": group_by, "currency": config.quota.currency, "data": rows}).decode())
    else:
        print(usage.render_table(rows, group_by, config.quota.currency), end="")
    return 0


async def _levels(config: Config, engine: Any, args: argparse.Namespace) -> int:
    """`portcullis orgs ...` and `portcullis teams ...` (identity/tenancy.py)."""
    store, kind, cmd = TenancyStore(engine), args.command, args.level_command
    actor = audit.cli_actor()
    try:
        if cmd == "create":
            tier = args.default_tier
            if tier is not None and tier not in config.tiers:
                raise OperatorError(f"unknown tier {tier!r}; configured: {', '.join(config.tiers)}")
            models = [m for m in args.models.split(",") if m] if args.models is not None else None
            if kind == "orgs":
                level = await store.create_org(args.name, models=models, default_tier=tier, actor=actor)
            else:
                level = await store.create_team(args.org, args.name, models=models, default_tier=tier, actor=actor)
            _print(level.public(), args.json, headline=f"Created {level.kind} {level.id} ({level.name}).")
            return 0
        if cmd == "list":
            levels = await (store.orgs() if kind == "orgs" else store.teams(args.org))
            if args.json:
                print(orjson.dumps([level.public() for level in levels]).decode())
            for level in levels if not args.json else ():
                grant = ",".join(level.models) if level.models is not None else "*"
                where = f" org={level.org_id}" if level.org_id else ""
                print(f"{level.id}  {level.name}{where} models={grant} default_tier={level.default_tier or '-'}")
            return 0
        team = await store.team(args.id) if kind == "teams" else None
        org = await store.org(args.id) if kind == "orgs" else None
        if team is None and org is None:
            raise OperatorError(f"no {'organisation' if kind == 'orgs' else 'team'} {args.id}")
        org_id = team.org_id if team is not None and team.org_id else args.id
        if cmd == "member":
            member = await store.set_member(team, org_id, args.user, args.role, actor=actor)
            _print(member, args.json, headline=f"{args.user} is {args.role} of {args.id}.")
            return 0
        if not await store.remove_member(org_id, team.id if team is not None else "", args.user, actor=actor):
            raise OperatorError(f"{args.user} has no role in {args.id}")
        print(f"{args.user} has no role in {args.id} now.")
        return 0
    except GatewayError as exc:  # a name taken, a bad role: the operator's message, not a trace
        raise OperatorError(exc.message) from exc


async def _audit(engine: Any, args: argparse.Namespace) -> int:
    try:
        since = audit.parse_instant(args.since) if args.since else None
        until = audit.parse_instant(args.until) if args.until else None
    except ValueError as exc:
        raise OperatorError("--since and --until: an ISO 8601 date or time, or POSIX seconds") from exc
    if not 1 <= args.limit <= audit.MAX_PAGE:
        raise OperatorError(f"--limit must be from 1 to {audit.MAX_PAGE}")
    entries, more = await audit.read(
        engine, limit=args.limit, since=since, until=until, action=args.action, target=args.target, actor=args.actor
    )
    if args.json:
        print(orjson.dumps({"data": entries, "has_more": more}).decode())
        return 0
    for e in entries:
        when = datetime.fromtimestamp(e["at"], UTC).isoformat(timespec="seconds")
        who = e["actor"]
        by = f"by {who['user']} ({who['via']}) from {who['source'] or '-'}"
        print(f"{e['id']:>6}  {when}  {e['action']:<16} {e['target']:<20} {by}")
    if more:
        print(f"(more: --limit {min(args.limit * 2, audit.MAX_PAGE)}, or narrow with --since/--action/--target)")
    return 0


async def _announce(config: Config, event: dict[str, Any]) -> None:
    if config.store.redis_url:
        bus = EventBus(config.store.redis_url, timeout_s=config.store.redis_timeout_s)
        try:
            if not await bus.publish(event):
                print(
                    "note: Redis did not take the event. The change is saved: gateways that lost Redis too read it "
                    "within 1 s; others within their key cache's TTL (30 s).",
                    file=sys.stderr,
                )
        finally:
            await bus.close()


def _print(value: dict[str, Any], as_json: bool, headline: str | None = None) -> None:
    if as_json:
        print(orjson.dumps(value).decode())
        return
    if headline:
        print(headline)
    for k, v in value.items():
        if k not in ("key", "replaces"):
            print(f"  {k}: {v}")


def _mint(config: Config, args: argparse.Namespace) -> int:
    from portcullis.identity.jwt import JwtSetupError, JwtVerifier, mint

    jwt_config = config.auth.jwt
    try:
        verifier = JwtVerifier(jwt_config.model_copy(update={"algorithms": ["HS256"]}), set(config.tiers))
    except (JwtSetupError, OSError) as exc:
        raise OperatorError(f"auth.jwt: {exc}") from exc
    assert verifier.secret is not None
    try:
        granted = list(scopes.parse(args.scopes))
    except ValueError as exc:
        raise OperatorError(str(exc)) from exc
    print(
        mint(
            verifier.secret,
            sub=args.sub,
            tier=args.tier or jwt_config.default_tier,
            scopes=granted,
            ttl_s=args.ttl.total_seconds(),
            issuer=jwt_config.issuer,
            audience=jwt_config.audience,
        )
    )
    return 0
