"""``python -m tritonquant bench``: memory and speed of a training step, against the alternatives.

For each built-in workload and batch size, one training step (forward + backward) is measured for:
exact training, ``compress`` at 8/4/2 bits, ``torch.utils.checkpoint`` around every block (alone,
and with ``compress`` at 4 bits around the step), and ``torch.autograd.graph.save_on_cpu``; on a GPU
also exact training and ``compress`` at 4 bits captured whole in a CUDA graph and replayed. Every
figure is also given as a ratio to exact training measured in the same run (captured steps: to exact
training captured the same way).

On a GPU: peak memory (``torch.cuda.max_memory_allocated``), activation memory (memory held after the
forward pass), step time (median of CUDA-event timings), and the largest batch that fits a memory
budget, extrapolated linearly from the peaks measured at the two largest batch sizes.
With ``--quick`` on a CPU: the same table for small models, with memory from the library's own byte
accounting of saved tensors (labelled as such) and wall-clock step times of the torch reference path.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kernels.gpu_timing import replay_times_ms
from .models import ResNet50Like, SmallCNN, TinyTransformer, cnn_batch, cnn_loss, lm_batch, lm_loss
from .session import compress

MB = 2**20
OUT_OF_MEMORY = "out of memory"  # a cell's error when its step did not fit: a result, not a failure
# "checkpoint+tq-4bit": every block checkpointed, and what the step still saves (the block inputs, the
# head) compressed at 4 bits: where the two combine, the lowest peak of the table.
METHODS = ("exact", "tq-8bit", "tq-4bit", "tq-2bit", "checkpoint", "checkpoint+tq-4bit", "save_on_cpu")
# GPU only: the whole step (forward and backward) captured once in a CUDA graph and replayed. A replay
# runs no Python, so the host's per-tensor cost is gone and what is left is GPU time, compression's
# kernels included: how a host-bound job can get its speed back (docs/integrations/cuda-graphs.md).
GRAPH = "+graph"
GRAPH_METHODS = ("exact" + GRAPH, "tq-4bit" + GRAPH)
# Each batch measures its methods in this order, so that a run stopped by its time limit has what the
# benchmark's targets read (step time at 4 bits, eager and captured; activations at 2 bits; peak against
# checkpointing) before the other columns, save_on_cpu, the slowest, last. Tables keep METHODS' order.
MEASURE_ORDER = ("exact", "tq-4bit", "tq-2bit", "checkpoint", *GRAPH_METHODS, "tq-8bit", "checkpoint+tq-4bit",
                 "save_on_cpu")


def methods_for(on_gpu: bool) -> tuple[str, ...]:
    """The methods measured on a GPU, or on the CPU (no CUDA graphs there)."""
    return METHODS + GRAPH_METHODS if on_gpu else METHODS


def compresses(method: str) -> bool:
    """True for the methods that run the step inside ``compress``."""
    return "tq-" in method


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.device], object]
    loss_fn: Callable
    batch_sizes: tuple[int, ...]
    autocast_dtype: torch.dtype | None


def gpu_workloads() -> list[Workload]:
    return [
        # Two regimes for the bf16 workloads. At the smaller batch exact training was bound by the host on
        # the H200 (docs/benchmarks.md), so a per-tensor host cost shows in full; at the larger one the GPU
        # should have work enough to hide the host's, leaving compression its kernels' time to pay.
        Workload("resnet50 bf16 224px", lambda: ResNet50Like(),
                 lambda b, dev: cnn_batch(b, size=224, classes=1000, device=dev), cnn_loss, (64, 256),
                 torch.bfloat16),
        Workload("gpt2-small bf16 seq1024",
                 lambda: TinyTransformer(vocab=50257, dim=768, heads=12, layers=12, seq=1024, dropout=0.1, tied=True),
                 lambda b, dev: lm_batch(b, seq=1024, vocab=50257, device=dev), lm_loss, (8, 32), torch.bfloat16),
        # fp32: the activation-memory target at 2 bits is 1/14 of exact there (1/7 in bf16). Last, so that
        # at each batch round (run_bench: every workload's smallest batch first) the bf16 targets come first.
        Workload("resnet50 fp32 224px", lambda: ResNet50Like(),
                 lambda b, dev: cnn_batch(b, size=224, classes=1000, device=dev), cnn_loss, (32, 64), None),
    ]


def quick_workloads() -> list[Workload]:
    return [
        Workload("small cnn fp32 32px", lambda: SmallCNN(width=16, blocks=2),
                 lambda b, dev: cnn_batch(b, size=32, device=dev), cnn_loss, (8, 16), None),
        Workload("tiny transformer fp32 seq64", lambda: TinyTransformer(dim=64, layers=2, seq=64),
                 lambda b, dev: lm_batch(b, seq=64, device=dev), lm_loss, (4, 8), None),
    ]


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant)


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, use_reentrant: bool = False):
    """Temporarily run every block of ``model.blocks`` under ``torch.utils.checkpoint`` (no copy)."""
    original = model.blocks
    model.blocks = nn.Sequential(*[_Checkpointed(block, use_reentrant) for block in original])
    try:
        yield
    finally:
        model.blocks = original


def method_context(method: str, model: nn.Module, on_gpu: bool):
    """(factory of the context around the whole step's forward, context that measures nothing but changes
    the model)."""
    if method in ("exact", "exact" + GRAPH):
        return contextlib.nullcontext, contextlib.nullcontext()
    if method.startswith("tq-"):
        bits = int(method.removesuffix(GRAPH)[3:-3])
        return (lambda: compress(bits=bits)), contextlib.nullcontext()
    if method in ("checkpoint", "checkpoint+tq-4bit"):
        # On CPU the reentrant form keeps the block inputs visible to the byte accounting.
        context = (lambda: compress(bits=4)) if compresses(method) else contextlib.nullcontext
        return context, checkpointed_blocks(model, use_reentrant=not on_gpu)
    if method == "save_on_cpu":
        return (lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)), contextlib.nullcontext()
    raise ValueError(f"method must be one of {methods_for(on_gpu=True)}, got {method!r}")


def _forward(model, workload, batch, context_factory):
    autocast = (torch.autocast(batch_device(batch).type, dtype=workload.autocast_dtype)
                if workload.autocast_dtype else contextlib.nullcontext())
    with context_factory() as session, autocast:
        loss = workload.loss_fn(model, batch)
    return loss, session


def batch_device(batch) -> torch.device:
    return batch[0].device


def measure_gpu(model, workload: Workload, method: str, batch_size: int, steps: int) -> dict:
    if method.endswith(GRAPH):
        return measure_gpu_graphed(model, workload, method, batch_size, steps)
    device = torch.device("cuda")
    batch = workload.make_batch(batch_size, device)
    context_factory, model_change = method_context(method, model, on_gpu=True)
    with model_change:
        for _ in range(2):  # warm-up: kernels compiled, tuned and cached, allocator settled
            model.zero_grad(set_to_none=True)
            _forward(model, workload, batch, context_factory)[0].backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, session = _forward(model, workload, batch, context_factory)
        torch.cuda.synchronize()
        activation = torch.cuda.memory_allocated() - before
        # Where the step peaks (forward: the loss's temporaries on top of what is saved; backward: what
        # is restored and the gradients) decides which memory a method can lower.
        forward_peak = torch.cuda.max_memory_allocated()
        # compress's own count of the bytes it holds (packed, plus what it kept beyond parameters): set
        # beside ``activation``, it shows what the allocator adds (block rounding) and what else the step
        # holds after its forward.
        accounted = session.stats.packed_bytes + session.stats.passed_bytes if compresses(method) else None
        breakdown = accounting_breakdown(session.stats) if compresses(method) else None
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del loss
        times, phases = [], []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            host_start = time.perf_counter()
            start.record()
            loss, _ = _forward(model, workload, batch, context_factory)
            middle.record()
            host_middle = time.perf_counter()
            loss.backward()
            end.record()
            host_end = time.perf_counter()
            torch.cuda.synchronize()
            del loss
            times.append(start.elapsed_time(end))
            phases.append((start.elapsed_time(middle), middle.elapsed_time(end),
                           (host_middle - host_start) * 1e3, (host_end - host_middle) * 1e3))
    model.zero_grad(set_to_none=True)
    row = {"peak_mb": peak / MB, "forward_peak_mb": forward_peak / MB, "activation_mb": activation / MB,
           "accounted_mb": None if accounted is None else accounted / MB, "step_ms": statistics.median(times),
           "phases_ms": {name: statistics.median(phase[i] for phase in phases) for i, name in enumerate(PHASES)}}
    if breakdown is not None:
        row["accounting"] = breakdown
    return row


# An eager step's phases (``phases_ms`` of a GPU row): the time between CUDA events recorded before the
# forward, after it and after the backward (the GPU's time for each phase, gaps where it waited for work
# included), and the host's time to issue each phase. A phase whose host time reaches its GPU time was
# waiting on the host.
PHASES = ("forward", "backward", "forward_host", "backward_host")


def accounting_breakdown(stats) -> dict:
    """Where a compressed step's accounted bytes are (for the JSON, not the table): MB packed and kept,
    the tensors kept per reason, and per module type the MB packed and kept and the widths used. Set
    beside the allocator's figure, it says which kind of saved tensor a difference comes from."""
    by_type: dict[str, dict] = {}
    for module in stats.modules.values():
        entry = by_type.setdefault(module.type_name or "(outside modules)", {
            "packed_mb": 0.0, "passed_mb": 0.0, "packed_tensors": 0, "passed_tensors": 0, "bits": []})
        entry["packed_mb"] += module.packed_bytes / MB
        entry["passed_mb"] += module.passed_bytes / MB
        entry["packed_tensors"] += module.packed_tensors
        entry["passed_tensors"] += module.passed_tensors
        entry["bits"] = sorted(set(entry["bits"]) | module.bits)
    return {"packed_mb": stats.packed_bytes / MB, "passed_mb": stats.passed_bytes / MB,
            "packed_tensors": stats.packed_tensors, "deduplicated": stats.deduplicated,
            "passed_by_reason": dict(stats.passed_by_reason), "by_module_type": by_type}


