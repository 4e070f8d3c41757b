"""Stored responses of the Responses API, in the database, scoped to their owner, kept `responses.retention_s`.

A response stored with `store: true` keeps its own input items, the conversation before them (`context`, so a
continuation is one read, not a walk up the chain) and the response object. `previous_response_id` continues
it: the next request's conversation is context + input + the response's output items.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from portcullis.errors import NotFound
from portcullis.obs.logging import get_logger
from portcullis.store.schema import responses

log = get_logger("portcullis.responses")
_PURGE_EVERY_S = 3600.0  # expired responses are deleted at most this often (by a process that stores one)


class ResponseStore:
    def __init__(self, engine: AsyncEngine, retention_s: float) -> None:
        self.engine = engine
        self.retention_s = retention_s
        self._purged_at = -_PURGE_EVERY_S  # (the first write purges)
        self._tasks: set[asyncio.Task[None]] = set()

    async def put(self, owner: str, context: list[Any], input: list[Any], response: dict[str, Any]) -> None:
        """Store a response (best effort: a database that fails costs the client its stored copy, never its
        answer; logged). Expired ones are purged now and then, beside the writes."""
        try:
            await self._put(owner, context, input, response)
        except Exception as exc:  # (the database away, or slower than its deadline)
            log.warning("response_not_stored", response_id=response.get("id"), error=type(exc).__name__)
            return
        now = time.monotonic()
        if now - self._purged_at > _PURGE_EVERY_S:
            self._purged_at = now
            task = asyncio.ensure_future(self._purge())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _purge(self) -> None:
        try:
            purged = await self.expire()
        except Exception as exc:
            log.warning("responses_not_purged", error=type(exc).__name__)
            return
        if purged:
            log.info("responses_purged", count=purged)

    async def _put(self, owner: str, context: list[Any], input: list[Any], response: dict[str, Any]) -> None:
        now = time.time()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(responses).values(
                    id=response["id"],
                    owner=owner,
                    created_at=now,
                    expires_at=now + self.retention_s,
                    context=context,
                    input=input,
                    response=response,
                )
            )

    async def get(self, owner: str, response_id: str) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """(context, input, response) of the owner's stored response; 404 when there is none (or it expired)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(responses.c.context, responses.c.input, responses.c.response).where(
                        responses.c.id == response_id,
                        responses.c.owner == owner,
                        responses.c.expires_at > time.time(),
                    )
                )
            ).first()
        if row is None:
            raise NotFound(
                f"No response found with id '{response_id}'.", param="response_id", code="response_not_found"
            )
        return list(row.context), list(row.input), dict(row.response)

    async def delete(self, owner: str, response_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(responses).where(responses.c.id == response_id, responses.c.owner == owner)
            )
        return bool(result.rowcount)

    async def expire(self) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(responses).where(responses.c.expires_at <= time.time()))
        return int(result.rowcount or 0)
