"""Batches prefer off-peak windows yet finish within their completion window: in peak hours a batch whose
deadline leaves enough off-peak time waits for it, one that could not finish otherwise runs now."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, start_gateway, start_sim, wait_until


@pytest.fixture(scope="module")
def gw(module_tmp: Path) -> Iterator[Proc]:
    """The only off-peak window opens two to three hours from now and lasts an hour."""
    sim = start_sim("--slots", "4", "--tokens-per-s", "400", log_dir=module_tmp)
    start = (time.gmtime().tm_hour + 3) % 24
    window = {"days": "daily", "from": f"{start:02d}:00", "to": f"{(start + 1) % 24:02d}:00", "tz": "UTC"}
    cfg = gateway_config(
        {"m": [sim.url]},
        scheduling={"off_peak": [window]},
        batch={"poll_s": 0.1, "reserve_slots": 0, "in_peak": "when_needed"},
    )
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()
    sim.stop()


def _submit(client: openai.OpenAI, window: str) -> str:
    content = b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            }
        )
        + b"\n"
        for i in range(5)
    )
    file = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window=window)  # type: ignore[arg-type]
    return batch.id


def test_peak_hours_hold_a_batch_that_can_wait_and_run_one_that_cannot(gw: Proc) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    patient = _submit(client, "24h")  # a whole off-peak hour before its deadline: it waits for it
    urgent = _submit(client, "90m")  # no off-peak time before its deadline: it must run now
    wait_until(lambda: client.batches.retrieve(urgent).status == "completed", what="the urgent batch")
    # The runner looked at the patient batch on every one of those rounds and left it alone.
    held = client.batches.retrieve(patient)
    assert held.status == "in_progress" and held.request_counts.completed == 0
