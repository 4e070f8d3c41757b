"""The `portcullis` command's entry point (and `python -m portcullis`'s): settles how the interpreter runs
before the command's modules are loaded, then hands over to cli.main."""

from __future__ import annotations

import os
import sys


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        _with_system_malloc()
    from portcullis.cli import main as cli_main

    return cli_main()


def _with_system_malloc() -> None:
    """Run the gateway on glibc's malloc rather than CPython's own small-object allocator: re-execute this
    command with PYTHONMALLOC=malloc (here, before anything is imported: a re-exec costs one bare interpreter
    start). A PYTHONMALLOC already set is kept: PYTHONMALLOC=pymalloc is the way back.

    Why: after a spike of thousands of streams, CPython's allocator keeps every 1 MiB arena in which a single
    object still lives, and the few objects that outlive a spike pin most of them (fewer small objects were
    alive after the spike than before it). Measured with bench/spike.py: 5,000 streams grew RSS by 166 MiB,
    and a minute later CPython's allocator had returned 27% of that, glibc's malloc (trimmed by
    obs/memory.py) 72%. It costs about 5% more CPU per request (bench/RESULTS-malloc-ab.md)."""
    if "PYTHONMALLOC" in os.environ or not sys.executable:
        return
    os.environ["PYTHONMALLOC"] = "malloc"
    try:
        os.execv(sys.executable, [sys.executable, "-m", "portcullis", *sys.argv[1:]])
    except OSError:
        del os.environ["PYTHONMALLOC"]  # could not re-execute: carry on with CPython's allocator
