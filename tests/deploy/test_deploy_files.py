"""Every file in deploy/ is parsed and checked: the Dockerfile's stages, user and healthcheck; the compose file
against the Compose Specification's JSON schema; the Kubernetes manifests' probes, drain and selectors; the
Prometheus rules with promtool (syntax and the alerts' own unit tests); the Grafana dashboard. Every metric an
alert or a panel uses must be one a running gateway exposes. No secret ships: compose requires each from the
environment (no default password for PostgreSQL or Redis, and Redis requires one), Kubernetes reads them from a
Secret the operator creates, and a gateway given a template's placeholder as its key secret refuses to start."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from procs import ADMIN_KEY, IN_CI, Proc, free_port, http_get

from portcullis.config import build_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_SCHEMA = Path.home() / ".cache" / "portcullis" / "compose_spec.json"


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in _yaml_docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            found[doc["kind"]] = doc
    return found


def test_every_yaml_and_json_file_parses() -> None:
    files = list(DEPLOY.rglob("*.yml")) + list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.json"))
    assert len(files) >= 10
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert _yaml_docs(path), path


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's variables that come from a Secret: name → secretKeyRef."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}


def test_the_gateway_configs_are_valid_configs() -> None:
    build_config(yaml.safe_load((DEPLOY / "portcullis.yaml").read_text()), source="deploy/portcullis.yaml", environ={})
    manifests = _manifests()
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    # The pod's environment: the operator's Secret holds the database and Redis URLs (with their passwords).
    environ = {name: f"value-of-{name}" for name in _secret_refs(container)}
    environ["PORTCULLIS_STORE__DATABASE_URL"] = "postgresql+asyncpg://portcullis:pw@postgres:5432/portcullis"
    environ["PORTCULLIS_STORE__REDIS_URL"] = "redis://:pw@redis:6379/0"
    config = build_config(
        yaml.safe_load(manifests["ConfigMap"]["data"]["portcullis.yaml"]), source="configmap.yaml", environ=environ
    )
    assert config.store.redis_url and config.store.database_url.startswith("postgresql")


def test_the_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())  # continuation lines joined
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f for f in froms)
    final = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    users = [rest for op, rest in instructions[final:] if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ops = {op for op, _ in instructions[final:]}
    assert {"HEALTHCHECK", "EXPOSE", "ENTRYPOINT"} <= ops
    assert any(op == "COPY" and "--from=build" in rest for op, rest in instructions[final:])
    for op, rest in instructions:
        if op == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (DEPLOY.parent / source).exists(), f"COPY {source}: not in the repository"


def _compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as docker-compose 1.29.2 on PyPI ships it (cached)."""
    if not COMPOSE_SCHEMA.exists():
        COMPOSE_SCHEMA.parent.mkdir(parents=True, exist_ok=True)
        work = COMPOSE_SCHEMA.parent / "compose-wheel"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "docker-compose==1.29.2", "-d", str(work)],
            capture_output=True,
            text=True,
        )
        wheels = list(work.glob("docker_compose-*.whl"))
        if result.returncode != 0 or not wheels:
            message = f"cannot fetch the compose schema from PyPI: {result.stderr.strip()[-300:]}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        with zipfile.ZipFile(wheels[0]) as wheel:
            COMPOSE_SCHEMA.write_bytes(wheel.read("compose/config/compose_spec.json"))
        shutil.rmtree(work, ignore_errors=True)
    return json.loads(COMPOSE_SCHEMA.read_text())


def test_the_compose_file_follows_the_compose_specification() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert "compose-spec/compose-spec" in text.splitlines()[0]  # the schema it documents
    compose = yaml.safe_load(text)
    jsonschema.Draft201909Validator(_compose_schema()).validate(compose)
    services = compose["services"]
    gateways = [name for name in services if name.startswith("gateway")]
    assert len(gateways) == 2 and {"redis", "postgres", "llama-server"} <= set(services)
    for name in gateways:
        service = services[name]
        env = service["environment"]
        assert "PORTCULLIS_KEY_SECRET" in env and "@redis:6379" in env["PORTCULLIS_STORE__REDIS_URL"]
        assert "postgres:5432" in env["PORTCULLIS_STORE__DATABASE_URL"]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
    llama = " ".join(services["llama-server"]["command"])
    assert "--metrics" in llama and "--api-key" in llama and "--parallel" in llama


