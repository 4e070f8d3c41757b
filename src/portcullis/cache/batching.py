"""Embedding micro-batching: concurrent `/v1/embeddings` requests for one model become one upstream call.

llama-server batches generation continuously, so batching chat requests gains nothing; but each
embeddings request is a separate task with its own overhead, so merging inputs does pay. The first
request of a batch leads it: it waits up to `max_wait_ms` for others (or until `max_batch_inputs`
inputs are collected), sends all inputs as one array, and splits the answer: each request gets exactly
its own vectors, re-indexed from 0 in its order, and its share of the usage (the upstream reports one
total; it is split in proportion to each request's input size, summing exactly). Requests join only a
batch with the same model, `encoding_format`, `dimensions` and kind of input (text or token arrays).

If the leader fails or its client leaves, the members are released and each calls the upstream alone.
A member whose client leaves simply drops out. Off by default (`embedding_batching.enabled`): it adds
up to `max_wait_ms` to a lone request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from portcullis.config import EmbeddingBatchingConfig
from portcullis.errors import GatewayError
from portcullis.exchange import Filter

if TYPE_CHECKING:
    from portcullis.exchange import Exchange
    from portcullis.http import Request
    from portcullis.routing.catalog import Replica


class _BatchFailed(Exception):
    """The batch's upstream call ended without an answer for its members."""


@dataclass(slots=True, eq=False)
class _Member:
    inputs: list[Any]
    weight: int
    answer: asyncio.Future[tuple[dict[str, Any], Replica | None]] | None  # None for the leader


@dataclass(slots=True, eq=False)
class Batch(Filter):
    """An embeddings batch; the leader's exchange carries it as a response filter: the merged answer is
    split among the members (the leader keeps its own part), and a leader that ends without an answer
    releases its members, who then go alone."""

    group: tuple[Any, ...]
    members: list[_Member] = field(default_factory=list)
    size: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    answers: bool = True

    async def answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.split(ex, answer)
        except Exception as exc:
            # The members go alone and pay for their own calls: the leader is charged nothing for the merged one.
            ex.prompt_tokens = ex.completion_tokens = None
            model = ex.replica.model if ex.replica is not None else ex.model
            raise GatewayError(
                f"The upstream for model '{model}' answered a merged embeddings call wrongly: {exc}.",
                status=502,
                code="bad_upstream_answer",
            ) from exc

    def done(self, ex: Exchange, status: int) -> None:
        self.fail()  # (after a split every member has its answer: nothing left to release)

    def split(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        """The leader's answer arrived: hand each member its part; returns the leader's own part."""
        batch = self
        data = sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))
        total = sum(len(m.inputs) for m in batch.members)
        if len(data) != total:
            batch.fail()
            raise _BatchFailed(f"the upstream answered {len(data)} vectors for {total} inputs")
        usage = answer.get("usage") or {}
        shares = _shares(usage.get("prompt_tokens"), [m.weight for m in batch.members])
        mine: dict[str, Any] = {}
        offset = 0
        for member, share in zip(batch.members, shares, strict=True):
            part = [{**d, "index": i} for i, d in enumerate(data[offset : offset + len(member.inputs)])]
            offset += len(member.inputs)
            own = {**answer, "data": part}
            if share is not None:
                own["usage"] = {**usage, "prompt_tokens": share, "total_tokens": share}
            if member.answer is None:
                mine = own
            elif not member.answer.done():
                member.answer.set_result((own, ex.replica))
        return mine

    def fail(self) -> None:
        for member in self.members:
            if member.answer is not None and not member.answer.done():
                member.answer.set_exception(_BatchFailed())


def _inputs(payload: dict[str, Any]) -> tuple[list[Any], str]:
    data = payload["input"]
    if isinstance(data, str):
        return [data], "text"
    if data and isinstance(data[0], int):
        return [data], "tokens"
    return list(data), "text" if isinstance(data[0], str) else "tokens"


def _weight(item: Any) -> int:
    return max(1, len(item))


class EmbeddingBatcher:
    def __init__(self, config: EmbeddingBatchingConfig) -> None:
        self.config = config
        self._open: dict[tuple[Any, ...], Batch] = {}

    async def join(self, req: Request, ex: Exchange, payload: dict[str, Any]) -> bool:
        """True when this request was answered as a member of another's batch. False: it leads a batch
        (its payload now holds every member's inputs) or goes alone; either way it calls the upstream."""
        inputs, kind = _inputs(payload)
        if len(inputs) >= self.config.max_batch_inputs:
            return False
        group = (payload["model"], payload.get("encoding_format"), payload.get("dimensions"), kind)
        batch = self._open.get(group)
        if batch is not None and not batch.closed and batch.size + len(inputs) <= self.config.max_batch_inputs:
            return await self._as_member(req, ex, batch, inputs)
        batch = Batch(group)
        batch.members.append(_Member(inputs, sum(map(_weight, inputs)), None))
        batch.size = len(inputs)
        self._open[group] = batch
        try:
            async with asyncio.timeout(self.config.max_wait_ms / 1000):
                await batch.full.wait()
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            batch.fail()  # the leader's client left while it gathered: whoever joined goes alone
            raise
        finally:
            batch.closed = True
            if self._open.get(group) is batch:
                del self._open[group]
        if len(batch.members) > 1:
            payload["input"] = [item for member in batch.members for item in member.inputs]
            ex.filters.append(batch)
        return False

    async def _as_member(self, req: Request, ex: Exchange, batch: Batch, inputs: list[Any]) -> bool:
        future: asyncio.Future[tuple[dict[str, Any], Replica | None]] = asyncio.get_running_loop().create_future()
        batch.members.append(_Member(inputs, sum(map(_weight, inputs)), future))
        batch.size += len(inputs)
        if batch.size >= self.config.max_batch_inputs:
            batch.full.set()
        ex.watch_disconnect(req)
        try:
            answer, replica = await future
        except _BatchFailed:
            return False  # the leader could not answer for us: go alone
        ex.replica = replica
        ex.usage(answer.get("usage"))
        ex.finished = True
        await req.respond(200, orjson.dumps(answer))
        return True


def _shares(total: Any, weights: list[int]) -> list[int | None]:
    """`total` split in proportion to `weights`, largest remainders first, summing exactly."""
    if not isinstance(total, int):
        return [None] * len(weights)
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)[: total - sum(shares)]:
        shares[i] += 1
    return list(shares)
