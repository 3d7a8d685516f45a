"""The kernels compile for real NVIDIA GPUs (sm_90, sm_80), checked on any machine.

The CPU interpreter runs kernels the compiler would reject (it allowed non-constexpr globals, for one),
so this compiles each kernel variant through Triton's real pipeline and the bundled ptxas, in a
subprocess that does not set TRITON_INTERPRET.
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def test_every_kernel_compiles_to_a_cubin_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env,
                            timeout=900, cwd=SCRIPT.parents[2])
    lines = result.stdout.strip().splitlines()
    failed = [line for line in lines if "FAILED" in line]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stderr[-3000:]
    assert sum(": ok (" in line for line in lines) == 70  # 17 quantize + 16 dequantize + 2 bool, x 2 targets
