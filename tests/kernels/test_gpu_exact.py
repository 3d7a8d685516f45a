"""On a real GPU, compiled kernels equal their torch references bit for bit (a small matrix).

The full parametrized suite runs the same comparison, but on a GPU each kernel specialization is
compiled once; this file covers the main ones in a couple of dozen compiles, so the GPU suite checks
correctness before it measures anything.
"""

import pytest
import torch

from tests.activations import activation_like
from tritonquant.kernels import torch_dequantize, torch_quantize, triton_dequantize, triton_quantize

pytestmark = pytest.mark.gpu

GROUP = 256
VARIANTS = [("minmax", False), ("sigma", False), ("minmax", True)]


@pytest.mark.parametrize("scheme, stochastic", VARIANTS, ids=["minmax", "sigma", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
def test_compiled_kernels_match_references(bits, dtype, scheme, stochastic):
    n = 257 * GROUP + 5  # a partial last group
    x = activation_like(n, dtype, GROUP, seed=bits, device="cuda")
    payload, meta = triton_quantize(x, bits, GROUP, scheme == "sigma", stochastic, 3, 7)
    ref_payload, ref_meta = torch_quantize(x, bits, GROUP, scheme == "sigma", stochastic, 3, 7)
    assert torch.equal(payload, ref_payload)
    assert torch.equal(meta.view(torch.int32), ref_meta.view(torch.int32))
    out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    ref_out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    triton_dequantize(payload, meta, out, bits, GROUP)
    torch_dequantize(ref_payload, ref_meta, ref_out, bits, GROUP)
    as_int = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(as_int), ref_out.view(as_int))
