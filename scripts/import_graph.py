#!/usr/bin/env python3
"""The package structure of src/portcullis as its imports draw it, and the layering rules it must keep.

    python scripts/import_graph.py            the graph as a Mermaid flowchart (docs/architecture.md holds it)
    python scripts/import_graph.py --check    the rules below; exit 1 naming every import that breaks one

A node is a package (routing, upstream, ...) or a top-level module (exchange, errors, config, ...). Every
`import`/`from ... import` of portcullis code counts: at module level, inside a function, or under
TYPE_CHECKING (a name a module must know is a dependency of its design, whether or not Python loads it
then). tests/architecture/test_import_graph.py keeps both the rules and the picture in the docs true.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "portcullis"

# The stages of the request path, and the packages whose import cycles the architecture forbids.
STAGES = ("identity", "routing", "quota", "safety", "cache", "upstream", "jobs", "api", "app")
LAYERED = ("obs", "routing", "upstream", "safety", "jobs", "app")
# (importer, imported): the upstream stage knows only the response-filter protocol (exchange.py), not the
# stages whose filters it runs; observability knows no stage (each registers its own collector).
FORBIDDEN = [("upstream", s) for s in ("quota", "cache", "safety")] + [("obs", s) for s in STAGES]
# Left out of the picture (still checked): the entry points and commands, which import everything, and the
# leaf modules nearly every package imports (the config model, the error tree, the HTTP wrapper, the wire
# models), whose arrows would hide the ones between the stages.
_HIDDEN = {
    "__main__",
    "__init__",
    "entry",
    "cli",
    "commands",
    "dbcommands",
    "remote",
    "workers",
    "server",
    "edge",
    "sim",
}
_HIDDEN |= {"config", "config_reference", "errors", "http", "protocol"}


def _node(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) → the files (and lines) where it happens."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        source = _node(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "portcullis" or len(parts) < 2:
                    continue
                target = parts[1]
                if target != source:
                    found[(source, target)].append(f"{path.relative_to(ROOT.parents[1])}:{node.lineno}")
    return dict(found)


def _cycles(graph: dict[str, set[str]], nodes: tuple[str, ...]) -> list[list[str]]:
    """Every elementary cycle's first appearance among `nodes` (a depth-first search; the graph is small)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt not in nodes:
                continue
            if nxt == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for start in sorted(nodes):
        walk([start])
    return found


def violations(found: dict[tuple[str, str], list[str]] | None = None) -> list[str]:
    found = edges() if found is None else found
    out = [f"{a} imports {b}: {', '.join(found[(a, b)])}" for a, b in FORBIDDEN if (a, b) in found]
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in found:
        graph[a].add(b)
    for cycle in _cycles(graph, LAYERED):
        steps = "; ".join(f"{a} -> {b} ({found[(a, b)][0]})" for a, b in itertools.pairwise(cycle))
        out.append(f"cycle {' -> '.join(cycle)}: {steps}")
    return out


def mermaid(found: dict[tuple[str, str], list[str]] | None = None) -> str:
    """The graph between the stages, obs and the shared modules they build on (one arrow per pair)."""
    found = edges() if found is None else found
    lines = ["flowchart TD"]
    for a, b in sorted(found):
        if a in _HIDDEN or b in _HIDDEN:
            continue
        lines.append(f"  {a} --> {b}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        problems = violations()
        for line in problems:
            print(line)
        print("import rules: " + ("broken" if problems else "kept"))
        return 1 if problems else 0
    sys.stdout.write(mermaid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
