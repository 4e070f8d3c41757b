"""Budget alerts: a log line always, and a POST to `quota.alert_webhook_url` when configured.

Each threshold fires once per budget period across all processes (the store claims it atomically in
the same step that records the spend). Webhook deliveries run in a background task with a timeout and
bounded retries, never on the request path; a full delivery queue drops (and logs) rather than grows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from portcullis.config import QuotaConfig
from portcullis.obs.metrics import Metrics

_QUEUE = 1000
_BACKOFF_S = 0.5


class BudgetAlerts:
    def __init__(self, config: QuotaConfig, metrics: Metrics, log: Any, *, retry_delay_s: float = _BACKOFF_S) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self.retry_delay_s = retry_delay_s
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        if self.config.alert_webhook_url and self._task is None:
            self._task = asyncio.create_task(self._deliver())

    def fire(self, alert: dict[str, Any]) -> None:
        self.metrics.budget_alerts.labels(alert["subject"], alert["period"], str(alert["threshold"])).inc()
        self.log.warning("budget_alert", **alert)
        if self._task is None:
            return
        try:
            self._queue.put_nowait({**alert, "type": "budget_alert", "at": time.time()})
        except asyncio.QueueFull:
            self.log.error("budget_alert_dropped", reason="webhook queue full", **alert)

    async def _deliver(self) -> None:
        url = self.config.alert_webhook_url
        assert url is not None
        timeout = aiohttp.ClientTimeout(total=self.config.alert_webhook_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        while True:
            alert = await self._queue.get()
            body = orjson.dumps(alert)
            for attempt in range(self.config.alert_webhook_retries + 1):
                try:
                    async with self._session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                        if r.status < 300:
                            break
                        problem = f"status {r.status}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if attempt == self.config.alert_webhook_retries:
                    self.metrics.alert_webhook_failures.inc()
                    self.log.error("budget_alert_webhook_failed", problem=problem, attempts=attempt + 1, **alert)
                else:
                    await asyncio.sleep(self.retry_delay_s * 2**attempt)
            self._queue.task_done()

    async def stop(self, *, timeout_s: float = 5.0) -> None:
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)  # deliver what is queued, briefly
        except TimeoutError:
            self.log.warning("budget_alerts_undelivered", count=self._queue.qsize())
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
