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
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Collection, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from portcullis.config import AffinityConfig
from portcullis.routing.catalog import Replica
from portcullis.routing.context import content_text, fits

_KEPT = 2  # replicas remembered per prefix: where it was computed last, and before that


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
        # (a host's replica whose model is not loaded holds no prefix: its cache went with the model)
        usable = [r for r in replicas if r not in avoid and r.loaded and r.usable(now) and fits(r, need)]
        if not usable:
            return None
        total = sum(r.in_flight for r in usable)
        bound = math.ceil(self.config.load_factor * (total + 1) / len(usable))

        def has_room(r: Replica) -> bool:
            limit = r.limit
            return (limit is None or r.in_flight < limit) and r.in_flight + 1 <= bound

        known: tuple[Replica, ...] | None = None
        for key in reversed(keys):
            known = self._index.get(key)
            if known is not None:
                break
        for replica in known or ():
            if replica in usable and has_room(replica):
                self.hits += count
                return replica
        first = keys[0]
        ranked = sorted(usable, key=lambda r: hashlib.blake2b(first + r.name.encode(), digest_size=8).digest())
        for r in ranked:
            if has_room(r):
                if known is not None or r is not ranked[0]:
                    self.overflow += count
                else:
                    self.new += count
                return r
        self.overflow += count
        return None

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

    def collect(self) -> Iterator[CounterMetricFamily]:
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
