"""GPU time of kernel calls without the host: the calls captured in one CUDA graph and replayed.

``triton.testing.do_bench`` launches each call from the host after flushing the L2 cache. For a kernel
of a few microseconds (a quantize of 16 MiB of bf16 takes about 9 on an H200), the gap between the
host's launch and the GPU's start is part of what it times, and it moves with the host's load: on the
H200 the kernels reached 37-57% of copy bandwidth at 16 MiB by do_bench and 50-77% from a graph
(docs/benchmarks.md). Calls replayed from a graph run back to back, as in a captured training step.
Each call gets buffers of its own, enough of them (``rotation_count``) that a buffer comes round again
only after the other calls have moved ``GRAPH_L2_MULTIPLE`` times the L2 cache, so no call finds its
input there. (bench_kernels counts the bytes read; the tuner, to bound its memory, read and written.)

Used by the tuner for small size buckets (kernels/autotune.py) and by benchmarks/bench_kernels.py's
graph column, so that both time alike. CUDA only.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

GRAPH_L2_MULTIPLE = 4  # input bytes the other calls read before a buffer comes round again, in L2 caches
GRAPH_MAX_CALLS = 256  # calls a graph holds at most (and buffer sets)
GRAPH_REPLAYS = 20  # the graph's timed replays; their median is the time
_FALLBACK_L2_BYTES = 64 << 20  # where torch does not say: more than the L2 cache of any GPU this was written for


def l2_cache_bytes(device: torch.device) -> int:
    """The L2 cache of CUDA ``device`` in bytes (64 MiB where torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _FALLBACK_L2_BYTES


def rotation_count(buffer_bytes: int, l2_bytes: int) -> int:
    """How many calls, each on buffers of its own of ``buffer_bytes`` input, a graph runs: enough to read
    GRAPH_L2_MULTIPLE x the L2 cache between two calls on the same buffer, at most GRAPH_MAX_CALLS."""
    return max(1, min(GRAPH_MAX_CALLS, -(-GRAPH_L2_MULTIPLE * l2_bytes // max(buffer_bytes, 1))))


def replay_times_ms(graph: torch.cuda.CUDAGraph, replays: int) -> list[float]:
    """GPU ms of each of ``replays`` replays of ``graph``, timed with CUDA events, after one untimed
    replay (the first uploads the graph)."""
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def graph_ms_per_call(calls: list[Callable[[], object]], replays: int = GRAPH_REPLAYS) -> float:
    """GPU ms per call: ``calls`` run in turn from one CUDA graph, the median of ``replays`` replays
    divided by their number. Each is called once before the capture, on a side stream (compiling, tuning
    and allocating there, not inside it)."""
    stream = torch.cuda.current_stream()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for call in calls:
                call()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for call in calls:
                call()
    finally:
        torch.cuda.set_stream(stream)  # (a capture that fails leaves its own stream current)
    return statistics.median(replay_times_ms(graph, replays)) / len(calls)
