"""Prefix affinity: requests that share a prompt prefix go to the llama-server replica that already holds it.

llama-server keeps each slot's last prompt (and answer) in its KV cache and, for a new request, reuses
the longest common prefix: only the rest of the prompt is computed. A conversation's next turn, or any
request with the same long system prompt, starts answering sooner when it lands where its prefix was
computed. Spread across N replicas by load alone, it lands there 1/N of the time.

How a request is placed (only for models with two or more llama-server replicas):
  1. its prompt is rendered (role and text of each message, or the completion prompt) and cut into
     blocks of `block_chars`; block i's key is a hash over blocks 0..i, so a key names a whole prefix;
  2. the index (key → the last two replicas that served that prefix, most recent first; bounded, least
     recently used forgotten first) gives the replicas of the longest known prefix;
  3. a prefix never seen goes to the replica its first block hashes to (rendezvous hashing), so every
     gateway process sends a new conversation or system prompt to the same place without talking;
  4. bounded load: the chosen replica is used only while it has a free slot and carries no more than
     `load_factor` times the average load (counting this request); otherwise the next replica in
     rendezvous order that qualifies, else the least loaded (and the index learns the new place once it
     has answered). A prompt cache saves a prefix's whole prefill, so the default lets a replica carry
     twice the average before its prefixes move.

Verified by the cache (`learn`): each answer says how much of its prompt the replica took from its cache
(llama-server's `timings.cache_n`, `usage.prompt_tokens_details.cached_tokens`). A placement that counted on a
known prefix is checked against it: the replica held (at least half of) what the index promised, or it did not
(its slot was taken by other prompts, it restarted). Each replica's *retention*, the share of promises kept (a
moving average), weighs where new prefixes go: rendezvous hashing weighted by it, so a replica whose cache keeps
its conversations (more slots, less churn) gets more of them, and one that loses them gets fewer. The index itself
stays as the answers leave it (a replica that answered holds the whole prompt, whatever it held before).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Collection, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from portcullis.config import AffinityConfig
from portcullis.exchange import Exchange
from portcullis.routing.catalog import Replica
from portcullis.routing.context import content_text, fits

_KEPT = 2  # replicas remembered per prefix: where it was computed last, and before that
_KEPT_SHARE = 0.5  # a promise is kept when at least this share of the promised prefix came from the cache
_LEARN = 0.1  # the retention's moving average: about the last ten promises
_MIN_WEIGHT = 0.05  # a replica that kept nothing still gets a few new prefixes (how else would it show it mended)


def render(payload: dict[str, Any]) -> str:
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            parts.append(f"{m.get('role')}\x1f{content_text(m.get('content'))}\x1e")
        return "".join(parts)
    prompt = payload.get("prompt")
    return prompt if isinstance(prompt, str) else ""


class Affinity:
    def __init__(self, config: AffinityConfig) -> None:
        self.config = config
        self._index: OrderedDict[bytes, tuple[Replica, ...]] = OrderedDict()
        self.hits = 0  # placed on the replica of a known prefix
        self.new = 0  # an unknown prefix, placed by its hash
        self.overflow = 0  # the replica it belongs to was full: placed elsewhere
        # Learned from the answers: each replica's share of kept promises (1.0 until it breaks one), and the counts.
        self.retention: dict[Replica, float] = {}  # (replicas live as long as the gateway)
        self.kept = 0
        self.broken = 0

    def collector(self) -> Collector:
        """Placements by prefix affinity, read at scrape time."""
        return _PlacementCollector(self)

    def keys(self, model: str, payload: dict[str, Any]) -> tuple[bytes, ...]:
        """One key per whole leading block of the prompt (none for a prompt shorter than a block)."""
        text = render(payload)
        size = self.config.block_chars
        count = min(len(text) // size, self.config.max_blocks)
        if not count:
            return ()
        keys = []
        h = hashlib.blake2b(model.encode(), digest_size=16)
        for i in range(count):
            h.update(text[i * size : (i + 1) * size].encode())
            keys.append(h.copy().digest())
        return tuple(keys)

    def pick(
        self,
        replicas: list[Replica],
        keys: tuple[bytes, ...],
        avoid: Collection[Replica],
        now: float,
        need: int,
        *,
        count: bool = True,
    ) -> Replica | None:
        """The replica this prefix belongs to, if it may take the request now; None: balance by load.
        `count=False`: a question (route explain), not a placement: the counters stay as they are."""
        return self._pick(replicas, keys, avoid, now, need, count=count)[0]

    def place(self, replicas: list[Replica], ex: Exchange, avoid: Collection[Replica], now: float) -> Replica | None:
        """`pick` for a request: what the placement counted on is kept on the exchange, for `verify`."""
        replica, ex.affinity_depth = self._pick(replicas, ex.affinity, avoid, now, ex.need, count=True)
        return replica

    def _pick(
        self,
        replicas: list[Replica],
        keys: tuple[bytes, ...],
        avoid: Collection[Replica],
        now: float,
        need: int,
        *,
        count: bool,
    ) -> tuple[Replica | None, int]:
        # (a host's replica whose model is not loaded holds no prefix: its cache went with the model)
        usable = [r for r in replicas if r not in avoid and r.loaded and r.usable(now) and fits(r, need)]
        if not usable:
            return None, 0
        total = sum(r.in_flight for r in usable)
        bound = math.ceil(self.config.load_factor * (total + 1) / len(usable))

        def has_room(r: Replica) -> bool:
            limit = r.limit
            return (limit is None or r.in_flight < limit) and r.in_flight + 1 <= bound

        known: tuple[Replica, ...] | None = None
        depth = 0
        for i in range(len(keys) - 1, -1, -1):
            known = self._index.get(keys[i])
            if known is not None:
                depth = i + 1
                break
        for replica in known or ():
            if replica in usable and has_room(replica):
                self.hits += count
                return replica, depth
        ranked = self._ranked(usable, keys[0])
        for r in ranked:
            if has_room(r):
                if known is not None or r is not ranked[0]:
                    self.overflow += count
                else:
                    self.new += count
                return r, 0
        self.overflow += count
        return None, 0

    def _ranked(self, usable: list[Replica], first: bytes) -> list[Replica]:
        """Rendezvous order for a prefix (its first block): every process agrees on it without talking. With `learn`,
        weighted (the lowest -ln(u)/w first) by what each replica can keep: its slots (a prefix lives in a slot) times
        its learned retention, so new prefixes go where they will still be when their next turn comes. (Processes
        learn their retentions apart: they agree where their weights agree, which the same answers make them do.)"""
        retention = self.retention
        weights = [r.capacity * retention.get(r, 1.0) for r in usable] if self.config.learn else None
        if weights is None or len(set(weights)) == 1:
            return sorted(usable, key=lambda r: hashlib.blake2b(first + r.name.encode(), digest_size=8).digest())

        def score(pair: tuple[Replica, float]) -> float:
            digest = hashlib.blake2b(first + pair[0].name.encode(), digest_size=8).digest()
            u = (int.from_bytes(digest, "big") + 1) / 2**64  # (0, 1]
            return -math.log(u) / max(pair[1], _MIN_WEIGHT)

        return [r for r, _ in sorted(zip(usable, weights, strict=True), key=score)]

    def verify(self, ex: Exchange, replica: Replica) -> None:
        """The answer is in: did the replica hold what the placement counted on? Learned into its retention."""
        depth = ex.affinity_depth
        if not self.config.learn or not depth or ex.replica is not replica:
            return
        cached = ex.cached_tokens
        timings = ex.timings
        if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
            cached = timings["cache_n"]
        prompt, size = ex.prompt_tokens, ex.prompt_size
        if cached is None or not prompt or size is None or not size[0]:
            return  # the backend does not say what it reused
        promised = depth * self.config.block_chars * prompt / size[0]  # the prefix's tokens, at this prompt's ratio
        kept = cached >= _KEPT_SHARE * promised
        if kept:
            self.kept += 1
        else:
            self.broken += 1
        old = self.retention.get(replica, 1.0)
        self.retention[replica] = old + _LEARN * ((1.0 if kept else 0.0) - old)

    def remember(self, keys: tuple[bytes, ...], replica: Replica) -> None:
        """The replica answered: it now holds these prefixes."""
        index = self._index
        for key in keys:
            held = index.get(key)
            index[key] = (replica,) if held is None else (replica, *(r for r in held if r is not replica))[:_KEPT]
            index.move_to_end(key)
        while len(index) > self.config.max_entries:
            index.popitem(last=False)


class _PlacementCollector(Collector):
    def __init__(self, affinity: Affinity) -> None:
        self.affinity = affinity

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        placements = CounterMetricFamily(
            "portcullis_affinity_placements",
            "Requests placed by prefix affinity: hit (the replica holding the prefix), new (an unseen prefix, "
            "by its hash), overflow (that replica was full)",
            labels=["result"],
        )
        a = self.affinity
        for result, value in (("hit", a.hits), ("new", a.new), ("overflow", a.overflow)):
            placements.add_metric([result], value)
        yield placements
        promises = CounterMetricFamily(
            "portcullis_affinity_promises",
            "Placements on a known prefix checked against the answer's cached tokens: kept (the replica held it), "
            "broken (it did not)",
            labels=["result"],
        )
        promises.add_metric(["kept"], a.kept)
        promises.add_metric(["broken"], a.broken)
        yield promises
        retention = GaugeMetricFamily(
            "portcullis_affinity_retention",
            "A replica's learned share of kept prefix promises (weighs where new prefixes go)",
            labels=["model", "replica"],
        )
        for replica, share in list(a.retention.items()):
            retention.add_metric([replica.model, replica.name], share)
        yield retention
