import contextlib
import importlib.util
import json

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


def test_quick_bench_saved_bytes_fall_with_bits(quick_results):
    _, data = quick_results
    for workload in {r["workload"] for r in data["rows"]}:
        for batch in {r["batch"] for r in data["rows"] if r["workload"] == workload}:
            saved = {r["method"]: r["saved_mb"] for r in data["rows"] if r["workload"] == workload and r["batch"] == batch}
            assert saved["tq-2bit"] < saved["tq-4bit"] < saved["tq-8bit"] < saved["exact"]
            assert saved["checkpoint"] < saved["exact"]
            assert saved["checkpoint+tq-4bit"] < saved["checkpoint"], "what checkpointing keeps, compressed"
            assert saved["save_on_cpu"] is None  # nothing to move on a CPU


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


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import tritonquant.bench as bench

    measured = bench.measure_cpu

    def measure_failing_for_2_bits(model, workload, method, batch_size, steps):
        if method == "tq-2bit":
            raise RuntimeError("kernel broke\nsecond line")
        return measured(model, workload, method, batch_size, steps)

    monkeypatch.setattr(bench, "measure_cpu", measure_failing_for_2_bits)
    assert run_bench(quick=True, out=str(tmp_path), steps=1) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * len(METHODS)
    assert {r["error"] for r in rows if r["method"] == "tq-2bit"} == {"RuntimeError: kernel broke"}
    assert all(r["error"] is None and r["saved_mb"] > 0 for r in rows if r["method"] in ("exact", "tq-4bit"))
    assert "RuntimeError: kernel broke" in (tmp_path / "bench.md").read_text()


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
    assert row == {"peak_mb": 7.0, "forward_peak_mb": 5.0, "activation_mb": 2.0, "step_ms": 1.0}
    assert 0 < accounted < 1, "the session's own count of what it holds, in MB"
