"""Timers shared by the benchmark scripts that time one callable at a time."""

from __future__ import annotations

import statistics
import time
from typing import Callable

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
