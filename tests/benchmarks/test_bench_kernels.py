"""benchmarks/bench_kernels.py's torch.compile pass, without a GPU: torch.compile, the CUDA calls and the
timer are stood in for, so that what is tested is which compiles are tried and what each row records."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tritonquant.kernels import torch_quantize

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture
def bench_kernels(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(module, "gpu_ms", lambda fn: (fn(), 2.0)[1])
    return module


def quantize_rows(module):
    rows = [module.new_row("quantize", "bf16", 4, size) for size in (4096, 8192)]

    def inputs(row):
        x = torch.randn(row["elements"]).to(torch.bfloat16)
        payload, meta = torch_quantize(x, 4, module.GROUP, False, False, 0, 0)
        return x, payload, meta, torch.empty_like(x), None

    return rows, inputs


def compile_failing_for(monkeypatch, failing_modes):
    calls = []

    def fake_compile(fn, dynamic):
        calls.append(dynamic)

        def run(*args):
            if ("dynamic" if dynamic else "static") in failing_modes:
                raise RuntimeError(f"RuntimeError when making fake tensor call ({dynamic=})")
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_a_failed_dynamic_compile_is_tried_again_with_static_shapes_at_the_largest_size(bench_kernels, monkeypatch,
                                                                                          capsys):
    calls = compile_failing_for(monkeypatch, {"dynamic"})
    rows, inputs = quantize_rows(bench_kernels)
    bench_kernels.compile_rows(rows, "quantize", 4, inputs, copy_gbps=100.0, deadline=None)
    assert calls == [True, False]
    small, largest = rows
    assert small["compiled_error"] == ("compile failed: RuntimeError: RuntimeError when making fake tensor call "
                                       "(dynamic=True) (dynamic shapes; static shapes tried at the largest size only)")
    assert largest["compile_mode"] == "static" and "compiled_error" not in largest
    assert largest["compiled_gbps"] == largest["traffic_bytes"] / 2e6  # the stand-in timer's 2 ms
    assert "torch.compile (dynamic shapes) of the quantize reference (4 bits) failed" in capsys.readouterr().out
    assert "(static shapes)" in bench_kernels.table(rows, ("compiled",))


def test_when_static_shapes_fail_too_every_row_says_why(bench_kernels, monkeypatch):
    calls = compile_failing_for(monkeypatch, {"dynamic", "static"})
    rows, inputs = quantize_rows(bench_kernels)
    bench_kernels.compile_rows(rows, "quantize", 4, inputs, copy_gbps=100.0, deadline=None)
    assert calls == [True, False]
    assert rows[1]["compiled_error"] == ("compile failed: RuntimeError: RuntimeError when making fake tensor call "
                                         "(dynamic=False) (dynamic and static shapes)")
    assert all("compiled_gbps" not in r and r["compiled_error"] for r in rows)


def test_a_working_dynamic_compile_serves_every_size(bench_kernels, monkeypatch):
    calls = compile_failing_for(monkeypatch, set())
    rows, inputs = quantize_rows(bench_kernels)
    bench_kernels.compile_rows(rows, "quantize", 4, inputs, copy_gbps=100.0, deadline=None)
    assert calls == [True]
    assert [r["compile_mode"] for r in rows] == ["dynamic", "dynamic"]


def test_standardized_rows_are_labelled_as_such(bench_kernels):
    plain = bench_kernels.new_row("quantize", "bf16", 2, 4096)
    standardized = bench_kernels.new_row("quantize", "bf16", 2, 4096, standardized="channels")
    one_pair = bench_kernels.new_row("quantize", "bf16", 2, 4096, standardized="one pair")
    assert plain["traffic_bytes"] == standardized["traffic_bytes"] == one_pair["traffic_bytes"]
    assert not plain["standardized"]
    lines = bench_kernels.table([plain, standardized, one_pair], ("torch",)).splitlines()[2:]
    assert [line.split("|")[1].strip() for line in lines] == ["quantize", "quantize, standardized",
                                                              "quantize, standardized, one pair"]
    assert bench_kernels.channel_layout(one_pair) == (1, 1) and bench_kernels.channel_layout(standardized)[1] == 256
    with pytest.raises(ValueError, match="standardized must be one of"):
        bench_kernels.new_row("quantize", "bf16", 2, 4096, standardized=True)


def test_no_compile_starts_with_less_than_the_reserve_left(bench_kernels, monkeypatch):
    # A compile takes tens of seconds: one started 40 s before the deadline would be lost at the stage's
    # timeout, with its time. The retry with static shapes is a second compile and waits on the same check.
    assert bench_kernels.COMPILE_RESERVE_S >= 50
    clock = bench_kernels.time.monotonic
    assert not bench_kernels.compile_fits(clock() + 40)
    assert bench_kernels.compile_fits(clock() + 60) and bench_kernels.compile_fits(None)
    calls = compile_failing_for(monkeypatch, {"dynamic"})
    rows, inputs = quantize_rows(bench_kernels)
    bench_kernels.compile_rows(rows, "quantize", 4, inputs, copy_gbps=100.0, deadline=clock() + 40)
    assert calls == [True], "no static-shapes compile with 40 s left"
    assert rows[1]["compiled_error"] == "skipped (time budget)"


def fake_gpu_run(bench_kernels, monkeypatch, rows):
    """main() on a pretended GPU whose sweep returns ``rows``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_kernels, "environment", lambda use_gpu: {
        "device": "cuda", "gpu": "stand-in", "capability": "9.0", "driver": None, "cuda_runtime": "12.8",
        "torch": torch.__version__, "triton": "3", "date": "today", "copy_buffer_mib": 256, "copy_gbps": 100.0})

    def measure_gpu(args, meta, save):
        save(rows)
        return rows

    monkeypatch.setattr(bench_kernels, "measure_gpu", measure_gpu)