def measure_gpu_graphed(model, workload: Workload, method: str, batch_size: int, steps: int) -> dict:
    """A step captured in one CUDA graph (forward and backward), then replayed: step ms of the replays,
    peak MB of the capture, which allocates what one eager step does. Activation MB is not measured:
    forward and backward are one graph, with no point in between to read memory at."""
    batch = workload.make_batch(batch_size, torch.device("cuda"))
    context_factory, _ = method_context(method, model, on_gpu=True)

    def step() -> None:
        _forward(model, workload, batch, context_factory)[0].backward()

    # Warm-up on a side stream, as torch's recipe for capturing a whole network has it: kernels compiled,
    # launch configs tuned, cuBLAS and cuDNN set up, before anything is captured.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)  # so the captured backward allocates the gradients in the graph's pool
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        times = replay_times_ms(graph, steps)
    finally:
        model.zero_grad(set_to_none=True)  # the gradients live in the graph's pool
        graph = None
        torch.cuda.empty_cache()
    return {"peak_mb": peak / MB, "activation_mb": None, "accounted_mb": None, "step_ms": statistics.median(times)}


def measure_cpu(model, workload: Workload, method: str, batch_size: int, steps: int) -> dict:
    batch = workload.make_batch(batch_size, torch.device("cpu"))
    if method == "save_on_cpu":  # moves nothing on a CPU: not a meaningful comparison
        return {"saved_mb": None, "peak_mb": None, "step_ms": None}
    context_factory, model_change = method_context(method, model, on_gpu=False)
    with model_change:
        # Saved-tensor bytes: packed + kept for compress; everything kept (min_bytes beyond any storage)
        # for the other methods, counted by a non-packing accounting block around the step.
        counting = contextlib.nullcontext() if compresses(method) else compress(min_bytes=2**62)
        with counting as counter:
            loss, session = _forward(model, workload, batch, context_factory)
        stats = session.stats if compresses(method) else counter.stats
        saved = stats.packed_bytes + stats.passed_bytes
        breakdown = accounting_breakdown(stats) if compresses(method) else None
        loss.backward()
        model.zero_grad(set_to_none=True)
        peak = cpu_peak_bytes(lambda: _forward(model, workload, batch, context_factory)[0].backward())
        times = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _forward(model, workload, batch, context_factory)[0].backward()
            times.append((time.perf_counter() - start) * 1e3)
    model.zero_grad(set_to_none=True)
    row = {"saved_mb": saved / MB, "peak_mb": None if peak is None else peak / MB, "step_ms": statistics.median(times)}
    if breakdown is not None:
        row["accounting"] = breakdown
    return row


