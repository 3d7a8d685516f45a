"""On a real GPU, compiled kernels equal their torch references bit for bit (a small matrix).

The full parametrized suite runs the same comparison, but on a GPU each kernel specialization is
compiled once; this file covers the main ones (plain, standardized and bool kernels, strided runs,
and addresses past 2**31 elements, which only a GPU has the memory and speed for) in a few dozen
compiles, so the GPU suite checks correctness before it measures anything.
"""

import pytest
import torch

from tests.activations import activation_like, assert_activation_matches_torch
from tritonquant.kernels import (
    torch_dequantize,
    torch_pack_bool,
    torch_quantize,
    torch_unpack_bool,
    triton_dequantize,
    triton_pack_bool,
    triton_quantize,
    triton_unpack_bool,
)
from tritonquant.kernels import autotune
from tritonquant.kernels.channels import COUNT_LIMIT, uses_row_channels
from tritonquant.kernels.launch import BOOL_BLOCK_BYTES

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
    # A range that overflows float32: stored as a non-finite group (the compiled clamp ignores NaN, the
    # references do not, so NaN products must not reach it).
    x[5 * GROUP + 1], x[5 * GROUP + 2] = 3e38, -3e38
    payload, meta = triton_quantize(x, bits, GROUP, scheme == "sigma", stochastic, 3, 7)
    ref_payload, ref_meta = torch_quantize(x, bits, GROUP, scheme == "sigma", stochastic, 3, 7)
    assert torch.equal(payload, ref_payload)
    assert_same_bits(meta, ref_meta, torch.int32, nan_count=2)  # the two bad groups' steps
    out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    ref_out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    triton_dequantize(payload, meta, out, bits, GROUP)
    torch_dequantize(ref_payload, ref_meta, ref_out, bits, GROUP)
    assert_same_bits(out, ref_out, torch.int16 if dtype == torch.bfloat16 else torch.int32, nan_count=2 * GROUP)