def test_a_gpu_run_without_one_triton_row_exits_1(bench_kernels, monkeypatch, tmp_path, capsys):
    row = bench_kernels.new_row("quantize", "bf16", 4, 4096)
    bench_kernels.mark_skipped(row, ("triton", "heuristic", "torch", "compiled"), "RuntimeError: no kernel image")
    fake_gpu_run(bench_kernels, monkeypatch, [row])
    assert bench_kernels.main(["--out", str(tmp_path)]) == 1
    assert "exit status 1: no Triton kernel row was measured" in capsys.readouterr().out
    assert "RuntimeError: no kernel image" in (tmp_path / "bench_kernels.md").read_text(), "written all the same"


def test_a_gpu_run_with_a_triton_row_exits_0_and_writes_its_files_whole(bench_kernels, monkeypatch, tmp_path):
    row = bench_kernels.new_row("quantize", "bf16", 4, 4096)
    bench_kernels.record(row, "triton", 100.0, lambda: 2.0)
    fake_gpu_run(bench_kernels, monkeypatch, [row])
    replaced = []
    replace = bench_kernels.os.replace

    def logged_replace(source, target):
        replaced.append((Path(source), Path(target)))
        replace(source, target)

    monkeypatch.setattr(bench_kernels.os, "replace", logged_replace)
    assert bench_kernels.main(["--out", str(tmp_path)]) == 0
    # Each file is written whole under another name in the same folder, then renamed over the old one.
    assert {target.name for _, target in replaced} == {"bench_kernels.md", "bench_kernels.json"}
    assert all(source.parent == target.parent == tmp_path and source != target for source, target in replaced)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_kernels.json", "bench_kernels.md"]


