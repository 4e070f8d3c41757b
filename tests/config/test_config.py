from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from portcullis.config import ConfigError, load_config

GOOD = """
server: {port: 9000}
models:
  llama:
    deployments:
      - {url: "http://127.0.0.1:8080", upstream_model: "llama.gguf", weight: 2}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portcullis.yaml"
    path.write_text(text)
    return path


def test_valid_config_loads(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD), environ={})
    assert config.server.port == 9000
    dep = config.models["llama"].deployments[0]
    assert dep.upstream_model == "llama.gguf" and dep.weight == 2 and dep.kind == "llama_cpp"


def test_every_error_names_file_field_and_reason(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
server: {port: 70000, max_body_byte: 5}
models:
  llama:
    deployments:
      - {url: "ftp://x"}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    problems = dict(info.value.problems)
    assert problems["server.max_body_byte"] == "unknown key"  # a typo is an error, not ignored
    assert "65535" in problems["server.port"]
    assert "http" in problems["models.llama.deployments[0].url"]
    assert str(path) in info.value.render()


def test_env_overrides(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, GOOD), environ={"PORTCULLIS_SERVER__PORT": "9100", "PORTCULLIS_SERVER__ACCESS_LOG": "false"}
    )
    assert config.server.port == 9100 and config.server.access_log is False
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, GOOD), environ={"PORTCULLIS_SERVER__PROT": "1"})
    assert dict(info.value.problems)["server.prot"] == "unknown key"


def test_secrets_come_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    text = f"""
models:
  a: {{deployments: [{{url: "http://h:1", api_key_env: UPSTREAM_KEY}}]}}
  b: {{deployments: [{{url: "http://h:2", api_key_file: "{key_file}"}}]}}
"""
    monkeypatch.setenv("UPSTREAM_KEY", "from-env")
    config = load_config(_write(tmp_path, text), environ={})
    assert config.models["a"].deployments[0].api_key() == "from-env"
    assert config.models["b"].deployments[0].api_key() == "from-file"
    with pytest.raises(ConfigError):  # a key as a literal value is not a field at all
        load_config(_write(tmp_path, 'models: {a: {deployments: [{url: "http://h", api_key: "sk-1"}]}}'), environ={})


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "models: [unclosed\n"), environ={})
    assert "line" in info.value.problems[0][0]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portcullis", *args], capture_output=True, text=True, timeout=60)


def test_config_check_command(tmp_path: Path) -> None:
    ok = _cli("config", "check", str(_write(tmp_path, GOOD)))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text("models: {}\nserver: {colour: blue}\n")
    bad = _cli("config", "check", str(bad_path))
    assert bad.returncode == 1
    assert f"{bad_path}: server.colour: unknown key" in bad.stderr
    assert f"{bad_path}: models:" in bad.stderr


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text("models: {m: {deployments: [{url: 'http://h:1', wieght: 2}]}}\n")
    result = _cli("serve", "--config", str(bad_path))
    assert result.returncode == 1
    assert "models.m.deployments[0].wieght: unknown key" in result.stderr


def test_resilience_sections_and_their_references(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path,
            """
resilience: {retries: 3, breaker: {failures: 2, count: [connect, 429]}}
admission: {when_full: reject, degrade: {ttft_p95_s: 5, max_tokens: 64, model: small, tiers: [free]}}
upstream: {timeouts: {ttft_s: 30}}
models:
  big:
    deployments: [{url: "http://127.0.0.1:8080", max_in_flight: 2}]
    fallbacks: [small]
    timeouts: {idle_s: 5}
  small:
    deployments: [{url: "http://127.0.0.1:8081"}]
""",
        ),
        environ={},
    )
    assert config.resilience.retries == 3 and config.resilience.breaker.count == ["connect", "429"]
    assert config.timeouts_for("big").idle_s == 5 and config.timeouts_for("big").ttft_s == 30
    assert config.timeouts_for("small").idle_s == 30  # the global default
    assert config.degrade_for("big").model == "small"
    for bad, field, reason in (
        ("models: {a: {deployments: [{url: 'http://h:1'}], fallbacks: [nope]}}", "", "'nope' is not another"),
        ("models: {a: {deployments: [{url: 'http://h:1'}], fallbacks: [a]}}", "", "'a' is not another"),
        ("admission: {degrade: {tiers: [gold]}}\nmodels: {a: {deployments: [{url: 'http://h:1'}]}}", "", "gold"),
        (
            "resilience: {breaker: {count: [4xx]}}\nmodels: {a: {deployments: [{url: 'http://h:1'}]}}",
            "resilience.breaker.count[0]",
            "",
        ),
        ("admission: {when_full: drop}\nmodels: {a: {deployments: [{url: 'http://h:1'}]}}", "admission.when_full", ""),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, bad), environ={})
        problems = dict(info.value.problems)
        assert field in problems and reason in problems[field], problems


ROUTED = """
models:
  small:
    aliases: [tiny]
    deployments: [{url: "http://127.0.0.1:8080", cost: {gpu_hour: 1.5, tokens_per_s: 300}, n_ctx: 4096}]
  large:
    deployments: [{url: "http://127.0.0.1:8081", quality: 0.9, tags: [a100]}]
routers:
  auto: {candidates: [small, large], aliases: [smart]}
scheduling:
  off_peak: [{days: mon-fri, from: "19:00", to: "07:00", tz: Europe/Berlin}]
batch: {lease_s: 30, reserve_slots: 2}
"""


def test_routers_aliases_and_schedules_load(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ROUTED), environ={})
    assert config.routers["auto"].candidates == ["small", "large"]
    assert config.models["small"].deployments[0].cost.gpu_hour == 1.5
    assert config.scheduling.off_peak[0].start == "19:00" and config.batch.reserve_slots == 2


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        ("routers:\n  auto: {candidates: [small, nope]}", "", "'nope' is not a configured model"),
        ("routers:\n  small: {candidates: [large]}", "", "routers.small: the name is already models.small"),
        ("routers:\n  auto: {candidates: [small], aliases: [large]}", "", "'large' is already models.large"),
        ("routers:\n  auto: {candidates: [small, small]}", "", "listed twice"),
        ("routers:\n  auto: {candidates: [small], scorer: nonsense}", "", "package.module:function"),
    ],
)
def test_router_mistakes_name_the_field(tmp_path: Path, change: str, path: str, reason: str) -> None:
    base = """
models:
  small: {deployments: [{url: "http://127.0.0.1:8080"}]}
  large: {deployments: [{url: "http://127.0.0.1:8081"}]}
"""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, base + change), environ={})
    assert reason in info.value.render()


def test_deployment_cost_and_spill_mistakes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            _write(tmp_path, 'models:\n  m: {deployments: [{url: "http://h:1", cost: {gpu_hour: 2}}]}'), environ={}
        )
    assert "gpu_hour needs tokens_per_s" in dict(info.value.problems)["models.m.deployments[0].cost"]
    with pytest.raises(ConfigError) as info:
        load_config(
            _write(tmp_path, 'models:\n  m: {spill_to_fallbacks: true, deployments: [{url: "http://h:1"}]}'), environ={}
        )
    assert "no fallbacks to spill to" in info.value.render()
