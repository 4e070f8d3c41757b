"""Every metric the gateway exposes is in the documented list (docs/operations.md), and every documented one is
exposed; labels never carry client input (a model nobody configured is "(unknown)")."""

from __future__ import annotations

import re
from pathlib import Path

import openai
from procs import ADMIN_KEY, Proc, http_get

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _documented() -> tuple[set[str], set[str]]:
    names, opt_in = set(), set()
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| (portcullis_[a-z_]+)(?: / (portcullis_[a-z_]+))? \|", line)
        if match:
            found = {n for n in match.groups() if n}
            names |= found
            if "(opt-in" in line:
                opt_in |= found
    return names, opt_in


def _exposed(gateway: Proc) -> set[str]:
    status, raw = http_get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200
    names = set()
    for line in raw.decode().splitlines():
        if line.startswith("# TYPE portcullis_"):
            _, _, name, kind = line.split()
            names.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return names


def test_the_metric_list_is_complete_and_current(gateway: Proc) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    documented, opt_in = _documented()
    exposed = _exposed(gateway)
    assert not exposed - documented, f"exposed but not documented in docs/operations.md: {sorted(exposed - documented)}"
    missing = documented - opt_in - exposed
    assert not missing, f"documented but not exposed: {sorted(missing)}"


def test_labels_never_carry_client_input(gateway: Proc) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    try:
        client.chat.completions.create(model="made-up-model-x1", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError:
        pass
    _, raw = http_get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert b"made-up-model-x1" not in raw
    assert b'model="(unknown)"' in raw


def test_per_key_series_only_when_the_operator_opts_in(sim: Proc, tmp_path: Path) -> None:
    from procs import gateway_config, start_gateway

    gw = start_gateway(
        gateway_config({"tiny": [sim.url]}, server={"metrics_per_key": True}), tmp_path, ready_path="/readyz"
    )
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        _, raw = http_get(gw.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        text = raw.decode()
        assert 'portcullis_key_requests_total{key_id="00000000000000ad"} 1.0' in text
        assert re.search(r'portcullis_key_tokens_total\{key_id="00000000000000ad",kind="completion"\} [1-9]', text)
    finally:
        gw.stop()
