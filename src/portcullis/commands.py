"""Operator commands that work on the database directly: db upgrade, keys ..., usage, orgs, teams, audit, token
mint. This module holds their arguments only, so that `portcullis --help` loads no database code; dbcommands.py
runs them.

Each takes the same config file as `serve` (--config or PORTCULLIS_CONFIG). Key commands publish their
change on the Redis bus when one is configured, so running gateways see a revocation at once.
"""

from __future__ import annotations

import argparse
import os
import re
from datetime import timedelta
from typing import Any

from portcullis.identity import scopes

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 12h or 30d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])


def add_parsers(sub: Any) -> None:
    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=os.environ.get("PORTCULLIS_CONFIG"), help="YAML config file")
        return p

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    with_config(db_sub.add_parser("upgrade", help="apply pending migrations"))
    with_config(db_sub.add_parser("status", help="show the schema revision"))

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = with_config(keys_sub.add_parser("create", help="create a key (printed once)"))
    create.add_argument("--user", required=True)
    create.add_argument("--tier", default=None, help="default: its team's default tier, else its organisation's")
    create.add_argument("--team", default=None, help="team id (default: the default organisation's default team)")
    create.add_argument("--scopes", default=None, help=f"comma-separated (default: {','.join(scopes.DEFAULT)})")
    create.add_argument("--models", default=None, help="comma-separated allow-list (default: every model)")
    create.add_argument("--expires", type=duration, default=None, help="e.g. 30d")
    create.add_argument("--label", default=None)
    create.add_argument("--limits", default=None, help='JSON overrides of the tier, e.g. {"requests": {"minute": 10}}')
    create.add_argument("--budget", default=None, help='JSON, e.g. {"day": 5, "month": 100} (quota.currency)')
    create.add_argument("--json", action="store_true")
    listing = with_config(keys_sub.add_parser("list", help="list keys"))
    listing.add_argument("--user", default=None)
    listing.add_argument("--team", default=None, help="team id")
    listing.add_argument("--json", action="store_true")
    for name, text in (("show", "show a key"), ("revoke", "revoke a key now")):
        p = with_config(keys_sub.add_parser(name, help=text))
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
    rotate = with_config(keys_sub.add_parser("rotate", help="issue a successor; the old key works for a grace"))
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=duration, default=None, help="default: auth.rotation_grace_s")
    rotate.add_argument("--json", action="store_true")

    report = with_config(sub.add_parser("usage", help="usage and cost, aggregated"))
    report.add_argument("--by", default="day,user,model", help="any of key,team,user,model,day (comma-separated)")
    report.add_argument("--since", default=None, help="first UTC day, YYYY-MM-DD")
    report.add_argument("--until", default=None, help="last UTC day, YYYY-MM-DD")
    report.add_argument("--user", default=None)
    report.add_argument("--key", default=None, help="key id")
    report.add_argument("--model", default=None)
    report.add_argument("--json", action="store_true")

    for level in ("orgs", "teams"):
        what = "organisations" if level == "orgs" else "teams"
        p = sub.add_parser(level, help=f"manage {what}")
        level_sub = p.add_subparsers(dest="level_command", required=True)
        made = with_config(level_sub.add_parser("create", help=f"create one of the {what}"))
        made.add_argument("name")
        if level == "teams":
            made.add_argument("--org", required=True, help="the organisation's id")
        made.add_argument("--models", default=None, help="comma-separated grant (default: every model)")
        made.add_argument("--default-tier", default=None)
        made.add_argument("--json", action="store_true")
        shown = with_config(level_sub.add_parser("list", help=f"list the {what}"))
        if level == "teams":
            shown.add_argument("--org", default=None)
        shown.add_argument("--json", action="store_true")
        role = with_config(level_sub.add_parser("member", help="give a user a role (replaces the one it had)"))
        role.add_argument("id")
        role.add_argument("user")
        role.add_argument(
            "--role", required=True, help="org_admin" if level == "orgs" else "team_admin, member, viewer"
        )
        role.add_argument("--json", action="store_true")
        gone = with_config(level_sub.add_parser("remove-member", help="take a user's role away"))
        gone.add_argument("id")
        gone.add_argument("user")

    trail = with_config(sub.add_parser("audit", help="the audit log of administrative changes, newest first"))
    trail.add_argument("--since", default=None, help="ISO 8601 date or time (UTC unless it says), or POSIX seconds")
    trail.add_argument("--until", default=None, help="(as --since)")
    trail.add_argument("--action", default=None, help="an action (key.revoke) or an object (key)")
    trail.add_argument("--target", default=None, help="a key id, a model name, ...")
    trail.add_argument("--actor", default=None, help="who made the change (a user; cli:<login> at the command line)")
    trail.add_argument("--limit", type=int, default=50)
    trail.add_argument("--json", action="store_true")

    token = sub.add_parser("token", help="JWT helpers")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    mint = with_config(token_sub.add_parser("mint", help="mint an HS256 token for testing"))
    mint.add_argument("--sub", required=True)
    mint.add_argument("--tier", default=None)
    mint.add_argument("--scopes", default=",".join(scopes.DEFAULT))
    mint.add_argument("--ttl", type=duration, default=duration("30m"))


def run(args: argparse.Namespace) -> int:
    from portcullis.dbcommands import run as run_command

    return run_command(args)