def cpu_peak_bytes(step: Callable[[], object]) -> int | None:
    """Run ``step()``; return the most CPU memory allocated at once while it ran, above what was allocated
    when it began (tensors, as the allocator reports them to torch's profiler). None where that cannot be
    read: under a profiler already running (which a second one would disturb), or with a torch whose
    event tree differs (it is not a stable API). An exception from ``step`` propagates.

    The start is read from the first allocation the profiler records: memory allocated before the step
    and freed by it before that first allocation does not lower the figure (the profiler does not
    record frees of blocks it did not see allocated)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        # A second profiler inside a running one would stop the outer one on its way out (torch 2.11).
        if torch._C._autograd._profiler_enabled():
            raise RuntimeError("a profiler is running")
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with native_stderr_silenced():
            prof.__enter__()
    except Exception:  # noqa: BLE001 - no profiler to read: the step still runs
        step()
        return None
    try:
        step()
    finally:
        with native_stderr_silenced():
            prof.__exit__(None, None, None)
    try:
        events = allocation_events(prof)
        if not events:
            return None
        # Each event carries the allocator's running total after it; the first one's, less its own size,
        # is what was allocated when the step began.
        first = events[0][1]
        return max(fields.total_allocated for _, fields, _ in events) - (first.total_allocated - first.alloc_size)
    except Exception:  # noqa: BLE001 - an event tree read differently: no figure rather than a failed table
        return None


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null while the block runs: torch's profiler prints a line from
    C++ as it starts and as it stops (torch 2.13 on the CPU), which would land between the tables of the
    demo and the bench. Only around the profiler's start and stop, never around a step: a warning there
    must be seen."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocation_events(prof) -> list[tuple[int, object, str]]:
    """(time in ns, the event's fields: ``alloc_size`` (negative for a free), ``total_allocated``, ``ptr``;
    the name of the op that allocated) for every allocation and free a finished
    ``torch.profiler.profile(profile_memory=True)`` recorded, in time order. (torch's event tree is not a
    stable API: this raises where it differs.)"""
    from torch._C._profiler import _EventType

    found, pending = [], [(event, None) for event in prof.profiler.kineto_results.experimental_event_tree()]
    while pending:
        event, parent = pending.pop()
        pending.extend((child, event) for child in event.children)
        if event.tag == _EventType.Allocation:
            found.append((event.start_time_ns, event.extra_fields, parent.name if parent is not None else "?"))
    return sorted(found, key=lambda item: item[0])


@functools.lru_cache(maxsize=None)
def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where there is none. Looked up once per process:
    the results, with their environment, are rewritten after every batch, and the driver does not change."""
    import subprocess

    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def environment() -> dict:
    """Where figures come from: date, versions, and the GPU (name, capability, memory, CUDA, driver)."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device="cuda", gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda,
                   driver=nvidia_driver())
    return env


def _ratio(value, reference) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def max_batch_in_budget(peaks: dict[int, float], budget_mb: float) -> int | None:
    """Largest batch under ``budget_mb``, extrapolated linearly from the two largest measured batches."""
    sizes = sorted(peaks)
    if len(sizes) < 2:
        return None
    b1, b2 = sizes[-2], sizes[-1]
    per_sample = (peaks[b2] - peaks[b1]) / (b2 - b1)
    if per_sample <= 0:
        return None
    return max(0, int((budget_mb - (peaks[b1] - per_sample * b1)) / per_sample))


def run_bench(quick: bool = False, out: str | None = None, steps: int = 5, budget_gb: float = 16.0,
              plots: str | None = None) -> int:
    """Measure every (workload, batch, method) cell; print the table, write it to ``out`` after every batch
    and the plots to ``plots`` at the end. Returns the exit status: 0; 1 when a cell failed with an error
    other than out of memory (the table still has every cell); 130 when interrupted (what was measured
    is written)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not budget_gb > 0:
        raise ValueError(f"budget_gb must be > 0, got {budget_gb!r}")
    on_gpu = torch.cuda.is_available() and not quick
    if not torch.cuda.is_available() and not quick:
        print("No CUDA device: running the small CPU version (--quick); memory is the library's byte accounting.")
    workloads = gpu_workloads() if on_gpu else quick_workloads()
    measure = measure_gpu if on_gpu else measure_cpu
    methods = methods_for(on_gpu)
    planned = planned_cells(workloads)
    results = []
    total = len(planned) * len(methods)
    done, started = 0, time.perf_counter()
    try:
        for workload, batch_size in measurement_order(workloads):
            # A fresh model per batch, from the same seed: the batches of one workload are no longer measured
            # one after the other, and another workload's model left on the GPU would count in the peaks.
            torch.manual_seed(0)
            model = workload.make_model().to("cuda" if on_gpu else "cpu")
            for method in sorted(methods, key=MEASURE_ORDER.index):
                done += 1
                print(f"[{done}/{total} {time.perf_counter() - started:5.0f}s] {workload.name} batch {batch_size}: "
                      f"{method}", flush=True)
                row = _measure_cell(measure, model, workload, method, batch_size, steps, on_gpu)
                results.append({"workload": workload.name, "batch": batch_size, "method": method, **row})
            # Written after every batch, so a run stopped by a time limit keeps what it measured.
            _write_results(results, planned, on_gpu, budget_gb, out, verbose=False)
            del model
            if on_gpu:
                torch.cuda.empty_cache()
        _write_results(results, planned, on_gpu, budget_gb, out, verbose=True)
        if plots:
            _plots(results, on_gpu, Path(plots))
    except KeyboardInterrupt:  # (the GPU suite stops a stage past its time limit with SIGINT)
        print(f"\ninterrupted: writing the {len(results)} of {total} cells measured", flush=True)
        _write_results(results, planned, on_gpu, budget_gb, out, verbose=True)
        if plots:
            _plots(results, on_gpu, Path(plots))
        return 130
    # An error other than running out of memory (an expected result at a large batch) is a broken
    # measurement: the exit status says so, for the GPU suite's summary, after everything is written.
    broken = [r for r in results if r["error"] not in (None, OUT_OF_MEMORY)]
    if broken:
        print(f"\nexit status 1: {len(broken)} of {len(results)} cells failed with an error other than out of "
              f"memory (first: {broken[0]['workload']} batch {broken[0]['batch']} {broken[0]['method']}: "
              f"{broken[0]['error']})", flush=True)
        return 1
    return 0


