import contextlib
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tritonquant.bench import (METHODS, checkpointed_blocks, cpu_peak_bytes, max_batch_in_budget, method_context,
                               run_bench)
from tritonquant.models import SmallCNN


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert run_bench(quick=True, out=str(out), steps=1) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_bench_writes_markdown_and_json_with_environment(quick_results):
    out, data = quick_results
    assert data["gpu"] is False
    assert {"date", "torch", "triton", "python", "device"} <= set(data["env"])
    assert "saved MB (accounting)" in (out / "bench.md").read_text()
    assert len(data["rows"]) == 2 * 2 * len(METHODS)  # two workloads, two batch sizes each
    assert len(data["planned"]) == 2 * 2


def test_quick_bench_saved_bytes_fall_with_bits(quick_results):
    _, data = quick_results
    for workload in {r["workload"] for r in data["rows"]}:
        for batch in {r["batch"] for r in data["rows"] if r["workload"] == workload}:
            saved = {r["method"]: r["saved_mb"] for r in data["rows"] if r["workload"] == workload and r["batch"] == batch}
            assert saved["tq-2bit"] < saved["tq-4bit"] < saved["tq-8bit"] < saved["exact"]
            assert saved["checkpoint"] < saved["exact"]
            assert saved["checkpoint+tq-4bit"] < saved["checkpoint"], "what checkpointing keeps, compressed"
            assert saved["save_on_cpu"] is None  # nothing to move on a CPU


def test_compressed_rows_say_where_their_accounted_bytes_are(quick_results):
    """The JSON's breakdown adds up to the accounted total, per module type, and names the widths used."""
    _, data = quick_results
    for row in data["rows"]:
        if "tq-" not in row["method"]:  # (checkpoint+tq-4bit compresses too)
            assert "accounting" not in row
            continue
        accounting = row["accounting"]
        assert accounting["packed_mb"] + accounting["passed_mb"] == pytest.approx(row["saved_mb"])
        by_type = accounting["by_module_type"]
        assert sum(t["packed_mb"] for t in by_type.values()) == pytest.approx(accounting["packed_mb"])
        assert sum(t["passed_mb"] for t in by_type.values()) == pytest.approx(accounting["passed_mb"])
        assert sum(t["packed_tensors"] for t in by_type.values()) == accounting["packed_tensors"] > 0
        width = int(row["method"].split("tq-")[1][0])  # tq-2bit, checkpoint+tq-4bit, ...
        assert width in {bits for t in by_type.values() for bits in t["bits"]}, (row["method"], by_type)


def test_quick_bench_compressed_steps_peak_below_exact(quick_results):
    """On the CPU the torch backend packs; its temporaries must not cost more than compression saves."""
    _, data = quick_results
    for workload in {r["workload"] for r in data["rows"]}:
        for batch in {r["batch"] for r in data["rows"] if r["workload"] == workload}:
            peak = {r["method"]: r["peak_mb"] for r in data["rows"]
                    if r["workload"] == workload and r["batch"] == batch}
            assert peak["tq-4bit"] < 0.8 * peak["exact"], (workload, batch, peak)
            assert peak["tq-2bit"] < peak["tq-4bit"], (workload, batch, peak)


def test_cpu_peak_bytes_counts_what_is_allocated_at_once():
    def in_turn():
        first = torch.ones(1 << 20)
        del first
        second = torch.ones(1 << 20)
        del second

    def together():
        first, second = torch.ones(1 << 20), torch.ones(1 << 20)
        del first, second

    assert cpu_peak_bytes(in_turn) == 4 << 20
    assert cpu_peak_bytes(together) == 8 << 20


