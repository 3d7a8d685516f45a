"""What the benchmark scripts that time one callable at a time share: the timers, a copy of the same
bytes to compare with, and the results file."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from tritonquant.kernels import autotune


def gpu_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median GPU milliseconds of ``fn()``: Triton's do_bench, through the tuner's wrapper (CUDA only)."""
    return autotune.benchmark(fn, warmup_ms, rep_ms)


def cpu_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` calls (for CPU figures)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_ms(nbytes: int, device: torch.device, timer: Callable[[Callable[[], object]], float]) -> float:
    """``timer``'s milliseconds for a copy that moves ``nbytes`` (half read, half written) on ``device``."""
    src = torch.ones(nbytes // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def write_result(text: str, filename: str, out: str | None) -> Path:
    """Write ``text`` to ``filename`` in ``out``, else $OUT, else benchmarks/results/; returns the path."""
    out_dir = Path(out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    path.write_text(text)
    return path
