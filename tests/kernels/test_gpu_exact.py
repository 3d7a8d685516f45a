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


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])  # 16-byte alignment is specialized on
def test_direct_launches_write_what_dispatched_launches_write(offset, monkeypatch):
    """kernels/launch.KernelLauncher: after the first launch of a specialization Triton's dispatch is
    skipped, and the kernel it then calls writes the same bytes."""
    from tritonquant.kernels import launch
    from tritonquant.kernels.dequantize import _dequantize_kernel
    from tritonquant.kernels.quantize import _quantize_kernel

    n = 64 * GROUP + 3
    x = activation_like(n + 1, torch.bfloat16, GROUP, seed=11, device="cuda")[offset:offset + n]
    dispatches = []
    for kernel in (_quantize_kernel, _dequantize_kernel):
        def counting(*args, _run=kernel.run, **kwargs):
            dispatches.append(1)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting)

    def round_trip():
        payload, meta = triton_quantize(x, 4, GROUP, False, False, 0, 0)
        out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device="cuda")
        triton_dequantize(payload, meta, out, 4, GROUP)
        return payload, meta, out

    monkeypatch.setattr(launch, "DIRECT_LAUNCH", False)
    dispatched = round_trip()
    assert len(dispatches) == 2
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", True)
    round_trip()  # the first direct-path launch of each kernel may go through the dispatch once
    before = len(dispatches)
    direct = round_trip()
    assert len(dispatches) == before, "a repeated launch must not go through Triton's dispatch"
    for a, b in zip(direct, dispatched):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
