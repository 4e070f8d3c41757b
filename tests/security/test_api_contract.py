"""The gateway's OpenAPI document covers every route, and a schemathesis run against a live gateway (every
operation, generated requests valid and invalid) finds no server error and no answer that breaks the
document: status codes, content types and bodies (errors always in OpenAI's shape)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from procs import ADMIN_KEY, Proc, gateway_config, http_get, start_gateway

ARTIFACTS = Path(os.environ.get("PORTCULLIS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def fuzzed(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config(
        {"tiny": [sim.url], "tiny-embed": [sim.url]},
        resilience={"breaker": {"failures": 1000}},
        # Generated requests include bad credentials: throttling their address would turn the rest into 429s.
        auth={"failed_auth_per_minute": 1_000_000},
    )
    gw = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield gw
    gw.stop()


def _template(path: str) -> str:
    for name in ("model", "file_id", "batch_id", "key_id"):
        path = path.replace(f"{{{name}}}", "X")
    return path


def test_the_document_covers_every_route(fuzzed: Proc) -> None:
    from portcullis.app import Gateway
    from portcullis.config import build_config

    status, raw = http_get(fuzzed.url + "/openapi.json")
    assert status == 200
    doc = orjson.loads(raw)
    assert doc["openapi"].startswith("3.1") and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    documented = {(method.upper(), _template(path)) for path, ops in doc["paths"].items() for method in ops}
    gateway = Gateway(build_config(gateway_config({"tiny": ["http://127.0.0.1:1"]}), source="(test)", environ={}))
    routes = {(method, path) for method, path in gateway.routes}
    for method, pattern, _, _ in gateway.pattern_routes:
        path = (
            pattern.pattern.strip("^$")
            .replace("(.+)", "X")
            .replace("([A-Za-z0-9_-]+)", "X")
            .replace("([0-9a-f]+)", "X")
        )
        routes.add((method, path))
    assert routes == documented, (
        f"undocumented: {routes - documented}; documented but not routed: {documented - routes}"
    )
    for path, ops in doc["paths"].items():
        for op in ops.values():
            error = op["responses"]["default"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/Error"}, path


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(fuzzed: Proc, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = ARTIFACTS / "schemathesis-junit.xml"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        fuzzed.url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        os.environ.get("PORTCULLIS_FUZZ_EXAMPLES", "50"),
        "--generation-deterministic",
        "--request-timeout",
        "20",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    # In a scratch directory: schemathesis keeps a cache where it runs.
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    print(result.stdout[-6000:])  # the run's summary is the report (and the JUnit file)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert re.search(r"(\d+) generated, \1 passed", result.stdout)  # every generated case passed every check
    assert "Rate limited" not in result.stdout  # the run reached the handlers, not only the throttle
