"""`portcullis --help` (and any command's arguments) loads no server, database, client or config code: each command
imports what it needs when it runs. (The time it takes is measured in bench/cli_start.py, not here.)"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("sqlalchemy", "alembic", "aiohttp", "uvicorn", "pydantic", "redis", "prometheus_client", "portcullis.config")


def _loaded_after(argv: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from portcullis.cli import build_parser\n"
        "try:\n"
        f"    build_parser().parse_args({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('\\n'.join(sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(done.stderr.split())


def test_help_loads_nothing_heavy() -> None:
    for argv in (["--help"], ["keys", "create", "--help"], ["batch", "submit", "--help"], ["serve", "--help"]):
        loaded = _loaded_after(argv)
        heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
        assert heavy == [], f"portcullis {' '.join(argv)} imported {heavy[:8]}"


def test_a_command_still_runs_with_what_it_imports_late(tmp_path: object) -> None:
    # The late imports are really there: `config check` on a file that is not a config answers with the reason.
    done = subprocess.run(
        [sys.executable, "-m", "portcullis", "config", "check", "/nonexistent/portcullis.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert "/nonexistent/portcullis.yaml" in done.stderr
