from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import Proc, gateway_config, start_gateway, start_sim


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mod")


@pytest.fixture(scope="module")
def sim(module_tmp: Path) -> Iterator[Proc]:
    proc = start_sim("--slots", "4", "--n-ctx", "512", "--model-alias", "tiny-sim.gguf", log_dir=module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    cfg = gateway_config({"tiny": [sim.url], "tiny-embed": [sim.url]}, validation={"max_json_depth": 16})
    proc = start_gateway(cfg, module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()