def measurement_order(workloads: list[Workload]) -> list[tuple[Workload, int]]:
    """(workload, batch size) in the order they are measured: every workload's smallest batch first, then
    every workload's next one, and so on, so that a run stopped by its time limit has measured each
    workload (each of the benchmark's targets) at one batch at least before any at its larger ones."""
    most = max(len(w.batch_sizes) for w in workloads)
    return [(w, sorted(w.batch_sizes)[i]) for i in range(most) for w in workloads if i < len(w.batch_sizes)]


def planned_cells(workloads: list[Workload]) -> list[tuple[str, int]]:
    """(workload name, batch size) of every cell the run sets out to measure, in table order (workloads as
    listed, batches as each lists them). Written to bench.json as "planned", so that a reader can tell a
    cell that was never measured (a run stopped by its time limit) from one that was never asked for."""
    return [(w.name, b) for w in workloads for b in w.batch_sizes]


def _measure_cell(measure, model, workload: Workload, method: str, batch_size: int, steps: int, on_gpu: bool) -> dict:
    """One cell of the table: its measurements, or the error that stopped it (one broken cell must not
    lose the whole table)."""
    stream = torch.cuda.current_stream() if on_gpu else None
    try:
        row = measure(model, workload, method, batch_size, steps)
        row["error"] = None
    except torch.OutOfMemoryError:
        row = {"error": OUT_OF_MEMORY}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    if on_gpu and row["error"] is not None:
        # A capture that failed can leave its side stream current (torch.cuda.graph ends the capture
        # before it restores the stream): later cells must run where the others did.
        torch.cuda.set_stream(stream)
        # Here, not in the except blocks, whose traceback still held the failed step's tensors (through
        # reference cycles, hence the collection).
        gc.collect()
        torch.cuda.empty_cache()
    return row


