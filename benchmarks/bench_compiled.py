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

Columns: median step ms (forward, backward, no optimizer) after warm-up, its ratio to exact, Python pack
hook calls a step, tensors packed a step, and on CUDA the step's peak memory
(``torch.cuda.max_memory_allocated``) and its ratio to exact. On the CPU the model is small, so that the
step times mostly measure the host's work, and there is no peak memory.

Writes compiled.md to --out, else $OUT, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate
from torch import nn

import tritonquant as tq
from tritonquant import traced
from tritonquant.models import TinyTransformer, lm_batch, lm_loss
from tritonquant.session import Session

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from one_callable import write_result  # noqa: E402

METHODS = ("exact", "tq-4bit traced", "tq-4bit python", "tq-4bit eager")
traceable_at_import = traced.traceable


def workloads(device: torch.device):
    """(name, model, run(model) -> loss) for ``device``: an MLP and a small transformer."""
    cuda = device.type == "cuda"
    width, tokens = (2048, 16384) if cuda else (128, 256)
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(width, width), nn.GELU()]
    mlp = nn.Sequential(*layers).to(device)
    x = torch.randn(tokens, width, device=device)
    yield f"mlp 8x{width}, {tokens} rows", mlp, lambda model: model(x).float().square().mean()

    dim, layers_, seq, batch = (768, 2, 1024, 8) if cuda else (64, 2, 32, 4)
    lm = TinyTransformer(vocab=8192 if cuda else 256, dim=dim, heads=12 if cuda else 4, layers=layers_, seq=seq,
                         dropout=0.0).to(device)
    data = lm_batch(batch, seq=seq, vocab=8192 if cuda else 256, device=device)
    yield f"transformer {layers_}x{dim}, {batch}x{seq}", lm, lambda model: lm_loss(model, data)


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


def measure(method: str, model: nn.Module, run, device: torch.device, steps: int, autocast: bool) -> dict:
    torch._dynamo.reset()
    target = model if method == "tq-4bit eager" else torch.compile(model)
    traceable = traced.traceable
    if method == "tq-4bit python":
        traced.traceable = lambda config: False
    cuda = device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    times, calls, packed, peaks = [], [], [], []
    try:
        for step in range(steps + 2):  # two warm-up steps: the compilation, then one more
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            block = tq.compress(bits=4) if method != "exact" else contextlib.nullcontext()
            start = time.perf_counter()
            with PackCounter() as counter, amp, block:
                loss = run(target)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if step >= 2:
                times.append((time.perf_counter() - start) * 1e3)
                calls.append(counter.calls)
                packed.append(block.stats.packed_tensors if method != "exact" else 0)
                if cuda:
                    peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    finally:
        traced.traceable = traceable
        model.zero_grad(set_to_none=True)
    return {"ms": statistics.median(times), "calls": max(calls), "packed": max(packed),
            "peak": max(peaks) if peaks else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    headers = ["workload", "method", "step ms", "x exact", "Python pack calls", "packed"]
    if device.type == "cuda":
        headers += ["peak MB", "x exact"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (host time; no peak memory)"
    rows = []
    for name, model, run in workloads(device):
        results = {}
        for method in METHODS:
            results[method] = measure(method, model, run, device, args.steps, autocast=device.type == "cuda")
            print(f"{name}: {method} {results[method]['ms']:.1f} ms", flush=True)
        exact = results["exact"]
        for method, r in results.items():
            row = [name, method, f"{r['ms']:.2f}", f"{r['ms'] / exact['ms']:.2f}", r["calls"], r["packed"]]
            if device.type == "cuda":
                row += [f"{r['peak']:.0f}", f"{r['peak'] / exact['peak']:.2f}"]
            rows.append(row)
        # (Written after each workload: a run stopped by the suite's time limit keeps what it measured.)
        text = (f"# A compiled model: traced packing against Python hooks ({where}; torch {torch.__version__}, "
                f"bf16 autocast on CUDA, fp32 on the CPU)\n\n" + tabulate(rows, headers, tablefmt="github") + "\n")
        path = write_result(text, "compiled.md", args.out)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
