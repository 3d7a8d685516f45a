"""benchmarks/bench_compiled.py: its CPU run compiles each method and writes one row per method."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

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
    result = json.loads((tmp_path / "compiled.json").read_text())
    assert result["gpu"] is False and result["env"]["torch"] == torch.__version__
    rows = {(r["workload"][:3], r["method"]): r for r in result["rows"]}
    assert len(rows) == len(result["rows"]) == 2 * len(bench_compiled.METHODS)
    assert all(r["error"] is None and r["step_ms"] > 0 for r in rows.values())
    calls = lambda workload, method: rows[(workload, method)]["python_pack_calls"]  # noqa: E731
    packed = lambda workload, method: rows[(workload, method)]["packed"]  # noqa: E731
    # The MLP is compiled whole: traced, its saves take no Python hook (one is the loss's, outside);
    # with Python hooks every one of them does. Traced, the region also computes its GELUs' outputs
    # again in backward rather than saving them (traced.push_session), so it packs fewer tensors.
    assert calls("mlp", "tq-4bit traced") <= 1 < calls("mlp", "tq-4bit python")
    assert 0 < packed("mlp", "tq-4bit traced") < packed("mlp", "tq-4bit python")
    assert calls("mlp", "exact") == packed("mlp", "exact") == 0
    # The traced ops run once per tensor they pack and once per tensor they restore, their host time
    # timed (the loss, outside the compiled region, is packed by the Python hooks).
    assert rows[("mlp", "tq-4bit traced")]["op_calls"] == 2 * (packed("mlp", "tq-4bit traced")
                                                               - calls("mlp", "tq-4bit traced"))
    for workload in ("mlp", "tra"):
        assert rows[(workload, "tq-4bit traced")]["op_calls"] > 0 and rows[(workload, "tq-4bit traced")]["op_host_ms"] > 0
        assert all(rows[(workload, method)]["op_calls"] == 0 for method in ("exact", "tq-4bit python", "tq-4bit eager"))
    assert bench_compiled.traced.traceable is bench_compiled.traceable_at_import  # restored
    table = (tmp_path / "compiled.md").read_text()
    assert table.count("| mlp") == table.count("| transformer") == len(bench_compiled.METHODS)


def failing_loss(model):
    raise RuntimeError("this workload does not compile")


@pytest.mark.cpu_only
def test_a_failed_row_keeps_its_error_and_the_other_rows_and_sets_the_exit_status(tmp_path, monkeypatch):
    working = bench_compiled.mlp_case(16, 8, torch.device("cpu"), None)
    working.methods = ("exact",)
    broken = bench_compiled.Case("broken", lambda: nn.Linear(4, 4), failing_loss, ("exact",), None, target=True)
    monkeypatch.setattr(bench_compiled, "cases", lambda device: [broken, working])
    assert bench_compiled.main(["--out", str(tmp_path), "--steps", "1"]) == 1
    rows = json.loads((tmp_path / "compiled.json").read_text())["rows"]
    assert [(r["workload"], r["error"]) for r in rows] == [
        ("broken", "RuntimeError: this workload does not compile"), (working.name, None)]
    assert "RuntimeError: this workload does not compile" in (tmp_path / "compiled.md").read_text()


@pytest.mark.parametrize("name, batch, methods", bench_compiled.TARGET_WORKLOADS, ids=lambda v: str(v).split()[0])
def test_the_target_workloads_are_the_benchs(name, batch, methods):
    # (Only built on a GPU: a renamed bench workload would otherwise first fail there.)
    case = bench_compiled.bench_case(name, 1, torch.device("cpu"), methods)
    assert case.target and case.methods == methods and case.autocast_dtype == torch.bfloat16
    assert set(bench_compiled.TRACED_ONLY) <= set(methods) <= set(bench_compiled.TRACED_ONLY + bench_compiled.GRAPHED)
    # A CNN is compiled channels-last, model and images (see the module's docstring); the rest as they are.
    cnn = name.startswith("resnet")
    assert case.name == f"{name}, batch 1" + (", channels-last" if cnn else "")
    model = case.make_model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert bool(convs) == cnn
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not cnn or not all(m.weight.is_contiguous() for m in convs)  # (a 1x1 kernel is both)


@pytest.mark.cpu_only
def test_the_cuda_graph_rows_compile_and_compare_with_exact_compiled_the_same_way(tmp_path, monkeypatch):
    # (On the CPU Inductor skips its CUDA graphs: this checks the rows' plumbing, not their speed.)
    case = bench_compiled.mlp_case(128, 256, torch.device("cpu"), None)  # (128 KiB activations: packed)
    case.methods = bench_compiled.TRACED_ONLY + bench_compiled.GRAPHED
    monkeypatch.setattr(bench_compiled, "cases", lambda device: [case])
    assert bench_compiled.main(["--out", str(tmp_path), "--steps", "1"]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "compiled.json").read_text())["rows"]}
    assert set(rows) == set(case.methods) and all(r["error"] is None for r in rows.values())
    assert rows["tq-4bit traced, CUDA graphs"]["packed"] == rows["tq-4bit traced"]["packed"] > 0
    assert rows["exact, CUDA graphs"]["packed"] == 0
    table, _ = bench_compiled.table(list(rows.values()), cuda=False)
    ratios = {row[1]: row[3] for row in table}
    assert ratios["exact, CUDA graphs"] == ratios["exact"] == "1.00"
    graphed = rows["tq-4bit traced, CUDA graphs"]["step_ms"] / rows["exact, CUDA graphs"]["step_ms"]
    assert ratios["tq-4bit traced, CUDA graphs"] == f"{graphed:.2f}"
