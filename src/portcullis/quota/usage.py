"""Usage records: one per API request, queued in memory and written to the database in batches.

The request path only appends a tuple to a bounded deque. A writer task flushes when a batch is full or
the interval has passed, in one multi-row INSERT. A full queue drops the record and counts it
(`portcullis_usage_records_dropped_total`): a slow database must never slow requests. A failed write
keeps the batch and tries again. Shutdown flushes everything that is queued.
"""

from __future__ import annotations

import asyncio
import collections
import operator
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, case, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from portcullis.config import UsageConfig
from portcullis.obs.metrics import Metrics
from portcullis.store.schema import usage

# The order of a record tuple (kept as a tuple on the hot path; columns are named at flush time).
FIELDS = (
    "at",
    "request_id",
    "key_id",
    "user",
    "route",
    "model",
    "deployment",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "latency_ms",
    "ttft_ms",
    "status",
    "error",
    "cache_hit",
    "moderation",
)
_RETRY_S = 1.0


class UsageRecorder:
    def __init__(self, engine: AsyncEngine, config: UsageConfig, metrics: Metrics, log: Any) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.log = log
        self.queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._sql: str | None = None
        self.written = 0
        self.dropped = 0
        metrics.usage_queue.set_function(lambda: len(self.queue))

    def record(self, row: tuple[Any, ...]) -> None:
        if len(self.queue) >= self.config.queue_size:
            self.dropped += 1
            self.metrics.usage_dropped.inc()
            return
        self.queue.append(row)
        if len(self.queue) >= self.config.batch_size:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            while self.queue:
                if not await self._flush_batch():
                    await asyncio.sleep(_RETRY_S)
                    break
                if len(self.queue) < self.config.batch_size:
                    break

    def _prepare(self) -> None:
        """The INSERT compiled once for this database, with its parameters in order.

        Rows go to the driver as plain tuples (`exec_driver_sql`): SQLAlchemy's per-row parameter
        processing cost ~20 µs of the event loop's time per record (measured on this machine, 5,000
        records), a tenth of what the gateway spends on a whole request; this way it is ~3 µs.
        """
        columns = ("at", "day", *FIELDS[1:])
        compiled = usage.insert().values({c: bindparam(c) for c in columns}).compile(dialect=self.engine.dialect)
        self._sql = str(compiled)
        source = {name: i for i, name in enumerate(FIELDS)}
        source["at"], source["day"] = len(FIELDS), len(FIELDS) + 1
        self._order = operator.itemgetter(*(source[name] for name in compiled.positiontup or ()))
        # SQLite keeps timestamps as text in SQLAlchemy's format; asyncpg wants datetime objects.
        self._at_as_text = self.engine.dialect.name == "sqlite"

    async def _flush_batch(self) -> bool:
        if self._sql is None:
            self._prepare()
        count = min(len(self.queue), self.config.batch_size)
        rows = []
        seconds: dict[int, tuple[str, str]] = {}  # whole second -> (its text, its day): one strftime each
        for i in range(count):
            record = self.queue[i]
            t = record[0]
            second = int(t)
            known = seconds.get(second)
            if known is None:
                text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
                known = seconds[second] = (text, text[:10])
            if self._at_as_text:
                stamp: Any = f"{known[0]}.{int((t - second) * 1_000_000):06d}"
            else:
                stamp = datetime.fromtimestamp(t, UTC)
            rows.append(self._order((*record, stamp, known[1])))
        try:
            async with self.engine.begin() as conn:
                await conn.exec_driver_sql(self._sql, rows)
        except Exception as exc:
            self.log.error("usage_write_failed", records=count, error=str(exc))
            return False
        for _ in range(count):
            self.queue.popleft()
        self.written += count
        self.metrics.usage_written.inc(count)
        return True

    async def stop(self) -> None:
        """Flush everything queued (a graceful shutdown loses no record), then stop the writer."""
        if self._task is not None:
            # Not cancelled: a batch cut mid-INSERT could be written and then written again.
            self._stopping = True
            self._wake.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        deadline = time.monotonic() + 30
        while self.queue and time.monotonic() < deadline:
            if not await self._flush_batch():
                await asyncio.sleep(_RETRY_S)
        if self.queue:
            self.log.error("usage_records_lost_at_shutdown", records=len(self.queue))


GROUPS = {"key": usage.c.key_id, "user": usage.c.user, "model": usage.c.model, "day": usage.c.day}


async def aggregate(
    engine: AsyncEngine,
    *,
    group_by: list[str],
    since: str | None = None,
    until: str | None = None,
    user: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Sum usage by any of key, user, model, day; `since`/`until` are UTC days (YYYY-MM-DD, inclusive)."""
    columns = [GROUPS[g].label(g) for g in group_by]
    query = select(
        *columns,
        func.count().label("requests"),
        func.sum(case((usage.c.status >= 400, 1), else_=0)).label("errors"),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(usage.c.cost), 0.0).label("cost"),
        func.avg(usage.c.latency_ms).label("avg_latency_ms"),
    )
    if since:
        query = query.where(usage.c.day >= since)
    if until:
        query = query.where(usage.c.day <= until)
    if user:
        query = query.where(usage.c.user == user)
    if key_id:
        query = query.where(usage.c.key_id == key_id)
    if model:
        query = query.where(usage.c.model == model)
    if columns:
        query = query.group_by(*[GROUPS[g] for g in group_by]).order_by(*[GROUPS[g] for g in group_by])
    async with engine.connect() as conn:
        result = await conn.execute(query)
        out = []
        for row in result.mappings():
            item = dict(row)
            item["errors"] = int(item["errors"] or 0)
            item["total_tokens"] = int(item["prompt_tokens"]) + int(item["completion_tokens"])
            item["cost"] = round(float(item["cost"]), 6)
            item["avg_latency_ms"] = round(float(item["avg_latency_ms"] or 0.0), 3)
            out.append(item)
        return out


def parse_group_by(text: str | None) -> list[str]:
    items = [g.strip() for g in (text or "day,user,model").split(",") if g.strip()]
    unknown = [g for g in items if g not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    return list(dict.fromkeys(items))


def render_table(rows: list[dict[str, Any]], group_by: list[str], currency: str) -> str:
    """Usage rows as an aligned text table, with a total line."""
    headers = [
        *group_by,
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        f"cost_{currency}",
    ]
    body = [
        [
            *(str(r[g]) if r[g] is not None else "-" for g in group_by),
            *(str(r[f]) for f in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")),
            f"{r['cost']:.6f}",
        ]
        for r in rows
    ]
    totals = ["total", *([""] * (len(group_by) - 1))] if group_by else []
    for field in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"):
        totals.append(str(sum(int(r[field]) for r in rows)))
    totals.append(f"{sum(r['cost'] for r in rows):.6f}")
    widths = [max(len(line[i]) for line in [headers, *body, totals]) for i in range(len(headers))]
    numeric = len(group_by)

    def fmt(line: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i >= numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in body), rule, fmt(totals)]) + "\n"