def _write_results(results: list[dict], planned: list[tuple[str, int]], on_gpu: bool, budget_gb: float,
                   out: str | None, verbose: bool) -> None:
    """Print (``verbose``) and write to ``out`` the table of ``results`` so far; bench.json also holds
    ``planned``, the (workload, batch) cells the run set out to measure, as [name, batch] pairs."""
    # Rows in table order (workloads, then batches, as planned; not as measured), and METHODS' within each.
    display = methods_for(on_gpu)
    results = sorted(results, key=lambda r: (planned.index((r["workload"], r["batch"])), display.index(r["method"])))
    table, headers = _table(results, on_gpu, budget_gb * 1024)
    env = environment()
    title = ("GPU step benchmark" if on_gpu else
             "CPU step benchmark (--quick): memory = bytes of saved tensors by the library's accounting")
    if verbose:
        print(f"\n{title}\n{json.dumps(env)}\n\n" + tabulate(table, headers=headers, disable_numparse=True))
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / "bench.json", json.dumps(
            {"env": env, "gpu": on_gpu, "planned": [list(cell) for cell in planned], "rows": results}, indent=2))
        phase_rows = _phase_table(results)
        phases = ("" if not phase_rows else
                  "\nEager steps by phase (medians): GPU ms between CUDA events before the forward, after it and "
                  "after the backward, and the host's ms to issue each phase. Where a phase's host ms reaches its "
                  "GPU ms, the GPU waited for the host.\n\n"
                  + tabulate(phase_rows, headers=PHASE_HEADERS, tablefmt="github", disable_numparse=True) + "\n")
        write_atomically(folder / "bench.md",
            f"# {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n"
            + tabulate(table, headers=headers, tablefmt="github", disable_numparse=True) + "\n" + phases
        )
        if verbose:
            print(f"\nwrote {folder / 'bench.md'} and {folder / 'bench.json'}")


