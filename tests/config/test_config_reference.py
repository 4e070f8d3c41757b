"""The configuration reference is generated from the config model; the committed page must match it."""

from __future__ import annotations

import subprocess
import sys

from portcullis.config import Config
from portcullis.config_reference import reference_path, render


def test_the_committed_reference_is_current() -> None:
    committed = reference_path().read_text()
    assert committed == render(), (
        "docs/config-reference.md is stale: run `portcullis config reference > docs/config-reference.md`"
    )


def test_every_key_is_documented_with_a_meaning() -> None:
    text = render()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    undocumented = [row.split("|")[1].strip() for row in rows if row.rstrip().endswith("|  |")]
    assert not undocumented, f"keys without a comment in config.py: {undocumented}"
    for section in Config.model_fields:
        assert f"\n## {section}\n" in text
    assert "| `hosts.<name>.kind` | router \\| launch | required |" in text
    assert "| `moderation.moderators.<name> (kind: guard_model)` | section |" in text


def test_the_cli_prints_it() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "portcullis", "config", "reference"], capture_output=True, text=True, check=True
    ).stdout
    assert out == render()
