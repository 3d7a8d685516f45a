"""kernels/gpu_timing.py: how many buffer sets a graph of calls rotates over. (The graph itself needs a
GPU: tests/kernels/test_autotune.py times a real tuning from one, and benchmarks/bench_kernels.py's
graph column is checked in tests/benchmarks/test_bench_kernels.py.)"""

import pytest

from tritonquant.kernels.gpu_timing import GRAPH_MAX_CALLS, rotation_count


@pytest.mark.parametrize("buffer_bytes, expected", [
    (1 << 20, 200),  # 1 MiB buffers against a 50 MiB cache: 200 calls read 4 x the cache
    (16 << 20, 13),
    (256 << 20, 1),  # one buffer already holds more than 4 x the cache
    (1024, GRAPH_MAX_CALLS),  # at most 256
    (0, GRAPH_MAX_CALLS),  # (an empty buffer: the most calls, no division by zero)
], ids=["1MiB", "16MiB", "256MiB", "1KiB", "empty"])
def test_a_graph_rotates_over_enough_buffers_to_read_past_the_cache(buffer_bytes, expected):
    assert rotation_count(buffer_bytes, 50 << 20) == expected
