"""A dependency audit of the installed environment with pip-audit. The result goes to
test-artifacts/pip-audit.json and the test's output; where the vulnerability service cannot be reached (only
package downloads are on this network), the test says so and is skipped rather than pretending it audited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("PORTCULLIS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def test_no_known_vulnerabilities_in_the_dependencies() -> None:
    audit = Path(sys.executable).parent / "pip-audit"
    result = subprocess.run(
        [str(audit), "--progress-spinner", "off", "--format", "json", "--skip-editable"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "pip-audit.json").write_text(result.stdout or "{}")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.skip(f"pip-audit could not run: {result.stderr.strip()[-500:]}")
    dependencies = report.get("dependencies", [])
    audited = [d for d in dependencies if "skip_reason" not in d]
    print(f"pip-audit: {len(audited)} of {len(dependencies)} dependencies audited")
    if not audited:
        reason = dependencies[0]["skip_reason"] if dependencies else result.stderr.strip()[-300:]
        pytest.skip(f"the vulnerability service is not reachable from here: {reason}")
    vulnerable = {d["name"]: [v["id"] for v in d["vulns"]] for d in audited if d.get("vulns")}
    assert not vulnerable, f"known vulnerabilities: {vulnerable}"
