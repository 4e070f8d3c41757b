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
from xml.etree import ElementTree

import orjson
import pytest
from procs import ADMIN_KEY, ARTIFACTS, Proc, gateway_config, http_get, http_post, start_gateway


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
    return re.sub(r"\{[a-z_]+\}", "X", path)  # every path parameter, whatever its name


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
    for pattern, route in gateway.pattern_routes:
        method = route.method
        # every group (a parameter's pattern, with one level of group inside at most) is a parameter
        path = re.sub(r"\((?:[^()]|\([^()]*\))*\)", "X", pattern.pattern.strip("^$"))
        routes.add((method, path))
    assert routes == documented, (
        f"undocumented: {routes - documented}; documented but not routed: {documented - routes}"
    )
    for path, ops in doc["paths"].items():
        for op in ops.values():
            error = op["responses"]["default"]["content"]["application/json"]["schema"]
            shape = "AnthropicError" if path.startswith("/v1/messages") else "Error"  # each API's own errors
            assert error == {"$ref": f"#/components/schemas/{shape}"}, path


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(fuzzed: Proc, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = ARTIFACTS / "schemathesis-junit.xml"
    # Ids that exist, so the operations on one reach their handler instead of 404ing on a random id (the raw
    # ids themselves are fuzzed by tests/security/test_http_fuzz.py and test_no_500.py).
    config = tmp_path / "schemathesis.toml"
    ids = _ids(fuzzed)
    config.write_text("[parameters]\n" + "".join(f'"path.{name}" = "{value}"\n' for name, value in ids.items()))
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
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
    # Every operation of the document ran (schemathesis leaves out the one serving the document it loaded), in
    # the coverage and the fuzzing phases alike.
    doc = orjson.loads(http_get(fuzzed.url + "/openapi.json")[1])
    documented = {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops}
    ran = {case.get("name") for case in ElementTree.parse(report).iter("testcase")}
    assert documented - {"GET /openapi.json"} <= ran, documented - ran
    total = len(documented) - 1
    assert f"Operations:       {total} selected / {total} total" in result.stdout
    for phase in ("Coverage", "Fuzzing"):
        assert re.search(rf"{phase} \(in [^)]*\)\s+✅ {total} passed", result.stdout), phase


def _ids(gw: Proc) -> dict[str, str]:
    """A key, a file and a batch of the fuzzing gateway's own, and a model (not the one chat requests use:
    the run may switch it off)."""
    status, raw = http_post(gw.url + "/admin/keys", {"user": "fuzzed", "tier": "free"})
    assert status == 201, raw
    key_id = orjson.loads(raw)["id"]
    body = {"model": "tiny-embed", "input": "x"}
    line = orjson.dumps({"custom_id": "1", "method": "POST", "url": "/v1/embeddings", "body": body})
    boundary = "fuzzboundary"
    form = (
        (
            f'--{boundary}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            "content-type: application/jsonl\r\n\r\n"
        ).encode()
        + line
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, raw = http_post(
        gw.url + "/v1/files", form, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200, raw
    file_id = orjson.loads(raw)["id"]
    status, raw = http_post(
        gw.url + "/v1/batches",
        {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
    )
    assert status == 200, raw
    ids = {"key_id": key_id, "file_id": file_id, "batch_id": orjson.loads(raw)["id"], "model": "tiny-embed"}
    status, raw = http_post(gw.url + "/v1/responses", {"model": "tiny", "input": "x", "max_output_tokens": 2})
    assert status == 200, raw
    return {**ids, "name": "dashboard.js", "response_id": orjson.loads(raw)["id"]}