@pytest.mark.parametrize("scheme, stochastic", VARIANTS, ids=["minmax", "sigma", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_pipelined_programs_write_what_the_reference_writes(dtype, scheme, stochastic):
    """Compiled programs of several tiles (the tuner's pipelined candidates; the nearest-rounding minmax
    scheme for each, the others for one, to bound the compiles) write the reference's bytes, on a
    tensor whose last program is partial."""
    n = 1001 * GROUP + 5
    x = activation_like(n, dtype, GROUP, seed=4, device="cuda")
    x[600 * GROUP + 9] = float("nan")
    expected = torch_quantize(x, 4, GROUP, scheme == "sigma", stochastic, 3, 7)
    configs = [(tile // GROUP, warps, autotune.PIPELINED_TILES) for tile, warps in autotune.PIPELINED_CANDIDATE_TILES]
    for config in configs if scheme == "minmax" and not stochastic else configs[1:2]:
        with autotune.use_config(config):
            payload, meta = triton_quantize(x, 4, GROUP, scheme == "sigma", stochastic, 3, 7)
        assert torch.equal(payload, expected[0]), config
        assert_same_bits(meta, expected[1], torch.int32, nan_count=1)


@pytest.mark.parametrize("scheme, stochastic", VARIANTS, ids=["minmax", "sigma", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_compiled_kernel_reads_strided_runs_as_their_dense_copy(dtype, scheme, stochastic):
    # GPT-2 small's k at batch 2, sequence 41 (82 runs of 3 groups, 9 groups apart: 246 groups, so the
    # last program's tile is partial), its neighbours NaN: the same bytes as the reference on a dense copy.
    projection = torch.full((2, 41, 3, 12, 64), float("nan"), dtype=dtype, device="cuda")
    projection[:, :, 1] = activation_like(2 * 41 * 12 * 64, dtype, GROUP, seed=1, device="cuda").view(2, 41, 12, 64)
    k = projection.permute(2, 0, 3, 1, 4)[1]
    args = (4, GROUP, scheme == "sigma", stochastic, 3, 7)
    payload, meta = triton_quantize(k, *args, runs=(768, 3 * 768))
    ref_payload, ref_meta = torch_quantize(torch.empty_like(k).copy_(k), *args)
    assert torch.equal(payload, ref_payload)
    assert torch.equal(meta.view(torch.int32), ref_meta.view(torch.int32))


# Standardized packings (BatchNorm inputs, probabilities): each element's channel comes from multiply-high
# division by prepared divisors, or, from COUNT_LIMIT channels on, from 64-bit division (INDEX64).
STANDARDIZED_LAYOUTS = {
    "nchw": (25, 6, 1000),  # (channel stride, channels, elements): partial groups and channels
    "nchw-per-group": (3136, 5, 40000),  # 56 x 56 maps: each group in at most two channels (ROW_CHANNELS)
    "nhwc": (1, 7, 1000),
    "index64": (1, COUNT_LIMIT, COUNT_LIMIT + 300),
}
# Every layout, with both input dtypes and both roundings, in eight cases (on a GPU, each case compiles).
STANDARDIZED_CASES = [
    (torch.bfloat16, 2, "nchw", False), (torch.bfloat16, 2, "nhwc", True), (torch.bfloat16, 2, "index64", False),
    (torch.bfloat16, 2, "nchw-per-group", False),
    (torch.float32, 4, "nchw", True), (torch.float32, 4, "nhwc", False), (torch.float32, 4, "index64", True),
    (torch.float32, 4, "nchw-per-group", True),
]


@pytest.mark.parametrize("dtype, bits, layout, stochastic", STANDARDIZED_CASES, ids=[
    f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}-{bits}bit-{layout}-{'stochastic' if stochastic else 'nearest'}"
    for dtype, bits, layout, stochastic in STANDARDIZED_CASES])
def test_compiled_standardized_kernels_match_references(dtype, bits, layout, stochastic):
    channel_stride, n_channels, n = STANDARDIZED_LAYOUTS[layout]
    assert uses_row_channels(n, channel_stride, n_channels, GROUP) == (layout == "nchw-per-group")
    x = activation_like(n, dtype, GROUP, seed=bits, device="cuda")
    g = torch.Generator().manual_seed(bits)
    channels = torch.stack([torch.randn(n_channels, generator=g), torch.rand(n_channels, generator=g) + 0.1], 1)
    channels = channels.to("cuda")
    args = (bits, GROUP, False, stochastic, 11, 5, channels, channel_stride)
    payload, meta = triton_quantize(x, *args)
    ref_payload, ref_meta = torch_quantize(x, *args)
    assert torch.equal(payload, ref_payload)
    assert torch.equal(meta.view(torch.int32), ref_meta.view(torch.int32))
    out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    ref_out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    triton_dequantize(payload, meta, out, bits, GROUP, channels, channel_stride)
    torch_dequantize(ref_payload, ref_meta, ref_out, bits, GROUP, channels, channel_stride)
    assert_same_bits(out, ref_out, torch.int16 if dtype == torch.bfloat16 else torch.int32, nan_count=0)


@pytest.mark.parametrize("n", [1, 8 * 8 * BOOL_BLOCK_BYTES + 13], ids=["one", "blocks-and-a-tail"])
def test_compiled_bool_kernels_match_references(n):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)).lt(0.3).to("cuda")
    packed = triton_pack_bool(x)
    assert torch.equal(packed, torch_pack_bool(x))
    out = torch.ones(n, dtype=torch.bool, device="cuda")
    ref_out = torch.ones(n, dtype=torch.bool, device="cuda")
    triton_unpack_bool(packed, out)
    torch_unpack_bool(packed, ref_out)
    assert torch.equal(out, ref_out)
    assert torch.equal(out, x)


# Past 2**31 elements every address needs 64 bits (a 4-bit bf16 tensor of this size: 4.3 GB in, 1 GB out);
# past 2**30 groups, every address of the (base, step) pairs too (groups of 8: 17 GB in, 13 GB out).
HUGE_CASES = {
    "past-2**31-elements-nearest": (2**31 + 3 * GROUP + 5, GROUP, False),
    "past-2**31-elements-stochastic": (2**31 + 3 * GROUP + 5, GROUP, True),
    "past-2**30-groups-of-8": (2**33 + 3 * 8 + 5, 8, False),
}
TAIL_GROUPS = 9  # compared with the references: the last groups, the partial one among them


@pytest.mark.parametrize("case", HUGE_CASES)
def test_compiled_kernels_address_past_two_to_the_31_elements(case):
    """Groups are independent (a stochastic group's counters depend on its index alone), so the last
    groups of a huge tensor must equal the references run on those groups alone."""
    n, group, stochastic = HUGE_CASES[case]
    bits, seed, rng_offset = 4, 3, 7
    n_groups = -(-n // group)
    needed = 2 * n + n_groups * (group * bits // 8 + 8)  # input or output, codes, (base, step) pairs
    if torch.cuda.mem_get_info()[0] < needed + 2**30:
        pytest.skip(f"needs {(needed + 2**30) / 2**30:.0f} GB of free GPU memory")
    start = (n_groups - TAIL_GROUPS) * group  # first element of the compared groups
    x = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    x[start:] = activation_like(n - start, torch.bfloat16, group, seed=5, device="cuda")
    payload, meta = triton_quantize(x, bits, group, False, stochastic, seed, rng_offset)
    tail_payload, tail_meta = torch_quantize(x[start:], bits, group, False, stochastic, seed, rng_offset + start // 4)
    assert torch.equal(payload[start * bits // 8:], tail_payload)
    assert torch.equal(meta[-TAIL_GROUPS:].view(torch.int32), tail_meta.view(torch.int32))
    del x
    out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    out[start:] = float("nan")
    triton_dequantize(payload, meta, out, bits, group)
    tail_out = torch.full((n - start,), float("nan"), dtype=torch.bfloat16, device="cuda")
    torch_dequantize(tail_payload, tail_meta, tail_out, bits, group)
    assert_same_bits(out[start:], tail_out, torch.int16, nan_count=0)


def test_compiled_bool_kernels_address_past_two_to_the_31_elements():
    n = 2**31 + 8 * 8 * BOOL_BLOCK_BYTES + 13
    start = n - 3 * 8 * BOOL_BLOCK_BYTES - 13  # a multiple of 8: a byte boundary of the packed bits
    x = torch.zeros(n, dtype=torch.bool, device="cuda")
    x[start:] = torch.rand(n - start, generator=torch.Generator().manual_seed(1)).lt(0.3).to("cuda")
    packed = triton_pack_bool(x)
    assert torch.equal(packed[start // 8:], torch_pack_bool(x[start:]))
    out = torch.zeros(n, dtype=torch.bool, device="cuda")
    triton_unpack_bool(packed, out)
    assert torch.equal(out[start:], x[start:])


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
    skipped, and the kernel it then calls writes the same bytes; so does a launch from a plan, which
    skips computing the specialization too."""
    from tritonquant.kernels import launch
    from tritonquant.kernels.dequantize import _dequantize_kernel, _launch_dequantize
    from tritonquant.kernels.quantize import _launch_quantize, _quantize_kernel

    # (No tuning: it would launch candidates through the dispatch counted here. 16,387 elements fall in a
    # tuned size bucket, and a plain `pytest -m gpu` leaves tuning on.)
    monkeypatch.setenv("TRITONQUANT_AUTOTUNE", "0")
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

    specializations = []
    for launcher in (_launch_quantize, _launch_dequantize):
        monkeypatch.setattr(launcher, "_key", lambda *args, _key=launcher._key: specializations.append(1) or _key(*args))
    planned = round_trip()
    assert not specializations and len(dispatches) == before, "the launch before made a plan; this one must use it"
    for a, b in zip(planned, dispatched):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_compiled_activation_epilogue_matches_torchs_cuda_activation(dtype, activation):
    # Not bit for bit: Triton's erf and exp against the CUDA library's (tests/activations.py says how close).
    n = 257 * GROUP + 5
    x = activation_like(n, dtype, GROUP, seed=5, device="cuda")
    payload, meta = triton_quantize(x, 4, GROUP, False, False, 0, 0)
    plain = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
    triton_dequantize(payload, meta, plain, 4, GROUP)
    decoded, activated = torch.full_like(plain, float("nan")), torch.full_like(plain, float("nan"))
    triton_dequantize(payload, meta, decoded, 4, GROUP, activation=activation, activated=activated)
    assert torch.equal(decoded, plain)
    assert_activation_matches_torch(activated, decoded, activation)