def test_cpu_peak_bytes_keeps_the_profilers_native_lines_out_of_stderr_but_not_the_steps_own():
    # torch 2.13's profiler prints "profiler_start" and "profiler_stop" from C++ on stderr; the demo's and
    # the bench's tables must not be interleaved with them. What the step writes must still get through.
    script = ("import sys, torch\n"
              "from tritonquant.bench import cpu_peak_bytes\n"
              "def step():\n"
              "    print('from the step', file=sys.stderr, flush=True)\n"
              "    return torch.ones(1 << 16).sum()\n"
              "assert cpu_peak_bytes(step) > 0\n"
              "print('after', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "profiler_start" not in proc.stderr and "profiler_stop" not in proc.stderr, proc.stderr
    assert "from the step" in proc.stderr and "after" in proc.stderr


def test_cpu_peak_bytes_runs_the_step_under_another_profiler_and_lets_its_errors_through():
    ran = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as outer:
        assert cpu_peak_bytes(lambda: ran.append(torch.ones(4))) is None
    assert len(ran) == 1, "the step runs"
    assert any(event.name == "aten::ones" for event in outer.events()), "the outer profiler is undisturbed"

    def failing():
        raise ValueError("the step failed")

    with pytest.raises(ValueError, match="the step failed"):
        cpu_peak_bytes(failing)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    run_bench(quick=True, steps=1, plots=str(tmp_path))
    assert (tmp_path / "memory_vs_batch.png").stat().st_size > 1000
    assert (tmp_path / "step_time_vs_bits.png").stat().st_size > 1000


def test_max_batch_in_budget_extrapolates_linearly():
    # 100 MB fixed + 10 MB per sample: 1000 MB fits 90 samples.
    assert max_batch_in_budget({8: 180.0, 16: 260.0}, 1000.0) == 90
    assert max_batch_in_budget({8: 180.0}, 1000.0) is None
    assert max_batch_in_budget({8: 200.0, 16: 200.0}, 1000.0) is None


def test_checkpointed_blocks_are_restored_and_gradients_match():
    torch.manual_seed(0)
    model = SmallCNN(width=8, blocks=2)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    original = model.blocks
    model.zero_grad()
    with checkpointed_blocks(model):
        assert model.blocks is not original
        model(x).sum().backward()
    assert model.blocks is original
    for got, want in zip((p.grad for p in model.parameters()), expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        method_context("zip", SmallCNN(), on_gpu=False)


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    import tritonquant.bench as bench

    measured = bench.measure_cpu

    def measure_failing_for_2_bits(model, workload, method, batch_size, steps):
        if method == "tq-2bit":
            raise RuntimeError("kernel broke\nsecond line")
        return measured(model, workload, method, batch_size, steps)

    monkeypatch.setattr(bench, "measure_cpu", measure_failing_for_2_bits)
    # Every cell is written, and the exit status says the run is broken (the GPU suite's stage then fails).
    assert run_bench(quick=True, out=str(tmp_path), steps=1) == 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * len(METHODS)
    assert {r["error"] for r in rows if r["method"] == "tq-2bit"} == {"RuntimeError: kernel broke"}
    assert all(r["error"] is None and r["saved_mb"] > 0 for r in rows if r["method"] in ("exact", "tq-4bit"))
    assert "RuntimeError: kernel broke" in (tmp_path / "bench.md").read_text()
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(
        f"exit status 1: 4 of {4 * len(METHODS)} cells failed with an error other than out of memory")


def test_cells_out_of_memory_are_results_not_failures(tmp_path, monkeypatch, capsys):
    import tritonquant.bench as bench

    def measure_out_of_memory_at_2_bits(model, workload, method, batch_size, steps):
        if method == "tq-2bit":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"saved_mb": 1.0, "peak_mb": 1.0, "step_ms": 1.0}

    monkeypatch.setattr(bench, "measure_cpu", measure_out_of_memory_at_2_bits)
    assert run_bench(quick=True, out=str(tmp_path), steps=1) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["error"] for r in rows if r["method"] == "tq-2bit"} == {"out of memory"}
    assert "exit status" not in capsys.readouterr().out