def test_each_row_is_also_measured_against_a_copy_of_its_own_bytes(bench_kernels, monkeypatch):
    timed = []
    monkeypatch.setattr(bench_kernels, "gpu_ms", lambda fn: (fn(), timed.append(fn), 0.5)[2])
    quantize = bench_kernels.new_row("quantize", "bf16", 4, 1 << 20)
    dequantize = bench_kernels.new_row("dequantize", "bf16", 4, 1 << 20)  # the same bytes moved
    assert quantize["traffic_bytes"] == dequantize["traffic_bytes"]
    bench_kernels.record(quantize, "triton", 1000.0, lambda: 2.0)
    cache = {}
    for row in (quantize, dequantize):
        bench_kernels.record_same_size_copy(row, torch.device("cpu"), cache)
    assert len(timed) == 1, "one copy per distinct size"
    copy_gbps = 8 * (quantize["traffic_bytes"] // 8) / 0.5e6
    assert dequantize["size_copy_gbps"] == quantize["size_copy_gbps"] == pytest.approx(copy_gbps)
    assert quantize["triton_frac_of_size_copy"] == pytest.approx(quantize["triton_gbps"] / copy_gbps)
    assert "triton_frac_of_size_copy" not in dequantize, "no Triton figure to compare"
    lines = bench_kernels.table([quantize, dequantize], bench_kernels.IMPLS).splitlines()
    column = [cell.strip() for cell in lines[0].split("|")].index("triton %copy, same bytes")
    assert lines[2].split("|")[column].strip() == f"{100 * quantize['triton_frac_of_size_copy']:.1f}%"
    assert lines[3].split("|")[column].strip() == ""


def test_a_copy_that_fails_leaves_the_row_its_other_figures(bench_kernels, monkeypatch):
    def out_of_memory(fn):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_kernels, "gpu_ms", out_of_memory)
    row = bench_kernels.new_row("quantize", "fp32", 8, 1 << 20)
    bench_kernels.record(row, "triton", 1000.0, lambda: 2.0)
    bench_kernels.record_same_size_copy(row, torch.device("cpu"), {})
    assert "triton_gbps" in row and "size_copy_gbps" not in row
    assert row["size_copy_error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "OutOfMemoryError" in bench_kernels.table([row], bench_kernels.IMPLS)


def test_the_graph_column_times_each_call_on_buffers_of_its_own(bench_kernels, monkeypatch):
    """The CUDA graph itself needs a GPU: here ``graph_ms_per_call`` is stood in for, and what is checked
    is what it is given and what the row records."""
    captured = []

    def fake_graph_ms(calls):
        captured.append(calls)
        for call in calls:
            call()
        return 0.25

    launched = []
    monkeypatch.setattr(bench_kernels, "graph_ms_per_call", fake_graph_ms)
    monkeypatch.setattr(bench_kernels, "triton_quantize", lambda x, *args: launched.append(x.data_ptr()))
    rows, inputs = quantize_rows(bench_kernels)
    row = rows[0]  # 4 KiB of input
    l2_bytes = 64 << 10
    bench_kernels.record(row, "graph", 1000.0, lambda: bench_kernels.graph_row_ms(row, inputs, l2_bytes))
    assert len(captured[0]) == 64 and len(set(launched)) == 64, "4 x 64 KiB over 4 KiB inputs, each its own"
    assert row["graph_ms"] == 0.25 and row["graph_gbps"] == pytest.approx(row["traffic_bytes"] / 0.25e6)
    bench_kernels.record_same_size_graph_copy(row, torch.device("cpu"), l2_bytes, {})
    copy_gbps = 8 * (row["traffic_bytes"] // 8) / 0.25e6
    assert row["graph_size_copy_gbps"] == pytest.approx(copy_gbps)
    assert row["graph_frac_of_size_copy"] == pytest.approx(row["graph_gbps"] / copy_gbps)
    lines = bench_kernels.table([row], bench_kernels.IMPLS).splitlines()
    column = [cell.strip() for cell in lines[0].split("|")].index("graph %copy, same bytes")
    assert lines[2].split("|")[column].strip() == f"{100 * row['graph_frac_of_size_copy']:.1f}%"
