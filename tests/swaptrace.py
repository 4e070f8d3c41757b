"""An arrival trace of requests for several models (A B A A C ...), sent as it arrives, each on a thread of its own:
what each request got (its status, how long it waited for its model, what went wrong), and what the arrival order
would cost a server that swaps models in that order."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import openai


@dataclass
class Outcome:
    model: str
    status: int
    error: str | None
    wait_ms: int  # x-portcullis-model-wait-ms (0: its model was serving when it came)
    latency_s: float
    attempts: int


def naive_swaps(sequence: list[str], max_models: int = 1) -> int:
    """Model loads beyond the first `max_models` if each request were served in arrival order, one model at a time
    (an LRU of `max_models`): what arrival order costs."""
    loaded: list[str] = []
    swaps = 0
    for model in sequence:
        if model in loaded:
            loaded.remove(model)
        elif len(loaded) >= max_models:
            loaded.pop(0)
            swaps += 1
        loaded.append(model)
    return swaps


def run_trace(
    base_url: str, key: str, sequence: list[str], *, gap_s: float, max_tokens: int = 8, timeout: float = 60
) -> list[Outcome]:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
    outcomes: list[Outcome | None] = [None] * len(sequence)

    def one(i: int, model: str) -> None:
        started = time.monotonic()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=max_tokens
            )
            raw.parse()
            headers = raw.headers
            outcomes[i] = Outcome(
                model,
                raw.status_code,
                None,
                int(headers.get("x-portcullis-model-wait-ms", "0")),
                time.monotonic() - started,
                int(headers.get("x-portcullis-attempts", "1")),
            )
        except openai.APIStatusError as exc:
            outcomes[i] = Outcome(model, exc.status_code, str(exc)[:300], 0, time.monotonic() - started, 0)
        except openai.APIError as exc:
            outcomes[i] = Outcome(model, 0, repr(exc)[:300], 0, time.monotonic() - started, 0)

    threads = []
    for i, model in enumerate(sequence):
        thread = threading.Thread(target=one, args=(i, model))
        thread.start()
        threads.append(thread)
        time.sleep(gap_s)
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o is not None]