def test_every_workloads_smallest_batch_is_measured_first_and_the_plan_is_written(tmp_path, monkeypatch):
    # A run stopped by its time limit must have measured every workload (every target) at one batch.
    import tritonquant.bench as bench

    measured, written = [], []

    def measure(model, workload, method, batch_size, steps):
        if (workload.name, batch_size) not in measured:
            measured.append((workload.name, batch_size))
        return {"saved_mb": 1.0, "peak_mb": 1.0, "step_ms": 1.0}

    write_results = bench._write_results

    def logged_write_results(results, *args, **kwargs):
        written.append(len(results))
        return write_results(results, *args, **kwargs)

    monkeypatch.setattr(bench, "measure_cpu", measure)
    monkeypatch.setattr(bench, "_write_results", logged_write_results)
    assert run_bench(quick=True, out=str(tmp_path), steps=1) == 0
    (cnn, small_cnn, large_cnn), (lm, small_lm, large_lm) = [(w.name, *w.batch_sizes) for w in bench.quick_workloads()]
    assert measured == [(cnn, small_cnn), (lm, small_lm), (cnn, large_cnn), (lm, large_lm)]
    per_batch = len(METHODS)
    assert written == [per_batch, 2 * per_batch, 3 * per_batch, 4 * per_batch, 4 * per_batch]  # after every batch
    data = json.loads((tmp_path / "bench.json").read_text())
    plan = [[cnn, small_cnn], [cnn, large_cnn], [lm, small_lm], [lm, large_lm]]
    assert data["planned"] == plan
    # The table keeps the order of workloads, then batches.
    assert list(dict.fromkeys((r["workload"], r["batch"]) for r in data["rows"])) == [tuple(c) for c in plan]


def test_the_driver_is_looked_up_once_per_process(monkeypatch):
    # environment() is written with the results after every batch: nvidia-smi must not run each time.
    import subprocess

    import tritonquant.bench as bench

    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="550.54.15\n", stderr="")

    clear = getattr(bench.nvidia_driver, "cache_clear", lambda: None)
    clear()
    monkeypatch.setattr(subprocess, "run", fake_run)
    try:
        assert [bench.nvidia_driver() for _ in range(3)] == ["550.54.15"] * 3
        assert len(calls) == 1
    finally:
        clear()  # (the stand-in's answer must not outlive this test)


def test_an_interrupted_sweep_writes_what_it_measured(tmp_path, monkeypatch):
    # The GPU suite stops a stage past its time limit with SIGINT: the cells measured so far, and their
    # plots, must still be written, whole.
    import tritonquant.bench as bench

    calls = []

    def measure_until_interrupted(model, workload, method, batch_size, steps):
        calls.append(method)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"saved_mb": 1.0, "step_ms": 1.0}

    monkeypatch.setattr(bench, "measure_cpu", measure_until_interrupted)
    assert run_bench(quick=True, out=str(tmp_path), steps=1, plots=str(tmp_path)) == 130
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert calls == ["exact", "tq-4bit", "tq-2bit"]  # what the targets read is measured first
    assert [r["method"] for r in rows] == calls[:2]
    plots = ["memory_vs_batch.png", "step_time_vs_bits.png"] if importlib.util.find_spec("matplotlib") else []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", *plots]  # (no partial file)


def test_gpu_table_gives_ratios_to_exact_and_the_accounted_bytes_of_compressed_rows():
    from tritonquant.bench import _table

    def row(method, batch, peak, activation, accounted, ms):
        return {"workload": "w", "batch": batch, "method": method, "peak_mb": peak, "activation_mb": activation,
                "accounted_mb": accounted, "step_ms": ms, "error": None}

    results = [row("exact", 8, 1000.0, 800.0, None, 20.0), row("tq-4bit", 8, 500.0, 200.0, 190.0, 25.0),
               row("exact", 16, 1800.0, 1600.0, None, 40.0), row("tq-4bit", 16, 700.0, 400.0, 380.0, 45.0),
               {"workload": "w", "batch": 16, "method": "tq-2bit", "error": "out of memory"}]
    rows, headers = _table(results, on_gpu=True, budget_mb=4096.0)
    assert headers[3:] == ["peak MB", "x exact", "activation MB", "x exact", "accounted MB", "step ms", "x exact",
                           "max batch in 4 GB"]
    assert all(len(r) == len(headers) for r in rows)
    cells = {(r[1], r[2]): r[3:] for r in rows}
    # Peaks at 8 and 16: tq-4bit 300 MB + 25 MB a sample, 151 samples in 4096 MB; exact 200 + 100, 38.
    assert cells[(8, "tq-4bit")] == ["500", "0.50", "200", "0.25", "190", "25.0", "1.25", "151"]
    assert cells[(16, "exact")] == ["1800", "1.00", "1600", "1.00", "-", "40.0", "1.00", "38"]
    assert cells[(16, "tq-2bit")] == ["out of memory"] + [""] * 7


