"""The gateway runs on glibc's malloc (whose free pages it can give back after a spike; CPython's own
allocator keeps arenas pinned: bench/spike.py measures both), unless the operator chose an allocator."""

from __future__ import annotations

import os
from pathlib import Path

import openai
from procs import ADMIN_KEY, Proc, gateway_config, start_gateway


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_serve_runs_on_the_system_allocator_unless_one_was_chosen(sim: Proc, tmp_path: Path) -> None:
    inherited = os.environ.pop("PYTHONMALLOC", None)  # the test runner's own choice must not leak in
    try:
        for chosen, expected in ((None, "malloc"), ("pymalloc", "pymalloc")):
            env = {} if chosen is None else {"PYTHONMALLOC": chosen}
            gw = start_gateway(gateway_config({"tiny": [sim.url]}), tmp_path, env=env)
            try:
                # The process that answers is the one started (re-executed in place, same pid).
                assert _environ(gw.popen.pid).get("PYTHONMALLOC") == expected
                client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
                answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
                assert answer.choices[0].message.content
            finally:
                gw.stop()
    finally:
        if inherited is not None:
            os.environ["PYTHONMALLOC"] = inherited
