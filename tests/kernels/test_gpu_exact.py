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


@pytest.mark.parametrize("n", [257 * GROUP + 5, 256 * GROUP], ids=["partial", "whole"])  # the kernel's EVEN path
@pytest.mark.parametrize("scheme, stochastic", VARIANTS, ids=["minmax", "sigma", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
def test_compiled_kernels_match_references(bits, dtype, scheme, stochastic, n):
    x = activation_like(n, dtype, GROUP, seed=bits, device="cuda")
    x[3 * GROUP + 7] = float("nan")  # a non-finite group: NaN-propagating reductions on the GPU
    payload, meta = triton_quantize(x, bits, GROUP, scheme == "sigma", stochastic, 3, 7)
    ref_payload, ref_meta = torch_quantize(x, bits, GROUP, scheme == "sigma", stochastic, 3, 7)
    assert torch.equal(payload, ref_payload)
    assert_same_bits(meta, ref_meta, torch.int32, nan_count=1)  # the NaN group's step
    out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    ref_out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    triton_dequantize(payload, meta, out, bits, GROUP)
    torch_dequantize(ref_payload, ref_meta, ref_out, bits, GROUP)
    assert_same_bits(out, ref_out, torch.int16 if dtype == torch.bfloat16 else torch.int32, nan_count=GROUP)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, as_int: torch.dtype, nan_count: int) -> None:
    """Bit for bit, except that NaNs need only be NaN in the same places (their payload bits are not
    part of the format); ``nan_count`` of them are expected."""
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert nan.sum().item() == nan_count
    assert torch.equal(a.view(as_int)[~nan], b.view(as_int)[~nan])