def test_gpu_results_give_eager_rows_a_phase_table_and_leave_captured_and_failed_rows_out(tmp_path):
    import tritonquant.bench as bench

    phases = {"forward": 10.0, "backward": 20.0, "forward_host": 30.5, "backward_host": 4.25}
    rows = [
        {"workload": "w", "batch": 2, "method": "exact", "peak_mb": 10.0, "forward_peak_mb": 9.0,
         "activation_mb": 8.0, "accounted_mb": None, "step_ms": 30.0, "phases_ms": phases, "error": None},
        {"workload": "w", "batch": 2, "method": "exact+graph", "peak_mb": 10.0, "activation_mb": None,
         "accounted_mb": None, "step_ms": 25.0, "error": None},
        {"workload": "w", "batch": 2, "method": "tq-4bit", "error": "RuntimeError: broken"},
    ]
    bench._write_results(rows, [("w", 2)], on_gpu=True, budget_gb=16.0, out=str(tmp_path), verbose=False)
    phase_section = (tmp_path / "bench.md").read_text().split("Eager steps by phase")[1]
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in phase_section.splitlines()
             if line.startswith("|")]
    assert cells[0] == bench.PHASE_HEADERS
    assert cells[2:] == [["w", "2", "exact", "10.0", "30.5", "20.0", "4.2"]]  # (forward, then backward: GPU, host)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["phases_ms"] == phases


def test_gpu_table_compares_captured_steps_with_exact_training_captured_the_same_way():
    from tritonquant.bench import _table

    def row(method, peak, activation, ms):
        return {"workload": "w", "batch": 8, "method": method, "peak_mb": peak, "activation_mb": activation,
                "accounted_mb": None, "step_ms": ms, "error": None}

    results = [row("exact", 1000.0, 800.0, 40.0), row("tq-4bit", 500.0, 200.0, 80.0),
               row("exact+graph", 1000.0, None, 20.0), row("tq-4bit+graph", 520.0, None, 22.0)]
    rows, headers = _table(results, on_gpu=True, budget_mb=4096.0)
    cells = {r[2]: r[3:] for r in rows}
    assert cells["tq-4bit"][:7] == ["500", "0.50", "200", "0.25", "-", "80.0", "2.00"]
    # No activation memory for a captured step (forward and backward are one graph); ratios to exact+graph.
    assert cells["tq-4bit+graph"][:7] == ["520", "0.52", "-", "-", "-", "22.0", "1.10"]
    assert cells["exact+graph"][:7] == ["1000", "1.00", "-", "-", "-", "20.0", "1.00"]


def test_captured_methods_are_gpu_only_and_compress_at_their_width():
    from tritonquant.bench import GRAPH_METHODS, compresses, methods_for

    assert methods_for(on_gpu=False) == METHODS
    assert methods_for(on_gpu=True) == METHODS + GRAPH_METHODS
    assert [compresses(m) for m in GRAPH_METHODS] == [False, True]
    model = SmallCNN(width=16, blocks=1)
    context_factory, _ = method_context("tq-4bit+graph", model, on_gpu=True)
    with context_factory() as session:
        model(torch.randn(4, 3, 32, 32)).sum()  # (activations of 256 KB: above min_bytes)
    assert session.config.quant.bits == 4 and session.stats.packed_tensors > 0


def fake_events():
    """A stand-in for torch.cuda.Event: each record() reads a clock that advances by 1 ms."""
    clock = iter(range(100))

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = next(clock)

        def elapsed_time(self, end):
            return float(end.at - self.at)

    return FakeEvent


