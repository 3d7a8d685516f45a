"""benchmarks/targets.py: the verdicts against the benchmark targets, from results written by the suite."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "targets.py"
spec = importlib.util.spec_from_file_location("targets", SCRIPT)
targets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(targets)


def cell(workload, batch, method, step_ms, activation_mb, peak_mb, accounted_mb=None, error=None, forward_peak_mb=None):
    return {"workload": workload, "batch": batch, "method": method, "step_ms": step_ms, "activation_mb": activation_mb,
            "peak_mb": peak_mb, "forward_peak_mb": forward_peak_mb, "accounted_mb": accounted_mb, "error": error}


BF16 = "resnet50 bf16 224px"
GPT = "gpt2-small bf16 seq1024"
FP32 = "resnet50 fp32 224px"
BENCH = {"rows": [
    cell(BF16, 256, "exact", 100.0, 7000.0, 8000.0),
    cell(BF16, 256, "tq-4bit", 109.0, 1900.0, 2900.0),  # +9%: met
    cell(BF16, 256, "exact+graph", 80.0, None, 8000.0),
    cell(BF16, 256, "tq-4bit+graph", 92.0, None, 2900.0),  # +15% against exact captured the same way: not met
    cell(BF16, 64, "exact", 30.0, 2700.0, 3000.0),  # a run from before the bench captured steps
    cell(BF16, 64, "tq-4bit", 80.0, 800.0, 1200.0),
    cell(GPT, 8, "exact", 40.0, 5000.0, 7000.0),
    cell(GPT, 8, "tq-4bit", 90.0, 1100.0, 5000.0, forward_peak_mb=5000.0),  # peaks in its forward pass
    cell(GPT, 8, "checkpoint", 50.0, 2700.0, 4800.0, forward_peak_mb=4000.0),
    cell(GPT, 8, "exact+graph", 35.0, None, 7000.0),
    cell(GPT, 8, "tq-4bit+graph", None, None, None, error="RuntimeError: capture failed"),
    cell(BF16, 256, "tq-2bit", 111.0, 999.0, 2000.0, accounted_mb=990.0),  # 1/7.007: met, just
    cell(BF16, 256, "checkpoint", 140.0, 2500.0, 3200.0),  # 4 bits 0.906x: not clearly below; 2 bits 0.625x
    cell(FP32, 64, "exact", 200.0, 5600.0, 6500.0),
    cell(FP32, 64, "tq-4bit", 230.0, 800.0, 1500.0),
    cell(FP32, 64, "tq-2bit", None, None, None, error="out of memory"),
    cell(FP32, 64, "checkpoint", 260.0, 1200.0, 2000.0),
]}
KERNELS = {"meta": {"device": "cuda"}, "rows": [
    {"kind": "quantize", "dtype": "bf16", "bits": 4, "input_bytes": 16 << 20, "triton_frac": 0.2, "triton_gbps": 800.0},
    {"kind": "quantize", "dtype": "bf16", "bits": 4, "input_bytes": 256 << 20, "triton_frac": 0.84, "triton_gbps": 3480.0},
    {"kind": "dequantize", "dtype": "fp32", "bits": 2, "input_bytes": 256 << 20, "triton_frac": 0.85, "triton_gbps": 3520.0},
    {"kind": "dequantize", "dtype": "fp32", "bits": 4, "input_bytes": 1 << 30, "triton_error": "skipped (time budget)"},
    {"kind": "quantize", "dtype": "bf16", "bits": 2, "input_bytes": 256 << 20, "standardized": True,
     "triton_frac": 0.5, "triton_gbps": 2070.0},
]}


COMPILED = {"gpu": True, "rows": [
    {"workload": f"{GPT}, batch 8", "method": "exact", "target": True, "step_ms": 30.0, "error": None},
    {"workload": f"{GPT}, batch 8", "method": "tq-4bit traced", "target": True, "step_ms": 32.4, "error": None},
    {"workload": f"{GPT}, batch 8", "method": "exact, CUDA graphs", "target": True, "step_ms": 20.0, "error": None},
    {"workload": f"{GPT}, batch 8", "method": "tq-4bit traced, CUDA graphs", "target": True, "step_ms": 23.0,
     "error": None},
    {"workload": f"{BF16}, batch 64", "method": "exact", "target": True, "step_ms": 25.0, "error": None},
    {"workload": f"{BF16}, batch 64", "method": "tq-4bit traced", "target": True, "step_ms": None,
     "error": "BackendCompilerFailed: boom"},
    {"workload": "mlp 8x2048, 16384 rows", "method": "exact", "target": False, "step_ms": 10.0, "error": None},
    {"workload": "mlp 8x2048, 16384 rows", "method": "tq-4bit traced", "target": False, "step_ms": 20.0,
     "error": None},
]}


@pytest.fixture
def rows(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    (tmp_path / "compiled.json").write_text(json.dumps(COMPILED))
    (tmp_path / "bench_kernels.json").write_text(json.dumps(KERNELS))
    table = targets.targets_table(tmp_path)
    return {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in table.splitlines()[4:]}


def test_step_time_is_judged_for_bf16_workloads_only(rows):
    assert rows[("| step time, 4 bits: under +10%", f"{BF16}, batch 256")] == ["+9.0% (109.00 vs 100.00 ms)", "yes |"]
    assert rows[("| step time, 4 bits: under +10%", f"{GPT}, batch 8")] == ["+125.0% (90.00 vs 40.00 ms)", "no |"]
    assert not any(key[1].startswith(FP32) and "step time" in key[0] for key in rows)


def test_a_captured_step_is_judged_against_exact_training_captured_the_same_way(rows):
    assert rows[("| step time, 4 bits, CUDA graph: under +10%", f"{BF16}, batch 256")] == [
        "+15.0% (92.00 vs 80.00 ms)", "no |"]
    assert rows[("| step time, 4 bits, CUDA graph: under +10%", f"{GPT}, batch 8")] == ["not measured", "- |"]
    # Results from before the bench captured steps have no such row.
    assert ("| step time, 4 bits: under +10%", f"{BF16}, batch 64") in rows
    assert ("| step time, 4 bits, CUDA graph: under +10%", f"{BF16}, batch 64") not in rows


def test_a_compiled_step_is_judged_against_exact_training_compiled_for_the_target_workloads_only(rows):
    label = "| step time, 4 bits, torch.compile: under +10%"
    assert rows[(label, f"{GPT}, batch 8")] == ["+8.0% (32.40 vs 30.00 ms)", "yes |"]
    assert rows[(label, f"{BF16}, batch 64")] == ["not measured", "- |"]  # its compressed row failed
    assert not any(key[1].startswith("mlp") for key in rows)


def test_a_compiled_step_with_cuda_graphs_is_judged_where_it_was_measured(rows):
    label = "| step time, 4 bits, torch.compile with CUDA graphs: under +10%"
    assert rows[(label, f"{GPT}, batch 8")] == ["+15.0% (23.00 vs 20.00 ms)", "no |"]  # (not the 30 ms without)
    assert (label, f"{BF16}, batch 64") not in rows  # (no such method there)


def test_activations_use_the_limit_of_their_precision_and_show_the_sessions_count(rows):
    assert rows[("| activations, 2 bits: below 1/7 of exact", f"{BF16}, batch 256")] == [
        "1/7.007 (999 vs 7000 MB; 990 MB by the session's count)", "yes |"]
    assert rows[("| activations, 2 bits: below 1/14 of exact", f"{FP32}, batch 64")] == ["not measured", "- |"]


def test_peak_must_be_clearly_below_checkpointings(rows):
    assert rows[("| peak, 4 bits: at most 0.90x checkpointing's", f"{BF16}, batch 256")] == [
        "0.906x (2900 vs 3200 MB)", "no |"]
    assert rows[("| peak, 2 bits: at most 0.90x checkpointing's", f"{BF16}, batch 256")] == [
        "0.625x (2000 vs 3200 MB)", "yes |"]
    assert rows[("| peak, 2 bits: at most 0.90x checkpointing's", f"{FP32}, batch 64")] == ["not measured", "- |"]


def test_peak_rows_say_which_pass_peaked_where_the_bench_recorded_it(rows):
    assert rows[("| peak, 4 bits: at most 0.90x checkpointing's", f"{GPT}, batch 8")] == [
        "1.042x (5000 vs 4800 MB; peaks in forward / backward)", "no |"]


def test_bandwidth_is_judged_from_256_mib_up(rows):
    bandwidth = {key[1]: value for key, value in rows.items() if key[0].startswith("| bandwidth")}
    assert bandwidth == {"quantize bf16 4-bit, 256 MiB": ["84.0% (3480 GB/s)", "no |"],
                         "dequantize fp32 2-bit, 256 MiB": ["85.0% (3520 GB/s)", "yes |"],
                         "dequantize fp32 4-bit, 1024 MiB": ["skipped (time budget)", "- |"],
                         "quantize, standardized bf16 2-bit, 256 MiB": ["50.0% (2070 GB/s)", "no |"]}


def test_missing_results_are_said_to_be_missing(tmp_path, capsys):
    table = targets.targets_table(tmp_path)
    assert "bench.json missing or unreadable" in table and "no GPU bench_kernels.json" in table
    assert "compiled.json missing or unreadable" in table
    assert targets.main([str(tmp_path)]) == 0 and "## Against the targets" in capsys.readouterr().out


def test_a_cpu_bench_is_said_to_hold_no_gpu_figures(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"gpu": False, "rows": BENCH["rows"]}))
    (tmp_path / "compiled.json").write_text(json.dumps({**COMPILED, "gpu": False}))
    table = targets.targets_table(tmp_path)
    assert "bench.json is from a CPU run: no GPU figures" in table and "step time, 4 bits: under" not in table
    assert "compiled.json is from a CPU run: no GPU figures" in table and "ms)" not in table


def test_a_planned_cell_that_was_never_measured_says_so(tmp_path):
    # A bench stopped by its time limit before the fp32 workload: its rows must read "not measured",
    # not be left out of the table.
    measured = [r for r in BENCH["rows"] if r["workload"] != FP32]
    planned = [[BF16, 64], [BF16, 256], [GPT, 8], [GPT, 32], [FP32, 32], [FP32, 64]]
    (tmp_path / "bench.json").write_text(json.dumps({"gpu": True, "planned": planned, "rows": measured}))
    table = targets.targets_table(tmp_path)
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in table.splitlines()[4:]}
    for workload, batch in ((GPT, 32), (FP32, 32), (FP32, 64)):
        where = [key[0] for key in rows if key[1] == f"{workload}, batch {batch}"]
        assert where, f"{workload} batch {batch} is missing from the table"
        assert all(rows[(label, f"{workload}, batch {batch}")] == ["not measured", "- |"] for label in where)
    assert ("| activations, 2 bits: below 1/14 of exact", f"{FP32}, batch 32") in rows
    # A run that lists its plan captures steps: a missing captured pair is reported too.
    assert rows[("| step time, 4 bits, CUDA graph: under +10%", f"{GPT}, batch 32")] == ["not measured", "- |"]
    # Rows follow the plan's order.
    order = list(dict.fromkeys(key[1] for key in rows
                               if not key[0].startswith(("| bandwidth", "| step time, 4 bits, torch.compile"))))
    assert order == [f"{w}, batch {b}" for w, b in planned]


def test_a_printed_figure_near_its_limit_does_not_read_as_the_other_verdict(tmp_path):
    # Rounded to whole percent or two digits, each of these would print the limit itself beside "no", or a
    # figure past it beside "yes".
    bench = {"gpu": True, "rows": [
        cell(BF16, 8, "exact", 10.0, 700.0, 1000.0),
        cell(BF16, 8, "tq-4bit", 10.97, 200.0, 904.0),  # +9.7%: met
        cell(BF16, 8, "tq-2bit", 10.97, 100.05, 899.0),  # 1/6.997: not met; 0.899x: met
        cell(BF16, 8, "checkpoint", 12.0, 300.0, 1000.0),  # 4 bits: 0.904x, not met
    ]}
    kernels = {"meta": {"device": "cuda"}, "rows": [
        {"kind": "quantize", "dtype": "bf16", "bits": 4, "input_bytes": 256 << 20, "triton_frac": 0.849,
         "triton_gbps": 3500.0}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "bench_kernels.json").write_text(json.dumps(kernels))
    table = targets.targets_table(tmp_path)
    rows = {line.split(" | ")[0]: line.split(" | ")[2:] for line in table.splitlines()[4:]}
    assert rows["| step time, 4 bits: under +10%"] == ["+9.7% (10.97 vs 10.00 ms)", "yes |"]
    assert rows["| activations, 2 bits: below 1/7 of exact"] == ["1/6.997 (100 vs 700 MB)", "no |"]
    assert rows["| peak, 4 bits: at most 0.90x checkpointing's"] == ["0.904x (904 vs 1000 MB)", "no |"]
    assert rows["| peak, 2 bits: at most 0.90x checkpointing's"] == ["0.899x (899 vs 1000 MB)", "yes |"]
    assert rows[f"| {targets.BANDWIDTH_LABEL}"] == ["84.9% (3500 GB/s)", "no |"]


def test_a_planned_compiled_workload_that_was_never_measured_says_so(tmp_path):
    # A compiled stage stopped by the suite's time limit after GPT-2 small's first two methods.
    planned = [{"workload": f"{GPT}, batch 8", "methods": ["exact", "tq-4bit traced", "exact, CUDA graphs",
                                                           "tq-4bit traced, CUDA graphs"]},
               {"workload": f"{BF16}, batch 64", "methods": ["exact", "tq-4bit traced"]}]
    compiled = {"gpu": True, "planned": planned, "rows": COMPILED["rows"][:2]}
    (tmp_path / "compiled.json").write_text(json.dumps(compiled))
    table = targets.targets_table(tmp_path)
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in table.splitlines()[4:]
            if "torch.compile" in line}
    assert rows == {
        ("| step time, 4 bits, torch.compile: under +10%", f"{GPT}, batch 8"): ["+8.0% (32.40 vs 30.00 ms)", "yes |"],
        ("| step time, 4 bits, torch.compile with CUDA graphs: under +10%", f"{GPT}, batch 8"): ["not measured", "- |"],
        ("| step time, 4 bits, torch.compile: under +10%", f"{BF16}, batch 64"): ["not measured", "- |"],
    }
