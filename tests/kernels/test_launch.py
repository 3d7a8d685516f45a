"""kernels/launch.py: the integer helpers, flat_view, strided_runs, and KernelLauncher's direct launches.

The direct-launch check needs Triton's real compiler, so it runs ``direct_launch_check.py`` in a
subprocess without TRITON_INTERPRET, with a recording fake driver (no GPU needed). On a GPU,
tests/kernels/test_gpu_exact.py also compares the bytes of direct and dispatched launches.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonquant.kernels.launch import cdiv, flat_view, int_width, next_power_of_2, runs_view, strided_runs

SCRIPT = Path(__file__).with_name("direct_launch_check.py")


@pytest.mark.parametrize("a, b, expected", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (4097, 256, 17)])
def test_cdiv(a, b, expected):
    assert cdiv(a, b) == expected


@pytest.mark.parametrize("n, expected", [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (2**20 + 1, 2**21)])
def test_next_power_of_2(n, expected):
    assert next_power_of_2(n) == expected


@pytest.mark.parametrize("value, expected", [(0, 0), (-2**31, 0), (2**31 - 1, 0), (2**31, 1), (-2**31 - 1, 1),
                                             (2**63 - 1, 1), (2**63, 2), (2**64 - 1, 2)],
                         ids=["zero", "int32-min", "int32-max", "past-int32", "below-int32", "int64-max", "uint64",
                              "uint64-max"])
def test_int_width_is_the_type_triton_gives_an_unspecialized_int(value, expected):
    assert int_width(value) == expected
    try:  # Triton's own binder, where this Triton has it (the direct launches rely on it too)
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        backend = make_backend(GPUTarget("cuda", 90, 32))
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"Triton's binder is not at hand: {exc}")
    type_name, _ = native_specialize_impl(backend, value, False, False, True)
    assert type_name == ("i32", "i64", "u64")[expected]


@pytest.mark.parametrize("layout", ["1d", "contiguous", "channels_last", "permuted"])
def test_flat_view_is_the_run_of_memory(layout):
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32)
    x = {
        "1d": base,
        "contiguous": base.view(2, 3, 4, 5),
        "channels_last": base.view(2, 4, 5, 3).permute(0, 3, 1, 2),
        "permuted": base.view(5, 4, 3, 2).permute(3, 2, 1, 0),
    }[layout]
    flat = flat_view(x)
    assert flat.dim() == 1 and flat.data_ptr() == x.data_ptr()
    assert torch.equal(flat, base), "the elements in memory order, no copy"


def _qkv(index: int) -> torch.Tensor:
    """q, k or v of attention: [batch 2, heads 4, seq 5, head_dim 8] views of one [2, 5, 96] projection."""
    return torch.arange(2 * 5 * 96.0).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)[index]


STRIDED_RUNS = {  # name: (make, expected (run, run_stride) or None)
    "q": (lambda: _qkv(0), (32, 96)),
    "v": (lambda: _qkv(2), (32, 96)),
    "chunk-half": (lambda: torch.zeros(3, 7, 40).chunk(2, dim=-1)[1], (20, 40)),
    "column-slice": (lambda: torch.zeros(6, 10)[:, 2:5], (3, 10)),
    "every-other": (lambda: torch.zeros(12)[::2], (1, 2)),
    "size-one-dims-ignored": (lambda: torch.zeros(6, 1, 10)[:, :, :4].transpose(0, 1), (4, 10)),
    "contiguous": (lambda: torch.zeros(4, 6), None),
    "permuted-dense": (lambda: torch.zeros(4, 6, 5).permute(2, 0, 1), None),
    "broadcast": (lambda: torch.zeros(4, 1).expand(4, 6), None),
    "rows-of-runs": (lambda: torch.zeros(6, 10)[::2, :4], (4, 20)),
    "two-strides": (lambda: torch.zeros(4, 6, 10)[:, :3, :4], None),  # runs 10 apart in threes, 60 apart between
    "overlapping": (lambda: torch.zeros(20).as_strided((4, 5), (2, 1)), None),
}


@pytest.mark.parametrize("name", STRIDED_RUNS)
def test_strided_runs_finds_equal_runs_at_one_stride(name):
    make, expected = STRIDED_RUNS[name]
    x = make()
    assert strided_runs(x) == expected
    if expected is not None:  # the runs, one per row, are the elements in the order of a dense copy
        dense_copy = torch.empty_like(x).copy_(x)
        assert torch.equal(runs_view(x, expected).reshape(-1), flat_view(dense_copy))


@pytest.mark.cpu_only
def test_direct_launches_pass_what_the_dispatch_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600,
                            cwd=SCRIPT.parents[2])
    if result.returncode == 2:
        pytest.skip(result.stdout.strip() or "this Triton's internals differ from the fake driver's")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, "\n".join(lines[-3:]) or result.stderr[-3000:]
    # Nine quantize argument sets, and the dequantize kernel with three values of its string constexpr.
    assert sum(line.endswith("identical launcher arguments)") for line in lines) == 12
    # Twelve calls of triton_quantize (two with the same tile, one and two tiles a program) and four of
    # triton_dequantize, each made into a plan of its own; three through tq.quantize and tq.dequantize, four
    # of the pack op and four of the unpack op, eight of which launch by their fourth call what their
    # first call prepared.
    assert sum(line.endswith("from a plan by the fourth call)") for line in lines) == 19
    assert sum(line.endswith("from a plan by the fourth call, what the first call prepared)") for line in lines) == 8