def test_a_captured_step_is_warmed_up_captured_once_and_timed_over_replays(monkeypatch):
    # The CUDA calls of measure_gpu_graphed, faked on the CPU: what it runs eagerly, what it captures and
    # how many replays it times. (On a GPU, tests/integration/test_cuda_graphs.py checks what replays compute.)
    import tritonquant.bench as bench

    log = []

    class FakeGraph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        assert isinstance(graph, FakeGraph)
        log.append("capture")
        yield
        log.append("end capture")

    class FakeStream:
        def wait_stream(self, other):
            pass

    # (Stand-ins take any arguments, as the real calls do: on a GPU machine CUDA is initialized by the
    # tests before this one, and compress() then resets the peak statistics of the current device.)
    cuda = bench.torch.cuda
    for name, value in {"Stream": FakeStream, "stream": lambda s: contextlib.nullcontext(),
                        "current_stream": FakeStream, "synchronize": lambda *a: None, "empty_cache": lambda: None,
                        "reset_peak_memory_stats": lambda *a: None, "max_memory_allocated": lambda *a: 3 * bench.MB,
                        "CUDAGraph": FakeGraph, "graph": capture, "Event": fake_events()}.items():
        monkeypatch.setattr(cuda, name, value)

    compress = bench.compress

    def logged_compress(**config):
        log.append(f"compress {config}")
        return compress(**config)

    monkeypatch.setattr(bench, "compress", logged_compress)

    def loss_fn(model, batch):
        log.append("step")
        return model(batch[0]).sum()

    workload = bench.Workload("w", lambda: torch.nn.Linear(4, 4), lambda b, dev: (torch.randn(b, 4),), loss_fn,
                              (2,), None)
    model = workload.make_model()
    row = bench.measure_gpu_graphed(model, workload, "tq-4bit+graph", 2, steps=3)
    step = ["compress {'bits': 4}", "step"]
    assert log == step * 2 + ["capture", *step, "end capture"] + ["replay"] * 4
    assert row == {"peak_mb": 3.0, "activation_mb": None, "accounted_mb": None, "step_ms": 1.0}
    assert all(p.grad is None for p in model.parameters()), "the graph's gradients are not left on the model"


def test_an_eager_gpu_cell_reads_memory_after_forward_and_after_backward(monkeypatch):
    # measure_gpu's CUDA calls, faked on the CPU: which memory figure it reads where.
    import tritonquant.bench as bench

    allocated = iter([1 * bench.MB, 3 * bench.MB])  # before the forward pass, after it
    peaks = iter([5 * bench.MB, 7 * bench.MB])  # the peak up to the end of forward, over the whole step

    cuda = bench.torch.cuda
    for name, value in {"synchronize": lambda *a: None, "empty_cache": lambda: None,
                        "reset_peak_memory_stats": lambda *a: None, "memory_allocated": lambda *a: next(allocated),
                        "max_memory_allocated": lambda *a: next(peaks), "Event": fake_events()}.items():
        monkeypatch.setattr(cuda, name, value)
    workload = bench.Workload("w", lambda: SmallCNN(width=16, blocks=1),
                              lambda b, dev: (torch.randn(b, 3, 32, 32), torch.zeros(b, dtype=torch.long)),
                              lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
                              (2,), None)
    row = bench.measure_gpu(workload.make_model(), workload, "tq-4bit", 4, steps=3)
    accounted = row.pop("accounted_mb")
    accounting = row.pop("accounting")
    phases = row.pop("phases_ms")
    # Each timed step records three events (the fake clock advances 1 ms a record): before the forward,
    # after it and after the backward.
    assert row == {"peak_mb": 7.0, "forward_peak_mb": 5.0, "activation_mb": 2.0, "step_ms": 2.0}
    assert list(phases) == ["forward", "backward", "forward_host", "backward_host"]
    assert phases["forward"] == 1.0 and phases["backward"] == 1.0
    assert phases["forward_host"] > 0 and phases["backward_host"] > 0  # (host wall time: the real clock)
    assert accounting["packed_mb"] + accounting["passed_mb"] == pytest.approx(accounted)
    assert 0 < accounted < 1, "the session's own count of what it holds, in MB"
