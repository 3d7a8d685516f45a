"""benchmarks/bench_compiled.py: its CPU run compiles each method and writes one row per method."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_compiled  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.cpu_only  # (on a GPU the suite's compiled stage runs the script itself)
def test_cpu_run_writes_a_row_per_method_with_pack_hook_calls(tmp_path):
    assert bench_compiled.main(["--out", str(tmp_path), "--steps", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in (tmp_path / "compiled.md").read_text().splitlines()
            if line.startswith(("| mlp", "| transformer"))]
    assert len(rows) == 2 * len(bench_compiled.METHODS)
    by_method = {(row[0].strip()[:3], row[1].strip()): row for row in rows}
    calls = lambda workload, method: int(by_method[(workload, method)][4])  # noqa: E731
    packed = lambda workload, method: int(by_method[(workload, method)][5])  # noqa: E731
    # The MLP is compiled whole: traced, its saves take no Python hook (one is the loss's, outside);
    # with Python hooks every one of them does, and both pack the same tensors.
    assert calls("mlp", "tq-4bit traced") <= 1 < calls("mlp", "tq-4bit python")
    assert packed("mlp", "tq-4bit traced") == packed("mlp", "tq-4bit python") > 0
    assert calls("mlp", "exact") == packed("mlp", "exact") == 0
    assert bench_compiled.traced.traceable is bench_compiled.traceable_at_import  # restored
