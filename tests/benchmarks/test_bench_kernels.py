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
    standardized = bench_kernels.new_row("quantize", "bf16", 2, 4096, standardized=True)
    assert plain["traffic_bytes"] == standardized["traffic_bytes"] and not plain["standardized"]
    lines = bench_kernels.table([plain, standardized], ("torch",)).splitlines()[2:]
    assert [line.split("|")[1].strip() for line in lines] == ["quantize", "quantize, standardized"]