def write_atomically(path: Path, text: str) -> None:
    """Readers (the GPU suite's targets) see the old file or the new one, never half of one: results are
    rewritten after every batch or row, and a time limit may stop the run in the middle of a write. The
    temporary file is in the same folder, so os.replace is a rename within one file system."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _table(results: list[dict], on_gpu: bool, budget_mb: float):
    exact = {(r["workload"], r["batch"], r["method"].endswith(GRAPH)): r for r in results
             if r["method"] in ("exact", "exact" + GRAPH)}
    rows = []
    if on_gpu:
        headers = ["workload", "batch", "method", "peak MB", "x exact", "activation MB", "x exact",
                   "accounted MB", "step ms", "x exact", f"max batch in {budget_mb / 1024:.0f} GB"]
        peaks: dict[tuple, dict[int, float]] = {}
        for r in results:
            if r["error"] is None:
                peaks.setdefault((r["workload"], r["method"]), {})[r["batch"]] = r["peak_mb"]
        for r in results:
            # A step captured in a CUDA graph is compared with exact training captured the same way.
            ref = exact.get((r["workload"], r["batch"], r["method"].endswith(GRAPH)), {})
            if r["error"]:
                rows.append([r["workload"], r["batch"], r["method"], r["error"]] + [""] * (len(headers) - 4))
                continue
            fit = max_batch_in_budget(peaks.get((r["workload"], r["method"]), {}), budget_mb)
            accounted = r.get("accounted_mb")
            activation = r.get("activation_mb")  # (None for a step captured in a CUDA graph)
            rows.append([
                r["workload"], r["batch"], r["method"], f"{r['peak_mb']:.0f}", _ratio(r["peak_mb"], ref.get("peak_mb")),
                "-" if activation is None else f"{activation:.0f}", _ratio(activation, ref.get("activation_mb")),
                "-" if accounted is None else f"{accounted:.0f}",
                f"{r['step_ms']:.1f}", _ratio(r["step_ms"], ref.get("step_ms")), "-" if fit is None else str(fit),
            ])
    else:
        headers = ["workload", "batch", "method", "saved MB (accounting)", "x exact", "step peak MB (CPU)", "x exact",
                   "step ms (CPU)", "x exact"]
        for r in results:
            ref = exact[(r["workload"], r["batch"], False)]
            if r["error"]:
                rows.append([r["workload"], r["batch"], r["method"], r["error"]] + [""] * (len(headers) - 4))
                continue
            saved, peak, ms = r.get("saved_mb"), r.get("peak_mb"), r.get("step_ms")
            rows.append([
                r["workload"], r["batch"], r["method"], "n/a" if saved is None else f"{saved:.2f}",
                _ratio(saved, ref.get("saved_mb")), "n/a" if peak is None else f"{peak:.2f}",
                _ratio(peak, ref.get("peak_mb")), "n/a" if ms is None else f"{ms:.1f}", _ratio(ms, ref.get("step_ms")),
            ])
    return rows, headers


PHASE_HEADERS = ["workload", "batch", "method", "forward GPU ms", "forward host ms", "backward GPU ms",
                 "backward host ms"]


def _phase_table(results: list[dict]) -> list[list]:
    """Rows of PHASE_HEADERS for the eager GPU rows that have ``phases_ms``, in ``results``' order."""
    return [[r["workload"], r["batch"], r["method"],
             *(f"{r['phases_ms'][name]:.1f}" for name in ("forward", "forward_host", "backward", "backward_host"))]
            for r in results if r.get("error") is None and r.get("phases_ms")]


