"""The exact response cache and the coalescing of identical requests in flight.

Key: a hash of the canonical JSON (sorted keys) of the route and every request field except those that
cannot change the output (`stream`, `stream_options`, `user`, `metadata`, `store`, `service_tier`):
a deny-list, so a field this gateway has never heard of (llama-server's `top_k`, `min_p`,
`ignore_eos`, ...) still separates entries. The scope comes first: the user (`cache.scope: tenant`,
the default) or nobody (`global`, an operator's opt-in). Only deterministic requests are cached:
`temperature: 0`, or a `seed` when `cache.seeded` allows it; everything else is `bypass`.

The output policy follows the scope: a fingerprint of the moderators that judge the answer (their names
and settings), because an entry is the answer as its first client received it, after output moderation.
So an answer cached (or being answered) for a key whose tier does not redact e-mail addresses is never
served to one whose tier does, in either scope, from the exact or the semantic cache or a request in
flight. Why a key and not a second judgement on the way out: each entry was already judged by exactly the
policy of everyone who can reach it (a replayed stream carries the same text the whole answer was judged
as, and a streamed miss is stored as its client got it), the key costs one dict lookup per request where
re-judging would put a remote moderator's call in front of every hit, and the fingerprint is of the
settings, not the tier's name, so a changed policy never meets the entries of the old one in Redis.

An entry is the non-streamed JSON answer; a streaming client gets it replayed as chunks (replay.py),
and a streamed miss is assembled back into that form as it passes. Nothing is stored unless the answer
ended normally: no errors, no cut streams, no degraded or fallback answers.

Coalescing: while a cacheable request is being answered upstream, identical ones (same key) wait for
its answer instead of calling the upstream again, and are then served it like a hit
(`x-portcullis-cache: coalesced`). A waiter that disconnects leaves alone; if the leader fails or its
client leaves, the waiters start over (one of them leads). With the Redis store this holds across
processes too: the process that goes upstream holds a lease on the key in Redis (renewed every few
seconds while the answer is under way); the others poll the cache for the answer, and lead themselves
when the lease is gone without one (the leader failed, or died and its lease ran out).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from portcullis.cache.replay import Assembler, as_chunks, as_stream
from portcullis.cache.semantic import SemanticIndex, conversation_text
from portcullis.cache.store import CacheStore, MemoryStore, RedisStore
from portcullis.config import CacheConfig
from portcullis.exchange import Filter

if TYPE_CHECKING:
    from portcullis.exchange import Exchange
    from portcullis.http import Request
    from portcullis.obs.metrics import Metrics
    from portcullis.routing.catalog import Catalog, SideCall

_NOT_OUTPUT = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier"})
_HEADER = b"x-portcullis-cache"
_HIT, _MISS, _BYPASS, _COALESCED, _SEMANTIC_HIT = b"hit", b"miss", b"bypass", b"coalesced", b"semantic-hit"
_LEAD_TTL_S = 10.0  # a dead leader's lease lapses after this; a live one renews it every third of it
_POLL_FIRST_S, _POLL_MAX_S = 0.01, 0.25  # how often a waiter in another process looks for the answer


class _LeaderFailed(Exception):
    """The request being waited for ended without an answer to share."""


@dataclass(slots=True, eq=False)
class Ticket(Filter):
    """A cacheable miss on its way upstream: the cache stage's response half. It keeps the answer as the
    client gets it (after output moderation: the filters before it), assembling a stream back into the
    whole answer; when the request is over, `done` stores it and hands it to the requests that waited."""

    cache: ResponseCache
    key: str
    chat: bool
    store: bool  # False with Cache-Control: no-store
    assembler: Assembler | None = None  # streams
    whole: dict[str, Any] | None = None  # non-streamed answers
    leader: asyncio.Future[bytes] | None = field(default=None, repr=False)
    shared_lead: bool = False  # this process holds the key's lease in Redis
    # The semantic cache's family and the conversation's embedding, to index the answer once stored.
    family: str | None = None
    vector: Any = field(default=None, repr=False)
    answers: bool = True
    streams: bool = False

    async def answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        self.whole = answer
        return answer

    async def event(self, ex: Exchange, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if self.assembler is not None:
            self.assembler.add(chunk)
        return [chunk]

    def done(self, ex: Exchange, status: int) -> None:
        self.cache.complete(ex, self, status)


class ResponseCache:
    def __init__(
        self, config: CacheConfig, redis_url: str | None, metrics: Metrics, catalog: Catalog, call: SideCall
    ) -> None:
        self.config = config
        self.metrics = metrics
        semantic = config.enabled and config.semantic.enabled
        self.semantic = SemanticIndex(config.semantic, catalog, call) if semantic else None
        self.store: CacheStore
        if config.backend == "redis" or (config.backend == "auto" and redis_url):
            assert redis_url is not None
            self.store = RedisStore(redis_url, timeout_s=config.store_timeout_s, retry_s=config.store_retry_s)
        else:
            self.store = MemoryStore(config.max_bytes, config.max_entry_bytes)
        self._in_flight: dict[str, asyncio.Future[bytes]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._leading: set[str] = set()  # keys whose lease this process holds (renewed by _renewer)
        self._renewer: asyncio.Task[None] | None = None

    def scope(self, ex: Exchange) -> str:
        """Who may share an entry: the scope (the user, or everyone) and the output policy its answer passed
        (a fingerprint the moderation stage made of its output moderators and their settings)."""
        policy = ex.output_policy or "-"
        if self.config.scope == "global":
            return "g:" + policy
        principal = ex.principal
        tenant = principal.user if principal is not None else "-"
        return "t" + hashlib.blake2b(tenant.encode(), digest_size=8).hexdigest() + ":" + policy

    def key(self, route: str, payload: dict[str, Any], ex: Exchange) -> str:
        body = {k: v for k, v in payload.items() if k not in _NOT_OUTPUT}
        digest = hashlib.blake2b(orjson.dumps([route, body], option=orjson.OPT_SORT_KEYS), digest_size=20)
        return f"{self.scope(ex)}:{digest.hexdigest()}"

    def cacheable(self, payload: dict[str, Any]) -> bool:
        temperature = payload.get("temperature")
        if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0:
            return True
        seed = payload.get("seed")
        return self.config.seeded and isinstance(seed, int) and not isinstance(seed, bool)

    async def answer(self, req: Request, ex: Exchange, payload: dict[str, Any], *, route: str, chat: bool) -> bool:
        """Serve from the cache, or from an identical request in flight: True when answered. Otherwise the
        request goes upstream, and `complete` (called when it is over) stores its answer."""
        if ex.trace is not None:
            ex.trace.stage("cache")
        if not self.config.enabled:
            return False
        if not self.cacheable(payload):
            req.response_headers.append((_HEADER, _BYPASS))
            self.metrics.cache_lookup(route, "bypass")
            return False
        control = (req.header(b"cache-control") or b"").lower()
        lookup, store = b"no-cache" not in control, b"no-store" not in control
        key = self.key(route, payload, ex)
        while True:
            if lookup:
                try:
                    raw = await self.store.get(key)
                except Exception:  # a cache that is down is a miss, never a failed request
                    self.metrics.cache_store_errors.inc()
                    raw = None
                if raw is not None:
                    self.metrics.cache_lookup(route, "hit")
                    await self._serve(req, ex, raw, payload, chat=chat, how=_HIT)
                    return True
            leader = self._in_flight.get(key) if self.config.coalesce else None
            if leader is None:
                if not (lookup and self.config.coalesce and self.store.shared) or await self._lead(key):
                    break
                # Another process is answering this key: wait for its answer in the shared cache.
                ex.watch_disconnect(req)
                raw = await self._await_other_process(key)
                if raw is None:
                    continue  # it gave up (or died): start over, perhaps as the leader
                self.metrics.cache_lookup(route, "coalesced")
                await self._serve(req, ex, raw, payload, chat=chat, how=_COALESCED)
                return True
            # A client that leaves while waiting is let go at once (it must not become a leader later).
            ex.watch_disconnect(req)
            try:
                raw = await asyncio.shield(leader)  # our client leaving cancels only our wait
            except _LeaderFailed:
                continue  # start over: now one of the waiters leads
            self.metrics.cache_lookup(route, "coalesced")
            await self._serve(req, ex, raw, payload, chat=chat, how=_COALESCED)
            return True
        family = vector = None
        if self.semantic is not None and chat and lookup:
            try:
                family = self.semantic.family(self.scope(ex), route, payload)
                vector = await self.semantic.embed(conversation_text(payload.get("messages")))
                near = self.semantic.nearest(family, vector) if vector is not None else None
                if near is not None and await self._semantic_hit(req, ex, payload, near, route=route, chat=chat):
                    self._give_up_lead(key)
                    return True
            except BaseException:
                self._give_up_lead(key)
                raise
        self.metrics.cache_lookup(route, "miss")
        req.response_headers.append((_HEADER, _MISS))
        assembler = Assembler(chat=chat) if ex.stream else None
        ticket = Ticket(self, key, chat, store, assembler=assembler, streams=assembler is not None)
        ticket.family, ticket.vector = family, vector
        ticket.shared_lead = key in self._leading
        if self.config.coalesce:
            ticket.leader = asyncio.get_running_loop().create_future()
            self._in_flight[key] = ticket.leader
        ex.filters.append(ticket)
        return False

    async def _semantic_hit(
        self, req: Request, ex: Exchange, payload: dict[str, Any], near: tuple[str, float], *, route: str, chat: bool
    ) -> bool:
        key, similarity = near
        try:
            raw = await self.store.get(key)
        except Exception:
            self.metrics.cache_store_errors.inc()
            return False
        if raw is None:  # expired from the store since it was indexed
            return False
        self.metrics.cache_lookup(route, "semantic-hit")
        req.response_headers.append((b"x-portcullis-cache-similarity", f"{similarity:.4f}".encode()))
        await self._serve(req, ex, raw, payload, chat=chat, how=_SEMANTIC_HIT)
        return True

    async def _serve(
        self, req: Request, ex: Exchange, raw: bytes, payload: dict[str, Any], *, chat: bool, how: bytes
    ) -> None:
        ex.cache_hit = True
        req.response_headers.append((_HEADER, how))
        surface = ex.surface
        if not ex.stream:
            ex.finished = True
            await req.respond(200, raw if surface is None else orjson.dumps(await surface.answer(orjson.loads(raw))))
            return
        options = payload.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        if surface is not None:  # the client's API: its events, made from the chunks a stream would have had
            chunks = as_chunks(orjson.loads(raw), chat=chat, include_usage=include_usage)
            events = [surface.events(chunks), await surface.end()]
        else:
            events = as_stream(orjson.loads(raw), chat=chat, include_usage=include_usage)
        await req.start_stream()
        for event in events:
            await req.stream_chunk(event)
        ex.finished = True
        await req.end_stream()

    def complete(self, ex: Exchange, ticket: Ticket, status: int) -> None:
        """The request that went upstream is over: store its answer if it is a whole one, and hand it to
        the identical requests that waited for it."""
        answer = None
        whole = ex.error_code is None and ex.degraded is None and ex.abort_reason is None
        if status == 200 and whole and not ex.unjudged:
            answer = ticket.whole if ticket.assembler is None else ticket.assembler.answer()
            replica = ex.replica
            if replica is not None and isinstance(answer, dict) and answer.get("model") != replica.model:
                answer = None  # served by a fallback model: not the answer this key asked for
        raw = orjson.dumps(answer) if answer is not None else None
        stored = raw is not None and ticket.store
        if stored:
            assert raw is not None
            if self.semantic is not None and ticket.vector is not None and ticket.family is not None:
                self.semantic.add(ticket.family, ticket.vector, ticket.key)
        if stored or ticket.shared_lead:
            # The answer is stored before the lease goes, so the other processes' waiters find it.
            task = asyncio.ensure_future(self._put(ticket.key, raw if stored else None, ticket.shared_lead))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        leader = ticket.leader
        if leader is not None:
            if self._in_flight.get(ticket.key) is leader:
                del self._in_flight[ticket.key]
            if raw is not None:
                leader.set_result(raw)
            else:
                leader.set_exception(_LeaderFailed())
                leader.exception()  # retrieved: nobody may be waiting

    async def _put(self, key: str, raw: bytes | None, unlead: bool) -> None:
        try:
            if raw is not None:
                await self.store.put(key, raw, self.config.ttl_s)
            if unlead:
                self._leading.discard(key)
                await self.store.unlead(key)
        except Exception:
            self.metrics.cache_store_errors.inc()

    # -- coalescing across processes (Redis) ---------------------------------------------------

    def _give_up_lead(self, key: str) -> None:
        """Answered without going upstream after all (or cut short): let the other processes' waiters go on."""
        if key in self._leading:
            task = asyncio.ensure_future(self._put(key, None, True))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _lead(self, key: str) -> bool:
        """True: this process answers `key` (it holds the lease, or Redis is away and everyone answers alone)."""
        try:
            if not await self.store.lead(key, _LEAD_TTL_S):
                return False
        except Exception:
            self.metrics.cache_store_errors.inc()
            return True
        self._leading.add(key)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_leases())
        return True

    async def _await_other_process(self, key: str) -> bytes | None:
        """The answer another process is producing for `key`, or None when it no longer leads without one."""
        delay = _POLL_FIRST_S
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX_S)
            try:
                raw = await self.store.get(key)
                if raw is not None:
                    return raw
                if not await self.store.led(key):
                    return await self.store.get(key)  # stored just before the lease went, or nothing
            except Exception:
                self.metrics.cache_store_errors.inc()
                return None

    async def _renew_leases(self) -> None:
        while self._leading:
            await asyncio.sleep(_LEAD_TTL_S / 3)
            try:
                await self.store.renew(list(self._leading), _LEAD_TTL_S)
            except Exception:
                self.metrics.cache_store_errors.inc()

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._renewer is not None:
            self._renewer.cancel()
        await self.store.close()
