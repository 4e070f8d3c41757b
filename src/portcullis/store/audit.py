"""The audit log: who changed what, when, from where, with the object before and after.

Every administrative change writes its entry in the same database transaction as the change itself (the key
store, the model state, ... take the entry and write both or neither), so the log holds exactly the changes that
were made. The table is append-only (migration 0008's trigger refuses UPDATE and DELETE), `GET /admin/audit`
and `portcullis audit` read it, and each entry is also written to the log as an `audit` event, for whatever
collects the gateway's JSON lines.

`before` and `after` are the object's public form: a key's, for instance, never holds its hash or the key.
"""

from __future__ import annotations

import getpass
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from portcullis.obs.logging import get_logger
from portcullis.store.schema import audit_log

log = get_logger("portcullis.audit")

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: the principal of an admin request, the operator at the command line, or the gateway."""

    user: str
    via: str  # "api_key", "jwt", "cli", "system"
    key_id: str | None = None
    source: str | None = None  # the client's address
    request_id: str | None = None


SYSTEM = Actor(user="system", via="system")


def cli_actor() -> Actor:
    """The operator running `portcullis ...` on a machine with the database's credentials: their login name."""
    try:
        login = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container's numeric user)
        login = "unknown"
    return Actor(user=f"cli:{login}"[:256], via="cli", source="cli")


@dataclass(frozen=True, slots=True)
class Change:
    """One change, as the code that makes it describes it; `record` writes it beside the change."""

    actor: Actor
    action: str  # "<object>.<verb>": key.create, key.revoke, key.rotate, model.enable, model.disable, ...
    target: str  # the object's id or name
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


async def record(conn: AsyncConnection, change: Change) -> None:
    """Write the entry in the caller's transaction, and (once written) to the log."""
    actor = change.actor
    row = {
        "at": time.time(),
        "actor": actor.user,
        "actor_key": actor.key_id,
        "via": actor.via,
        "action": change.action,
        "target": change.target[:256],
        "before": change.before,
        "after": change.after,
        "source": actor.source[:64] if actor.source else None,
        "request_id": actor.request_id,
    }
    await conn.execute(insert(audit_log).values(**row))
    log.info("audit", **{("audit_" + k if k in _RESERVED else k): v for k, v in row.items()})


# Fields the log line already has a meaning for (the JSON logger's own, and the request's).
_RESERVED = frozenset({"at", "request_id"})


_NUMBER = re.compile(r"^[0-9]{1,12}(?:\.[0-9]{1,9})?\Z")


def parse_instant(value: str) -> float:
    """POSIX seconds, or an ISO 8601 date or time (UTC when it names no zone); ValueError otherwise."""
    if _NUMBER.match(value):
        return float(value)
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def public(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {
        "id": m["id"],
        "object": "audit.entry",
        "at": m["at"],
        "actor": {"user": m["actor"], "key_id": m["actor_key"], "via": m["via"], "source": m["source"]},
        "action": m["action"],
        "target": m["target"],
        "before": m["before"],
        "after": m["after"],
        "request_id": m["request_id"],
    }


async def read(
    engine: AsyncEngine,
    *,
    limit: int = 100,
    after: int | None = None,
    since: float | None = None,
    until: float | None = None,
    action: str | None = None,
    target: str | None = None,
    actor: str | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Entries newest first, at most `limit`, older than the entry `after` (the cursor: the last id of the page
    before), and whether there are more."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit + 1)
    if after is not None:
        query = query.where(audit_log.c.id < after)
    if since is not None:
        query = query.where(audit_log.c.at >= since)
    if until is not None:
        query = query.where(audit_log.c.at < until)
    if action is not None:
        # "key" matches every key.* action; "key.revoke" that one.
        matches = (
            audit_log.c.action == action
            if "." in action
            else audit_log.c.action.startswith(action + ".", autoescape=True)
        )
        query = query.where(matches)
    if target is not None:
        query = query.where(audit_log.c.target == target)
    if actor is not None:
        query = query.where(audit_log.c.actor == actor)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [public(r) for r in rows[:limit]], len(rows) > limit
