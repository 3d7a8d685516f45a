#!/usr/bin/env python
"""A whole model under torch.compile: exact training against compress with its packing traced into the
compiled graphs, and with the Python hooks that run per saved tensor.

    python benchmarks/bench_compiled.py [--out DIR] [--steps N]    # CUDA if present, else a small CPU run

Rows, each the model compiled afresh and trained for a few steps (docs/integrations/compile.md):

    exact            torch.compile, no compression
    tq-4bit traced   compress(bits=4) around the compiled model: AOTAutograd traces the packing into the
                     compiled forward and backward (tritonquant/traced.py); no Python hook per tensor
    tq-4bit python   the same block with the Python hooks (as blocks with per-module overrides keep):
                     the region's tensors are packed when its forward returns
    tq-4bit eager    compress(bits=4) on the model not compiled
    exact, CUDA graphs / tq-4bit traced, CUDA graphs
                     the first two, compiled with mode="reduce-overhead": Inductor replays each compiled
                     graph as a CUDA graph, so the traced ops' Python (one call per packed tensor and
                     per restored one) runs when a graph is recorded, not in every step

Workloads on CUDA, in the order they run: the bench's GPT-2 small (batch 8; also with CUDA graphs) and
bf16 ResNet-50 (batch 64, channels-last), exact and traced only (``python -m tritonquant bench``
measures them eager), for the step-time target of compiled training; then an 8-layer MLP with the
first four methods, which shows what traced packing changes against Python hooks. On the CPU: a small
MLP and a small transformer, the first four methods, fp32.

ResNet-50 is compiled channels-last (model and images), as CNNs are trained on GPUs. Compiled from
NCHW, Inductor makes its convolutions' outputs channels-last itself, and each packed tensor, which the
pack op takes in the strides it was traced with, is first copied back to NCHW: on the CPU (torch 2.13)
that was a copy kernel for 54 of the 67 packed tensors of a ResNet-50 forward, none channels-last.

Columns: median step ms (forward, backward, no optimizer; CUDA events on CUDA) after two warm-up steps,
its ratio to exact, Python pack hook calls a step, tensors packed a step (counted by the ops' Python:
0 where CUDA graphs replay), the traced ops' calls a step and the host ms inside them (``OpTimer``),
and on CUDA the memory held after the forward (activations) and the step's peak
(``torch.cuda.max_memory_allocated``), each with its ratio to exact. On the CPU the models are small,
so the step times mostly measure the host's work.

Writes compiled.md and compiled.json (``rows``, ``planned``, ``gpu``, ``env``; benchmarks/targets.py reads it) to
--out, else $OUT, else benchmarks/results/, after every workload.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

import tritonquant as tq
from tritonquant import bench, traced
from tritonquant.models import TinyTransformer, lm_batch, lm_loss
from tritonquant.session import Session

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from one_callable import write_result  # noqa: E402

METHODS = ("exact", "tq-4bit traced", "tq-4bit python", "tq-4bit eager")
TRACED_ONLY = ("exact", "tq-4bit traced")
GRAPHED = ("exact, CUDA graphs", "tq-4bit traced, CUDA graphs")  # (torch.compile(mode="reduce-overhead"))
# The bench's workloads of the step-time target (tritonquant/bench.py), at the batch where the H200 bound
# their eager steps by the host (docs/benchmarks.md), in the order they run, with their methods.
TARGET_WORKLOADS = (("gpt2-small bf16 seq1024", 8, TRACED_ONLY + GRAPHED), ("resnet50 bf16 224px", 64, TRACED_ONLY))
traceable_at_import = traced.traceable
MB = 2**20


@dataclass
class Case:
    """One workload: ``make_model()`` on the device, and ``loss(model)`` of one step for a model (compiled
    or not) made by it. ``target``: a workload of the step-time target (benchmarks/targets.py)."""
    name: str
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module], torch.Tensor]
    methods: tuple[str, ...]
    autocast_dtype: torch.dtype | None
    target: bool = False


def bench_case(workload_name: str, batch_size: int, device: torch.device, methods: tuple[str, ...]) -> Case:
    """The bench's workload ``workload_name`` (tritonquant/bench.py) at ``batch_size``; a CNN channels-last."""
    workload = next(w for w in bench.gpu_workloads() if w.name == workload_name)
    batch = workload.make_batch(batch_size, device)
    name, memory_format = f"{workload.name}, batch {batch_size}", torch.preserve_format
    if batch[0].dim() == 4:  # (images)
        name, memory_format = f"{name}, channels-last", torch.channels_last
        batch = (batch[0].to(memory_format=memory_format), *batch[1:])
    return Case(name, lambda: workload.make_model().to(device, memory_format=memory_format),
                lambda model: workload.loss_fn(model, batch), methods, workload.autocast_dtype, target=True)


