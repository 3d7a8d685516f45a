"""kernels/launch.py: the integer helpers, flat_view, and KernelLauncher's direct launches.

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

from tritonquant.kernels.launch import cdiv, flat_view, next_power_of_2

SCRIPT = Path(__file__).with_name("direct_launch_check.py")


@pytest.mark.parametrize("a, b, expected", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (4097, 256, 17)])
def test_cdiv(a, b, expected):
    assert cdiv(a, b) == expected


@pytest.mark.parametrize("n, expected", [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (2**20 + 1, 2**21)])
def test_next_power_of_2(n, expected):
    assert next_power_of_2(n) == expected


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


@pytest.mark.cpu_only
def test_direct_launches_pass_what_the_dispatch_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600,
                            cwd=SCRIPT.parents[2])
    if result.returncode == 2:
        pytest.skip(result.stdout.strip() or "this Triton's internals differ from the fake driver's")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, "\n".join(lines[-3:]) or result.stderr[-3000:]
    assert sum(line.endswith("identical launcher arguments)") for line in lines) == 9
