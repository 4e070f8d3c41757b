"""Issue 17, point 2: a batch line obeys its submitter's scopes and model grants, at submission and again
when it runs. A key with `batches:write` alone must not get chat answers through a batch (the gateway's
internal requests skip the route's scope check), and a key that loses a scope or a model after submitting
must not have its waiting lines run.
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from procs import (
    Proc,
    gateway_config,
    new_key,
    openai_client,
    sim_stats,
    start_gateway,
    start_sim,
    wait_ended,
)


def _lines(n: int, model: str = "m") -> bytes:
    items = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4},
        }
        for i in range(n)
    ]
    return b"\n".join(orjson.dumps(x) for x in items) + b"\n"


def _submit(client: openai.OpenAI, content: bytes) -> Any:
    file = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def _not_now() -> dict[str, str]:
    """An off-peak window two hours from now (UTC): with in_peak never, a runner leaves every batch waiting."""
    hour = time.gmtime().tm_hour
    return {"days": "daily", "from": f"{(hour + 2) % 24:02d}:00", "to": f"{(hour + 3) % 24:02d}:00", "tz": "UTC"}


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "4", "--tokens-per-s", "400", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def held(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """A gateway that accepts batches but whose runner runs none (peak hours, in_peak never): lines wait in
    the database until another gateway on the same database runs them."""
    cfg = gateway_config(
        {"m": [sim.url], "other": [sim.url]},
        scheduling={"off_peak": [_not_now()]},
        batch={"poll_s": 0.1, "lease_s": 3, "reserve_slots": 0, "in_peak": "never"},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def test_batches_write_alone_cannot_submit_chat_lines(held: Proc) -> None:
    """The file is rejected at submission, each line named with missing_scope; nothing is queued."""
    key = new_key(held, user="batch-only", scopes=["batches:write"])
    batch = _submit(openai_client(held, key), _lines(3))
    assert batch.status == "failed", f"a batches:write-only key got a {batch.status} batch of chat lines"
    assert batch.request_counts.total == 0
    assert {(e.line, e.code, e.param) for e in batch.errors.data} == {
        (1, "missing_scope", "url"),
        (2, "missing_scope", "url"),
        (3, "missing_scope", "url"),
    }
    assert "chat:write" in batch.errors.data[0].message
    # The model allow-list likewise, naming the line.
    narrow = new_key(held, user="narrow", scopes=["batches:write", "chat:write"], models=["other"])
    batch = _submit(openai_client(held, narrow), _lines(2))
    assert batch.status == "failed"
    assert {(e.line, e.code) for e in batch.errors.data} == {(1, "model_not_allowed"), (2, "model_not_allowed")}


def test_a_key_that_loses_its_grant_has_its_waiting_lines_refused(
    held: Proc, sim: Proc, module_tmp: Path, reaper: Any
) -> None:
    """Two keys submit valid batches; before any line runs, one loses chat:write and the other's model
    allow-list stops naming the batch's model. A gateway that then runs the lines sends none upstream: each
    ends in the error file with 403 missing_scope / model_not_allowed."""
    lost_scope = new_key(held, user="loses-scope", scopes=["batches:write", "chat:write"])
    lost_model = new_key(held, user="loses-model", scopes=["batches:write", "chat:write"], models=["m"])
    first = _submit(openai_client(held, lost_scope), _lines(4))
    second = _submit(openai_client(held, lost_model), _lines(3))
    assert first.status == second.status == "in_progress"

    path = held.database_url.split("///", 1)[1]
    with sqlite3.connect(path) as db:  # what an operator's edit of the keys does (there is no API for it)
        db.execute("UPDATE api_keys SET scopes = ? WHERE id = ?", ('["batches:write"]', lost_scope.split("-")[1]))
        db.execute("UPDATE api_keys SET models = ? WHERE id = ?", ('["other"]', lost_model.split("-")[1]))

    before = sim_stats(sim)["requests"]
    runner = reaper(
        start_gateway(
            gateway_config(
                {"m": [sim.url], "other": [sim.url]},
                store={"database_url": held.database_url},
                batch={"poll_s": 0.1, "lease_s": 3, "reserve_slots": 0, "in_peak": "always"},
            ),
            module_tmp,
            ready_path="/readyz",
        )
    )
    admin = openai_client(runner)

    for batch, n, code in ((first, 4, "missing_scope"), (second, 3, "model_not_allowed")):
        end = wait_ended(admin, batch.id, timeout=20)
        counts = end.request_counts
        assert (counts.completed, counts.failed) == (0, n), f"{batch.id}: lines ran for a key without the grant"
        assert end.output_file_id is None
        errors = [orjson.loads(x) for x in admin.files.content(end.error_file_id).text.splitlines()]
        assert sorted(e["custom_id"] for e in errors) == [f"req-{i}" for i in range(n)]
        assert {e["response"]["status_code"] for e in errors} == {403}
        assert {e["response"]["body"]["error"]["code"] for e in errors} == {code}
    assert sim_stats(sim)["requests"] == before  # nothing went upstream
