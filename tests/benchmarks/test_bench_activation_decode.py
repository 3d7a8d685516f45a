"""benchmarks/bench_activation_decode.py: its CPU run writes its table; its GPU rows are built the same way."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_activation_decode  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # (interpreted exp)


@pytest.mark.cpu_only  # (on a GPU the suite's activation stage runs the script itself)
def test_cpu_run_writes_the_torch_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_activation_decode, "CPU_TOKENS", (2,))
    assert bench_activation_decode.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "activation_decode.md").read_text()
    assert "CPU (the torch path only" in text
    lines = [line for line in text.splitlines() if line.startswith(("| gelu", "| silu"))]
    assert len(lines) == 3 and all(len(line.split("|")) == 6 for line in lines), text


@pytest.mark.cpu_only  # (interpreted kernels on CPU tensors)
def test_gpu_rows_time_three_ways_and_a_copy(monkeypatch):
    # The GPU branch, with the interpreted kernels and a wall-clock timer standing in for do_bench.
    timed = []
    monkeypatch.setattr(bench_activation_decode, "gpu_ms",
                        lambda fn: timed.append(fn) or bench_activation_decode.cpu_ms(fn, 1))
    rows = bench_activation_decode.rows_for(1, torch.device("cpu"), on_gpu=True)
    assert [row[0] for row in rows] == ["gelu", "gelu_tanh", "silu"] and all(len(row) == 10 for row in rows)
    assert len(timed) == 1 + 3 * 3  # the copy, then decode, decode + torch and fused for each activation
    assert all(row[6].endswith("x") and row[9].endswith("%") for row in rows)


def test_fused_bytes_count_codes_metadata_and_two_outputs():
    n = 3 * 256 + 1  # four groups, the last partial
    assert bench_activation_decode.fused_nbytes(n) == n // 2 + 4 * 8 + 4 * n
