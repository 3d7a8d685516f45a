"""benchmarks/bench_pool_indices.py: its CPU run writes its table; its GPU rows are built the same way."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_pool_indices  # noqa: E402


@pytest.mark.cpu_only  # (on a GPU the suite's pool stage runs the script itself)
def test_cpu_run_writes_the_reference_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_pool_indices, "CPU_BATCHES", (1,))
    assert bench_pool_indices.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "pool_indices.md").read_text()
    assert "CPU (torch references only" in text
    lines = [line for line in text.splitlines() if line.startswith("| encode") or line.startswith("| decode")]
    assert len(lines) == 2 and all(len(line.split("|")) == 7 for line in lines), text


@pytest.mark.cpu_only  # (interpreted kernels on CPU tensors)
def test_gpu_rows_time_both_implementations_and_a_copy(monkeypatch):
    # The GPU branch, with the interpreted kernels and a wall-clock timer standing in for do_bench.
    timed = []
    monkeypatch.setattr(bench_pool_indices, "gpu_ms", lambda fn: timed.append(fn) or bench_pool_indices.cpu_ms(fn, 1))
    rows = bench_pool_indices.rows_for(1, torch.device("cpu"), on_gpu=True)
    assert [row[0] for row in rows] == ["encode", "decode"] and all(len(row) == 10 for row in rows)
    assert len(timed) == 5  # the copy, then torch and Triton for each kind
    assert all(row[7].endswith("x") and row[9].endswith("%") for row in rows)
