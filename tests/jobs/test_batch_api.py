"""The Batch API through the official `openai` SDK, run on the gateway's own simulator backend: files,
batches, their validation, ownership, cancellation, expiry, budgets, and batch lines giving their slots
up to interactive requests.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from procs import (
    ADMIN_KEY,
    Proc,
    gateway_config,
    http_get,
    http_post,
    new_key,
    openai_client,
    sim_control,
    sim_stats,
    start_gateway,
    start_sim,
    wait_ended,
    wait_until,
)


def line(i: int, *, model: str = "m", url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4, **body},
    }


def jsonl(items: list[Any]) -> bytes:
    return b"\n".join(orjson.dumps(x) if not isinstance(x, bytes) else x for x in items) + b"\n"


def submit(client: openai.OpenAI, content: bytes, window: str = "24h", endpoint: str = "/v1/chat/completions") -> Any:
    file = client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window=window)  # type: ignore[arg-type]


def output_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "4", "--tokens-per-s", "400", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"m": [{"url": sim.url, "cost": {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}}], "other": [sim.url]},
        batch={"poll_s": 0.1, "lease_s": 3, "min_window_s": 1, "reserve_slots": 0},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


# A batch owner's scopes (chat lines need chat:write too: batches:write alone runs nothing;
# tests/security/test_batch_grants.py).
BATCH_SCOPES = ["batches:write", "chat:write"]


def test_the_sdk_runs_a_batch_end_to_end(client: openai.OpenAI, gw: Proc, sim: Proc) -> None:
    before = sim_stats(sim)["requests"]
    content = jsonl([line(i) for i in range(40)])
    file = client.files.create(file=("questions.jsonl", io.BytesIO(content)), purpose="batch")
    assert file.purpose == "batch" and file.bytes == len(content) and file.filename == "questions.jsonl"
    assert client.files.retrieve(file.id).id == file.id
    assert client.files.content(file.id).content == content  # what was uploaded, byte for byte
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "nightly"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 40
    assert batch.metadata == {"job": "nightly"}
    ended = wait_ended(client, batch.id)
    assert ended.status == "completed" and ended.request_counts.completed == 40 and ended.request_counts.failed == 0
    assert ended.error_file_id is None and ended.completed_at is not None
    results = output_lines(client, ended.output_file_id)
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(40)]  # input order, each once
    first = results[0]
    assert first["response"]["status_code"] == 200 and first["error"] is None
    assert first["response"]["body"]["object"] == "chat.completion" and first["response"]["body"]["model"] == "m"
    assert first["id"] == first["response"]["request_id"]
    assert sim_stats(sim)["requests"] - before == 40
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.files.retrieve(ended.output_file_id).purpose == "batch_output"


def test_batch_lines_are_recorded_as_usage(client: openai.OpenAI, gw: Proc) -> None:
    def rows() -> float:
        status, raw = http_get(gw.url + "/admin/usage?group_by=model&model=other")
        assert status == 200
        data = orjson.loads(raw)["data"]
        return data[0]["requests"] if data else 0

    before = rows()
    batch = submit(client, jsonl([line(i, model="other") for i in range(7)]))
    assert wait_ended(client, batch.id).status == "completed"
    wait_until(lambda: rows() == before + 7, what="usage records of the batch lines")


def test_a_file_with_errors_gives_a_failed_batch_naming_each_line(client: openai.OpenAI) -> None:
    content = jsonl(
        [
            line(0),
            b'"a string, not an object"',
            line(0),  # duplicate custom_id
            line(3, url="/v1/completions"),
            line(4, model="nope"),
            line(5, stream=True),
            line(6, model="other"),  # a second model
            {"custom_id": "req-7", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}},
        ]
    )
    batch = submit(client, content)
    assert batch.status == "failed" and batch.failed_at is not None
    errors = {e.line: e.code for e in batch.errors.data}
    assert errors == {
        2: "missing_required_parameter",
        3: "duplicate_custom_id",
        4: "mismatched_endpoint",
        5: "model_not_found",
        6: "invalid_value",
        7: "mismatched_model",
        8: "invalid_value",
    }


def test_uploads_are_checked(client: openai.OpenAI, gw: Proc) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("x.jsonl", io.BytesIO(jsonl([line(0)]))), purpose="fine-tune")
    assert info.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("x.jsonl", io.BytesIO(b'{"a": 1}\nnot json\n')), purpose="batch")
    assert "Line 2" in info.value.message
    status, raw = http_post(gw.url + "/v1/files", {"purpose": "batch"})  # JSON, not multipart
    assert status == 400 and orjson.loads(raw)["error"]["code"] == "invalid_content_type"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-000000000000000000000000")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id="file-x", endpoint="/v1/moderations", completion_window="24h")  # type: ignore[arg-type]
    assert info.value.body["param"] == "endpoint"


def test_batches_and_files_belong_to_their_user(client: openai.OpenAI, gw: Proc) -> None:
    batch = submit(client, jsonl([line(0)]))
    stranger = openai_client(gw, new_key(gw, user="stranger", scopes=BATCH_SCOPES))
    with pytest.raises(openai.NotFoundError):
        stranger.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        stranger.files.content(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        stranger.batches.cancel(batch.id)
    assert batch.id not in [b.id for b in stranger.batches.list()]
    no_scope = openai_client(gw, new_key(gw, user="chatter", scopes=["chat:write"]))
    with pytest.raises(openai.PermissionDeniedError):
        no_scope.batches.list()


def test_cancel_keeps_what_finished_and_accounts_for_every_line(client: openai.OpenAI, sim: Proc) -> None:
    sim_control(sim, tokens_per_s=20)  # a line now takes about a second
    try:
        batch = submit(client, jsonl([line(i, max_tokens=20) for i in range(30)]))
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, what="some lines to finish")
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        ended = wait_ended(client, batch.id)
    finally:
        sim_control(sim, tokens_per_s=400)
    assert ended.status == "cancelled" and ended.cancelled_at is not None
    done = output_lines(client, ended.output_file_id)
    failed = output_lines(client, ended.error_file_id)
    assert len(done) >= 2 and all(r["response"]["status_code"] == 200 for r in done)
    assert sorted(r["custom_id"] for r in done + failed) == sorted(f"req-{i}" for i in range(30))
    assert {r["error"]["code"] for r in failed if r["error"]} <= {"batch_cancelled"}
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)  # already ended


def test_lines_left_at_the_deadline_expire(client: openai.OpenAI, sim: Proc) -> None:
    sim_control(sim, tokens_per_s=10)  # 20 lines of ~2 s on 4 slots: far longer than the 2 s window
    try:
        batch = submit(client, jsonl([line(i, max_tokens=20) for i in range(20)]), window="2s")
        ended = wait_ended(client, batch.id, timeout=30)
    finally:
        sim_control(sim, tokens_per_s=400)
    assert ended.status == "expired" and ended.expired_at is not None
    failed = output_lines(client, ended.error_file_id)
    expired = [r for r in failed if r["error"] and r["error"]["code"] == "batch_expired"]
    assert expired and all(r["response"] is None for r in expired)
    done = output_lines(client, ended.output_file_id)
    assert sorted(r["custom_id"] for r in done + failed) == sorted(f"req-{i}" for i in range(20))


def test_batch_lines_are_budgeted_like_any_request(gw: Proc) -> None:
    """A key whose daily budget covers a few lines: the rest end in the error file with budget_exceeded."""
    key = new_key(gw, user="thrifty", scopes=BATCH_SCOPES, budget={"day": 0.05})
    owner = openai_client(gw, key)
    batch = submit(owner, jsonl([line(i) for i in range(20)]))  # each line costs ~0.015 at 1.0 per 1k tokens
    ended = wait_ended(owner, batch.id)
    assert ended.status == "completed"
    failed = output_lines(owner, ended.error_file_id)
    assert 0 < ended.request_counts.completed < 20 and len(failed) == ended.request_counts.failed
    assert {r["response"]["body"]["error"]["code"] for r in failed} == {"budget_exceeded"}
    assert {r["response"]["status_code"] for r in failed} == {429}


def test_a_batch_keeps_within_its_owners_concurrency_limit(gw: Proc) -> None:
    """The owner may have 2 requests in flight: the runner never runs more of their lines at once, so no
    line is refused for concurrency (and none is spent on a refusal)."""
    key = new_key(gw, user="narrow", scopes=BATCH_SCOPES, limits={"concurrency": 2})
    owner = openai_client(gw, key)
    refusals = _metric(gw, 'portcullis_quota_refusals_total{reason="concurrency"}')
    batch = submit(owner, jsonl([line(i, model="other") for i in range(12)]))
    ended = wait_ended(owner, batch.id)
    assert ended.status == "completed" and ended.request_counts.completed == 12
    assert _metric(gw, 'portcullis_quota_refusals_total{reason="concurrency"}') == refusals


def test_interactive_requests_take_slots_from_batch_lines(client: openai.OpenAI, gw: Proc, sim: Proc) -> None:
    """Every slot is held by batch lines (reserve_slots 0, a line lasts ~1 s): an interactive request does
    not wait for one to finish; the newest line gives its slot up and runs again later. The batch still
    ends with every line answered exactly once."""
    sim_control(sim, tokens_per_s=20)
    try:
        batch = submit(client, jsonl([line(i, max_tokens=20) for i in range(16)]))
        wait_until(lambda: _background(gw) == 4, what="batch lines in every slot")

        async def interactive() -> tuple[int, float, dict[str, str]]:
            async with aiohttp.ClientSession() as s:
                started = time.perf_counter()
                body = {"model": "m", "messages": [{"role": "user", "content": "now"}], "max_tokens": 2}
                async with s.post(
                    gw.url + "/v1/chat/completions",
                    data=orjson.dumps(body),
                    headers={"authorization": f"Bearer {ADMIN_KEY}"},
                ) as r:
                    await r.read()
                    return r.status, time.perf_counter() - started, dict(r.headers)

        status, _elapsed, headers = asyncio.run(interactive())
        assert status == 200
        assert int(headers.get("x-portcullis-queue-wait-ms", "0")) < 300  # not a whole line's ~1 s
        assert _metric(gw, "portcullis_background_preempted_total") >= 1
        ended = wait_ended(client, batch.id)
    finally:
        sim_control(sim, tokens_per_s=400)
    assert ended.status == "completed" and ended.request_counts.completed == 16
    assert sorted(r["custom_id"] for r in output_lines(client, ended.output_file_id)) == sorted(
        f"req-{i}" for i in range(16)
    )


def _metric(gw: Proc, name: str) -> float:
    _, raw = http_get(gw.url + "/metrics")
    return sum(float(x.split()[-1]) for x in raw.decode().splitlines() if x.startswith(name))


def _background(gw: Proc) -> float:
    return _metric(gw, "portcullis_background_in_flight{")


def test_in_reject_mode_an_interactive_request_is_served_by_preempting_batch_lines(sim: Proc, module_tmp: Path) -> None:
    """`admission.when_full: reject` refuses when every slot is taken by interactive work; slots held by
    batch lines are not taken: the newest line gives its slot up and the request is served."""
    cfg = gateway_config(
        {"m": [sim.url]},
        admission={"when_full": "reject"},
        batch={"poll_s": 0.1, "lease_s": 3, "reserve_slots": 0},
    )
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    sim_control(sim, tokens_per_s=20)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        batch = submit(client, jsonl([line(i, max_tokens=20) for i in range(12)]))
        wait_until(lambda: _background(gw) == 4, what="batch lines in every slot")
        reply = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "now"}], max_tokens=2
        )
        assert reply.status_code == 200
        assert _metric(gw, "portcullis_background_preempted_total") >= 1
        ended = wait_ended(client, batch.id)
        assert ended.status == "completed" and ended.request_counts.completed == 12
    finally:
        sim_control(sim, tokens_per_s=400)
        gw.stop()