def test_the_kubernetes_manifests_drain_probe_and_select_alike() -> None:
    m = _manifests()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= set(m)
    deployment = m["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert m["Service"]["spec"]["selector"].items() <= labels.items()
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    config = yaml.safe_load(m["ConfigMap"]["data"]["portcullis.yaml"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config["server"]["shutdown_timeout_s"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    refs = _secret_refs(container)
    required = {"PORTCULLIS_KEY_SECRET", "PORTCULLIS_STORE__DATABASE_URL", "PORTCULLIS_STORE__REDIS_URL"}
    required.add("LLAMA_API_KEY")
    assert required <= set(refs) and {r["name"] for r in refs.values()} == {"portcullis-secrets"}
    assert not any(refs[name].get("optional") for name in required)  # a missing one keeps the pod from starting
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"] and hpa["minReplicas"] >= 2
    assert any(x.get("pods", {}).get("metric", {}).get("name") == "portcullis_queue_depth" for x in hpa["metrics"])


# What a template's placeholder looks like: the secret the Kubernetes example shipped until issue 17, and others.
PLACEHOLDERS = [
    "replace-with-64-hex-chars-from-openssl-rand-hex-32",
    "change-me-change-me-change-me-change-me",
    "CHANGEME_to_a_long_random_secret_of_32_chars",
    "<your-key-secret-of-at-least-32-characters>",
]
# Variable names that hold secrets in the deployment files.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|API_KEY|ADMIN_KEY|TOKEN|REDISCLI_AUTH")


def test_compose_requires_every_secret_and_gives_no_default_password() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    # ${VAR:?message} makes compose refuse to start without VAR; ${VAR:-default} would ship the default.
    for name, default in re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", text):
        assert not (SECRET_NAME.search(name) and default), f"${{{name}}} defaults to {default!r}"
    for name in re.findall(r"\$\{([A-Z_]+)\}", text):
        assert not SECRET_NAME.search(name), f"${{{name}}} may be empty: use ${{{name}:?...}}"
    services = yaml.safe_load(text)["services"]
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert {"PORTCULLIS_KEY_SECRET", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "LLAMA_API_KEY"} <= required
    for service in services.values():
        for name, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(name) and name != "PORTCULLIS_BOOTSTRAP_ADMIN_KEY":
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), f"{name}: {value!r} is not required"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_redis_requires_a_password_and_the_gateways_send_it() -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    # The password reaches redis-server from the environment, and the healthcheck's redis-cli through REDISCLI_AUTH.
    assert re.search(r"--requirepass \"\$\$REDISCLI_AUTH\"", command), command
    assert redis["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    for name in ("gateway-1", "gateway-2"):
        url = services[name]["environment"]["PORTCULLIS_STORE__REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?"), url
    # The database's URL in the shipped configuration carries no password (the environment's URL does).
    config = yaml.safe_load((DEPLOY / "portcullis.yaml").read_text())
    assert ":" not in config["store"]["database_url"].split("://", 1)[1].split("@", 1)[0]


def test_no_secret_ships_in_the_kubernetes_manifests() -> None:
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in _yaml_docs(path):
            assert doc["kind"] != "Secret" or not (doc.get("data") or doc.get("stringData")), f"{path}: a Secret"
    config = yaml.safe_load(_manifests()["ConfigMap"]["data"]["portcullis.yaml"])
    assert "database_url" not in config.get("store", {}) and "redis_url" not in config.get("store", {})


def test_the_key_secret_check_refuses_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    from portcullis.identity.keys import KeySecretMissing, key_secret

    models = {"models": {"m": {"deployments": [{"url": "http://127.0.0.1:1"}]}}}
    config = build_config(models, source="test", environ={})
    for placeholder in PLACEHOLDERS:
        assert len(placeholder) >= 32  # each passes the length check: the words are what give it away
        monkeypatch.setenv("PORTCULLIS_KEY_SECRET", placeholder)
        with pytest.raises(KeySecretMissing, match="placeholder"):
            key_secret(config)
    monkeypatch.setenv("PORTCULLIS_KEY_SECRET", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
    assert len(key_secret(config)) == 64  # a generated secret passes


def test_a_gateway_given_a_placeholder_key_secret_refuses_to_start(tmp_path: Path) -> None:
    """The shipped configuration, run as a real process with the old Kubernetes example's placeholder secret."""
    config = yaml.safe_load((DEPLOY / "portcullis.yaml").read_text())
    config["store"] = {"database_url": f"sqlite+aiosqlite:///{tmp_path}/gw.db", "auto_migrate": True}
    config["cache"] = {"backend": "memory"}
    port = free_port()
    config["server"].update(host="127.0.0.1", port=port)
    path = tmp_path / "portcullis.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PORTCULLIS_KEY_SECRET": PLACEHOLDERS[0], "LLAMA_API_KEY": "x"}
    for name in ("PORTCULLIS_STORE__REDIS_URL", "PORTCULLIS_STORE__DATABASE_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "portcullis", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        started = False
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                started = http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
            except OSError:
                pass
            if started:
                break
            time.sleep(0.05)
        assert not started, "the gateway started with a placeholder key secret"
        assert proc.wait(5) == 1
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "PORTCULLIS_KEY_SECRET" in output and "placeholder" in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("promtool is missing (Debian: prometheus); scripts/test installs it")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_promtool_checks_the_rules_and_runs_their_tests() -> None:
    promtool = _promtool()
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True
    )
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_names_a_runbook_that_exists() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 10
    for alert in alerts:
        runbook = alert["annotations"]["runbook"]
        assert (DEPLOY.parent / runbook).exists(), f"{alert['alert']}: {runbook} does not exist"


def _metric_names(text: str) -> set[str]:
    names = set(re.findall(r"\bportcullis_[a-z_]+\b", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names if not n.startswith("portcullis:")}


def test_the_dashboard_and_the_alerts_use_metrics_the_gateway_exposes(gateway: Proc) -> None:
    import openai

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
    )
    status, raw = http_get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200
    exposed = set()
    for line in raw.decode().splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            exposed |= {name, f"{name}_total"}
        elif line and not line.startswith("#"):
            exposed.add(re.sub(r"_(bucket|count|sum)$", "", line.split("{")[0].split()[0]))
    dashboard = json.loads((DEPLOY / "grafana" / "portcullis.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 12 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = _metric_names("\n".join(exprs)) | _metric_names((DEPLOY / "prometheus" / "alerts.yml").read_text())
    missing = sorted(used - exposed)
    assert not missing, f"not exposed by the gateway: {missing}"
