"""The semantic cache (opt-in): a near-duplicate conversation gets the cached answer of its neighbour.

For a deterministic chat request that missed the exact cache, the conversation's text is embedded by a
configured embedding model (one call, bounded by `timeout_s`; on any failure the request simply misses).
Entries are grouped by family: the scope (tenant or global, and the output policy, as for the exact cache)
plus a hash of every other output-affecting field, so only requests that differ in their messages alone
can ever match. In a family the nearest stored conversation by cosine similarity is taken if it reaches
`threshold`; its answer is served with `x-portcullis-cache: semantic-hit` and `x-portcullis-cache-similarity`.

The risk: a question that is close in wording but different in meaning ("... in 2023" vs "... in 2024")
gets the other's answer. Keep the threshold high (0.95 or more with a good embedding model), scope
per tenant, and measure on your own traffic before lowering it (docs/caching.md).

The index lives in this process, bounded by `max_entries` (oldest first out); vectors are unit-length
float32 rows of one numpy matrix per family, so a lookup is one matrix-vector product.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from portcullis.config import SemanticCacheConfig
from portcullis.routing.balancer import choose

if TYPE_CHECKING:
    import numpy as np

    from portcullis.routing.catalog import Catalog, SideCall

_NOT_FAMILY = frozenset({"messages", "stream", "stream_options", "user", "metadata", "store", "service_tier"})


def conversation_text(messages: Any) -> str:
    parts = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{message.get('role', '')}: {content or ''}")
    return "\n".join(parts)


class SemanticIndex:
    def __init__(self, config: SemanticCacheConfig, catalog: Catalog, call: SideCall) -> None:
        try:
            import numpy  # an optional dependency: imported only when the feature is on
        except ImportError as exc:
            raise RuntimeError("cache.semantic needs numpy: pip install 'portcullis[semantic]'") from exc

        self.np = numpy
        self.config = config
        self.catalog = catalog
        self.call = call
        self._families: dict[str, tuple[np.ndarray, list[str]]] = {}
        self._order: deque[tuple[str, str]] = deque()  # (family, key), oldest first

    @staticmethod
    def family(scope: str, route: str, payload: dict[str, Any]) -> str:
        rest = {k: v for k, v in payload.items() if k not in _NOT_FAMILY}
        digest = hashlib.blake2b(orjson.dumps([route, rest], option=orjson.OPT_SORT_KEYS), digest_size=16)
        return f"{scope}:{digest.hexdigest()}"

    async def embed(self, text: str) -> np.ndarray | None:
        model = self.config.model
        assert model is not None
        replica = choose(self.catalog.models[model])
        if replica is None or replica.client is None:
            return None
        body = {"model": replica.upstream_model or model, "input": text}
        try:
            status, answer = await self.call(
                replica, "/v1/embeddings", body, model=model, timeout_s=self.config.timeout_s
            )
            if status != 200:
                return None
            vector = self.np.asarray(answer["data"][0]["embedding"], dtype=self.np.float32)
        except Exception:
            return None
        norm = float(self.np.linalg.norm(vector))
        return vector / norm if norm else None

    def nearest(self, family: str, vector: np.ndarray) -> tuple[str, float] | None:
        found = self._families.get(family)
        if found is None:
            return None
        matrix, keys = found
        if matrix.shape[1] != vector.shape[0]:
            return None
        scores = matrix @ vector
        best = int(scores.argmax())
        similarity = float(scores[best])
        return (keys[best], similarity) if similarity >= self.config.threshold else None

    def add(self, family: str, vector: np.ndarray, key: str) -> None:
        found = self._families.get(family)
        if found is None:
            self._families[family] = (vector[None, :].copy(), [key])
        else:
            matrix, keys = found
            if key in keys or matrix.shape[1] != vector.shape[0]:
                return
            self._families[family] = (self.np.vstack([matrix, vector[None, :]]), [*keys, key])
        self._order.append((family, key))
        while len(self._order) > self.config.max_entries:
            self._evict(*self._order.popleft())

    def _evict(self, family: str, key: str) -> None:
        matrix, keys = self._families[family]
        i = keys.index(key)
        if len(keys) == 1:
            del self._families[family]
            return
        self._families[family] = (self.np.delete(matrix, i, axis=0), keys[:i] + keys[i + 1 :])

    def __len__(self) -> int:
        return len(self._order)