def _plots(results: list[dict], on_gpu: bool, folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'tritonquant[plots]'): no plots written")
        return
    folder.mkdir(parents=True, exist_ok=True)
    # Peak memory where it was measured (GPU, and CPU where torch's profiler reports allocations);
    # otherwise the saved-tensor accounting.
    memory_key = "peak_mb" if on_gpu or any(r.get("peak_mb") is not None for r in results) else "saved_mb"
    memory_label = {"peak_mb": "peak memory (MB)" if on_gpu else "step peak memory, CPU (MB)",
                    "saved_mb": "saved-tensor MB (accounting)"}[memory_key]
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for ax, name in zip(axes[0], workloads):
        for method in METHODS:
            points = [(r["batch"], r[memory_key]) for r in results
                      if r["workload"] == name and r["method"] == method and r.get(memory_key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set(title=name, xlabel="batch size", ylabel=memory_label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "memory_vs_batch.png", dpi=120)
    plt.close(fig)

    # One panel per workload and batch: at a small batch a step can be bound by the host, at a large one by
    # the GPU, and compression's cost differs between the two.
    batches = {name: sorted({r["batch"] for r in results if r["workload"] == name}) for name in workloads}
    n_rows = max(len(b) for b in batches.values())
    fig, axes = plt.subplots(n_rows, len(workloads), figsize=(6 * len(workloads), 4 * n_rows), squeeze=False)
    for column, name in enumerate(workloads):
        for row_index in range(n_rows):
            ax = axes[row_index][column]
            if row_index >= len(batches[name]):
                ax.axis("off")
                continue
            batch = batches[name][row_index]
            labels, times = [], []
            for method in ("exact", "tq-8bit", "tq-4bit", "tq-2bit", *GRAPH_METHODS):
                row = next((r for r in results if r["workload"] == name and r["batch"] == batch
                            and r["method"] == method), None)
                if row and row.get("step_ms") is not None:
                    labels.append(method)
                    times.append(row["step_ms"])
            # ("exact+graph" on two lines: side by side, the long labels run into each other)
            ax.bar([label.replace(GRAPH, "\n" + GRAPH) for label in labels], times,
                   color=["gray" if label.startswith("exact") else "tab:blue" for label in labels])
            ax.set(title=f"{name}, batch {batch}", ylabel="step time (ms)" + ("" if on_gpu else ", CPU"))
    fig.tight_layout()
    fig.savefig(folder / "step_time_vs_bits.png", dpi=120)
    plt.close(fig)
    print(f"wrote {folder / 'memory_vs_batch.png'} and {folder / 'step_time_vs_bits.png'}")
