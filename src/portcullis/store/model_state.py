"""Models switched off at run time (DELETE /v1/models/{id}, POST /admin/models/{id}/enable), kept in the
database so every process and every restart agrees (the catalog holds the live set; app/lifecycle.py reads it at
startup and on bus events or polls). It needs no key secret, so a gateway that takes only JWTs (no key store)
can switch models off and on too: it is the catalog's state, not the key store's.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from portcullis.store import audit
from portcullis.store.schema import model_state


class ModelState:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def disabled_models(self) -> set[str]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(model_state.c.name).where(model_state.c.disabled.is_(True)))).all()
        return {r[0] for r in rows}

    async def set_model_disabled(self, name: str, disabled: bool, *, actor: audit.Actor | None = None) -> None:
        """Switched off or on; with an `actor`, the audit log's entry in the same transaction (when it changed)."""
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            was = (await conn.execute(select(model_state.c.disabled).where(model_state.c.name == name))).scalar()
            result = await conn.execute(
                update(model_state).where(model_state.c.name == name).values(disabled=disabled, updated_at=now)
            )
            if result.rowcount == 0:
                await conn.execute(insert(model_state).values(name=name, disabled=disabled, updated_at=now))
            if actor is not None and bool(was) != disabled:
                action = "model.disable" if disabled else "model.enable"
                await audit.record(
                    conn, audit.Change(actor, action, name, {"enabled": not was}, {"enabled": not disabled})
                )
