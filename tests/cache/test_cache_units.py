"""The memory store's byte bound and LRU order, and the stream replay round trip."""

from __future__ import annotations

import asyncio

import orjson

from portcullis.cache.replay import Assembler, as_stream
from portcullis.cache.store import MemoryStore


def test_memory_store_stays_within_its_bytes_and_evicts_the_least_recently_used() -> None:
    async def run() -> None:
        store = MemoryStore(max_bytes=300, max_entry_bytes=200)
        for name in ("a", "b", "c"):
            await store.put(name, b"x" * 90, ttl_s=60)  # 91 bytes each with the key
        assert store.size == 273 and len(store) == 3
        assert await store.get("a") == b"x" * 90  # a is now the most recently used
        await store.put("d", b"y" * 90, ttl_s=60)
        assert store.size <= 300
        assert await store.get("b") is None  # b was the least recently used
        assert await store.get("a") is not None and await store.get("d") is not None
        await store.put("huge", b"z" * 250, ttl_s=60)  # over max_entry_bytes: refused, nothing evicted
        assert await store.get("huge") is None and len(store) == 3
        await store.put("short", b"s", ttl_s=0.0001)
        await asyncio.sleep(0.001)
        assert await store.get("short") is None

    asyncio.run(run())


ANSWER = {
    "id": "chatcmpl-1",
    "created": 1,
    "model": "m",
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "general kenobi"}, "finish_reason": "length"},
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def test_a_replayed_stream_assembles_back_into_the_same_answer() -> None:
    events = as_stream(ANSWER, chat=True, include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    assembler = Assembler(chat=True)
    for event in events[:-1]:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assembler.add(orjson.loads(event[6:]))
    assert assembler.answer() == ANSWER
    assert b'"usage"' not in b"".join(as_stream(ANSWER, chat=True, include_usage=False))


def test_an_unfinished_or_tool_call_stream_is_not_assembled() -> None:
    unfinished = Assembler(chat=True)
    unfinished.add({"choices": [{"index": 0, "delta": {"content": "hal"}, "finish_reason": None}]})
    assert unfinished.answer() is None
    tools = Assembler(chat=True)
    tools.add({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}, "finish_reason": None}]})
    tools.add({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    assert tools.answer() is None