def mlp_case(width: int, rows: int, device: torch.device, autocast_dtype: torch.dtype | None) -> Case:
    def make_model() -> nn.Module:
        layers = []
        for _ in range(8):
            layers += [nn.Linear(width, width), nn.GELU()]
        return nn.Sequential(*layers).to(device)

    x = torch.randn(rows, width, device=device, generator=torch.Generator(device).manual_seed(0))
    return Case(f"mlp 8x{width}, {rows} rows", make_model, lambda model: model(x).float().square().mean(),
                METHODS, autocast_dtype)


def cases(device: torch.device) -> list[Case]:
    if device.type == "cuda":
        return [*(bench_case(name, batch, device, methods) for name, batch, methods in TARGET_WORKLOADS),
                mlp_case(2048, 16384, device, torch.bfloat16)]
    dim, layers, seq, batch, vocab = 64, 2, 32, 4, 256
    data = lm_batch(batch, seq=seq, vocab=vocab, device=device)
    transformer = Case(f"transformer {layers}x{dim}, {batch}x{seq}",
                       lambda: TinyTransformer(vocab=vocab, dim=dim, heads=4, layers=layers, seq=seq, dropout=0.0),
                       lambda model: lm_loss(model, data), METHODS, None)
    return [mlp_case(128, 256, device, None), transformer]


class OpTimer:
    """Host time inside the traced ops: ``traced.quantize_checked`` and ``traced.dequantize``, which
    ``pack_saved`` and ``unpack_saved`` call once per packed and restored tensor (the dispatcher's own
    few microseconds a call left out). Replayed CUDA graphs call neither."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._originals = (traced.quantize_checked, traced.dequantize)

    def _timed(self, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1
        return timed

    def __enter__(self) -> "OpTimer":
        traced.quantize_checked, traced.dequantize = map(self._timed, self._originals)
        return self

    def __exit__(self, *exc: object) -> None:
        traced.quantize_checked, traced.dequantize = self._originals


class PackCounter:
    """Counts the Python pack hook's calls (``Session._pack``)."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = Session._pack

    def __enter__(self) -> "PackCounter":
        original = self._original

        def counted(session, t):
            self.calls += 1
            return original(session, t)

        Session._pack = counted
        return self

    def __exit__(self, *exc: object) -> None:
        Session._pack = self._original


def measure(method: str, case: Case, model: nn.Module, device: torch.device, steps: int) -> dict:
    """One row: ``model`` compiled afresh (but for "tq-4bit eager") and trained ``steps`` + 2 steps."""
    torch._dynamo.reset()
    mode = "reduce-overhead" if method in GRAPHED else None
    target = model if method == "tq-4bit eager" else torch.compile(model, mode=mode)
    compressed = method.startswith("tq-")
    traceable = traced.traceable
    if method == "tq-4bit python":
        traced.traceable = lambda config: False
    cuda = device.type == "cuda"
    counter = PackCounter()

    def forward():
        """The step's loss, and the block it ran in (None for exact), counting Python pack calls."""
        amp = (torch.autocast(device.type, dtype=case.autocast_dtype) if case.autocast_dtype
               else contextlib.nullcontext())
        block = tq.compress(bits=4) if compressed else contextlib.nullcontext()
        with counter, amp, block:
            loss = case.loss(target)
        return loss, block if compressed else None

    try:
        for _ in range(2):  # warm-up: the compilation, then one more step
            model.zero_grad(set_to_none=True)
            forward()[0].backward()
        # One step for the counts and memory: what it holds after its forward, and its peak.
        model.zero_grad(set_to_none=True)
        held = peak = None
        if cuda:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        counter.calls = 0
        with OpTimer() as ops:  # (this step only: the wrappers' own time stays out of the timed steps)
            loss, block = forward()
            calls, packed = counter.calls, block.stats.packed_tensors if block is not None else 0
            if cuda:
                torch.cuda.synchronize()
                held = (torch.cuda.memory_allocated() - before) / MB
            loss.backward()
            del loss
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / MB
        times = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward()[0].backward()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                forward()[0].backward()
                times.append((time.perf_counter() - start_s) * 1e3)
    finally:
        traced.traceable = traceable
        model.zero_grad(set_to_none=True)
    return {"step_ms": statistics.median(times), "python_pack_calls": calls, "packed": packed,
            "op_calls": ops.calls, "op_host_ms": ops.seconds * 1e3, "held_mb": held, "peak_mb": peak}


