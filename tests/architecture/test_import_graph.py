"""The package structure keeps its layering, and docs/architecture.md shows the graph as the code draws it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- import-graph: begin -->", "<!-- import-graph: end -->"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module
    spec.loader.exec_module(module)
    return module


def test_the_layering_rules_hold() -> None:
    problems = _script().violations()
    assert problems == [], "\n".join(problems)


def test_the_checker_sees_a_forbidden_import_and_a_cycle() -> None:
    # The rules are not vacuous: an upstream that imports the quota stage, obs importing routing, and a
    # cycle through jobs and app are each named.
    graph = _script()
    found = {
        ("upstream", "quota"): ["src/portcullis/upstream/x.py:1"],
        ("obs", "routing"): ["src/portcullis/obs/x.py:1"],
        ("routing", "obs"): ["src/portcullis/routing/x.py:1"],
        ("jobs", "app"): ["src/portcullis/jobs/x.py:1"],
        ("app", "jobs"): ["src/portcullis/app.py:1"],
    }
    problems = graph.violations(found)
    assert any(p.startswith("upstream imports quota") for p in problems)
    assert any(p.startswith("obs imports routing") for p in problems)
    assert any(p.startswith("cycle app -> jobs -> app") for p in problems)
    assert any(p.startswith("cycle obs -> routing -> obs") for p in problems)


def test_the_docs_show_the_graph_the_code_draws() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lost its import-graph markers"
    shown = text.split(BEGIN, 1)[1].split(END, 1)[0]
    drawn = "```mermaid\n" + _script().mermaid() + "```"
    assert shown.strip() == drawn.strip(), (
        "docs/architecture.md's import graph is stale: replace the block between the markers with the output "
        "of `python scripts/import_graph.py` (inside a ```mermaid fence)"
    )
