"""The kernels compile for real NVIDIA GPUs (sm_90, sm_80), checked on any machine.

The CPU interpreter runs kernels the compiler would reject (it allowed non-constexpr globals, for one),
so this compiles each kernel variant through Triton's real pipeline and the bundled ptxas, in a
subprocess that does not set TRITON_INTERPRET.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


@pytest.mark.cpu_only
def test_every_kernel_compiles_to_a_cubin_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env,
                            timeout=900, cwd=SCRIPT.parents[2])
    lines = result.stdout.strip().splitlines()
    failed = [line for line in lines if "FAILED" in line]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stderr[-3000:]
    # 20 quantize variants at the 16-row tile (one with 64-bit channel indices, one reading channel
    # statistics per group, one reading strided runs) and 2 at the 32-row one (rows shared by 4 threads),
    # 18 dequantize (the same two channel kinds among them) and 3 that also apply an activation (GELU in
    # both forms, SiLU), 2 bool and 4 pool-index ones (encode and decode, two windows), for 2 targets.
    assert sum(": ok (" in line for line in lines) == 98
    # With Triton's bundled disassembler, every sm_90 quantize, dequantize and pool-index variant is counted
    # (and a quantize variant that converts floats to integers per element fails above).
    import triton

    if (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        counted = [line for line in lines if "quantize" in line and "[sm90]" in line]
        assert len(counted) == 43 and all(" per element, " in line for line in counted), "\n".join(counted)
        counted = [line for line in lines if "pool indices" in line and "[sm90]" in line]
        assert len(counted) == 4 and all(" per element, " in line for line in counted), "\n".join(counted)