def measure_cell(method: str, case: Case, model: nn.Module, device: torch.device, steps: int) -> dict:
    """``measure``, or the error that stopped it: one failed compilation must not lose the other rows."""
    try:
        return {**measure(method, case, model, device, steps), "error": None}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        return {"error": f"{type(exc).__name__}: {first_line}"}
    finally:
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def table(results: list[dict], cuda: bool) -> tuple[list[list[str]], list[str]]:
    headers = ["workload", "method", "step ms", "x exact", "Python pack calls", "packed", "traced op calls",
               "their host ms"]
    if cuda:
        headers += ["held MB", "x exact", "peak MB", "x exact"]
    exact = {(r["workload"], r["method"]): r for r in results if r["method"].startswith("exact") and r["error"] is None}

    def ratio(r: dict, key: str) -> str:
        # (Against exact training compiled the same way: with CUDA graphs or without.)
        reference = exact.get((r["workload"], GRAPHED[0] if r["method"] in GRAPHED else "exact"), {}).get(key)
        return f"{r[key] / reference:.2f}" if reference and r[key] is not None else "-"

    rows = []
    for r in results:
        if r["error"] is not None:
            rows.append([r["workload"], r["method"], r["error"]] + ["-"] * (len(headers) - 3))
            continue
        row = [r["workload"], r["method"], f"{r['step_ms']:.2f}", ratio(r, "step_ms"), str(r["python_pack_calls"]),
               str(r["packed"]), str(r.get("op_calls", "-")),
               f"{r['op_host_ms']:.1f}" if r.get("op_host_ms") is not None else "-"]
        if cuda:
            row += [f"{r['held_mb']:.0f}", ratio(r, "held_mb"), f"{r['peak_mb']:.0f}", ratio(r, "peak_mb")]
        rows.append(row)
    return rows, headers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name() if cuda else "CPU (host time; no memory figures)"
    env = bench.environment()
    all_cases = cases(device)
    # The target workloads and their methods, so that targets.py can tell a cell never reached from one
    # never planned.
    planned = [{"workload": case.name, "methods": list(case.methods)} for case in all_cases if case.target]
    results = []
    for case in all_cases:
        torch.manual_seed(0)
        model = case.make_model()
        for method in case.methods:
            started = time.perf_counter()
            row = measure_cell(method, case, model, device, args.steps)
            results.append({"workload": case.name, "method": method, "target": case.target, **row})
            shown = f"{row['step_ms']:.1f} ms" if row["error"] is None else row["error"]
            print(f"{case.name}: {method} {shown} ({time.perf_counter() - started:.0f} s with compilation)",
                  flush=True)
        del model
        # (Written after each workload: a run stopped by the suite's time limit keeps what it measured.)
        rows, headers = table(results, cuda)
        text = (f"# A compiled model: traced packing against Python hooks ({where}; torch {torch.__version__}, "
                f"triton {env['triton']})\n\n"
                + tabulate(rows, headers, tablefmt="github", disable_numparse=True) + "\n")
        path = write_result(text, "compiled.md", args.out)
        summary = {"gpu": cuda, "env": env, "planned": planned, "rows": results}
        write_result(json.dumps(summary, indent=1), "compiled.json", args.out)
    print(text)
    print(f"wrote {path} and compiled.json")
    failed = [r for r in results if r["error"] is not None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
