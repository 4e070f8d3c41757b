"""The semantic cache, with the simulator's "words" embeddings (texts sharing most words are close)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from load import post_chat
from procs import ADMIN_KEY, Proc, gateway_config, http_post, sim_stats, start_gateway, start_sim


@pytest.fixture(scope="module")
def sims(module_tmp: Path) -> Iterator[tuple[Proc, Proc]]:
    chat = start_sim("--slots", "4", log_dir=module_tmp)
    embed = start_sim("--slots", "4", "--embedding-mode", "words", "--embedding-dim", "256", log_dir=module_tmp)
    yield chat, embed
    chat.stop()
    embed.stop()


@pytest.fixture(scope="module")
def gw(sims: tuple[Proc, Proc], module_tmp: Path) -> Iterator[Proc]:
    chat, embed = sims
    cfg = gateway_config(
        {"m": [chat.url], "emb": [embed.url]},
        cache={"semantic": {"enabled": True, "model": "emb", "threshold": 0.9}},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 5, "temperature": 0, **extra}


def test_a_near_duplicate_question_gets_the_cached_answer(gw: Proc, sims: tuple[Proc, Proc]) -> None:
    topic = secrets.token_hex(3)  # a word no other test uses, so this family starts empty
    status, headers, first = post_chat(gw.url, ask(f"what is the capital city of {topic} today"))
    assert status == 200 and headers["x-portcullis-cache"] == "miss"
    before = sim_stats(sims[0])["requests"]
    status, headers, second = post_chat(gw.url, ask(f"What is the capital city of {topic} today please"))
    assert status == 200 and headers["x-portcullis-cache"] == "semantic-hit"
    assert 0.9 <= float(headers["x-portcullis-cache-similarity"]) < 1.0
    assert second == first and sim_stats(sims[0])["requests"] == before  # the chat model was not asked


def test_a_different_question_or_other_parameters_miss(gw: Proc) -> None:
    topic = secrets.token_hex(3)
    post_chat(gw.url, ask(f"what is the capital city of {topic} today"))
    assert post_chat(gw.url, ask(f"how do llamas sleep at night in {topic}"))[1]["x-portcullis-cache"] == "miss"
    near = ask(f"what is the capital city of {topic} today please", max_tokens=6)  # another family
    assert post_chat(gw.url, near)[1]["x-portcullis-cache"] == "miss"


def test_tenants_never_share_semantic_entries(gw: Proc) -> None:
    topic = secrets.token_hex(3)
    status, raw = http_post(gw.url + "/admin/keys", {"user": f"other-{topic}", "tier": "enterprise"})
    assert status == 201
    other = orjson.loads(raw)["key"]
    post_chat(gw.url, ask(f"what is the capital city of {topic} today"), ADMIN_KEY)
    near = ask(f"what is the capital city of {topic} today please")
    assert post_chat(gw.url, near, other)[1]["x-portcullis-cache"] == "miss"
