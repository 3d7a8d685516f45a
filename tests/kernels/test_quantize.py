"""Quantize/dequantize kernels against their torch references and against the format's rules.

Rules checked here (docs/format.md): codes in range; error at most half a step for nearest rounding
except where sign preservation moves a value, at most one step always (within the grid's window);
exact zeros stay zero and signs never flip (1 bit: for one-signed groups); a non-finite group decodes
to non-finite; stochastic rounding is unbiased and reproducible and leaves torch's RNG alone.
"""

import contextlib
import itertools
import math

import pytest
import torch

from tests.activations import activation_like
from tritonquant.kernels import autotune
from tritonquant.kernels import quantize as quantize_module
from tritonquant.kernels import torch_dequantize, torch_quantize, triton_dequantize, triton_quantize
from tritonquant.kernels.quantize import payload_nbytes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = (1, 2, 4, 8)
SIZES = (1, 63, 64, 1000, 4099)
GROUP = 64


def quantize(flat, bits, scheme="minmax", stochastic=False, seed=0, offset=0, group_size=GROUP, backend="torch"):
    fn = triton_quantize if backend == "triton" else torch_quantize
    return fn(flat, bits, group_size, scheme == "sigma", stochastic, seed, offset)


def decode_fp32(payload, meta, n, bits, group_size=GROUP):
    out = torch.empty(n, dtype=torch.float32, device=meta.device)
    torch_dequantize(payload, meta, out, bits, group_size)
    return out


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("scheme", ["minmax", "sigma"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_triton_matches_torch_bit_for_bit(n, bits, dtype, scheme, stochastic, device):
    x = activation_like(n, dtype, GROUP, seed=n + bits, device=device)
    p_triton, m_triton = quantize(x, bits, scheme, stochastic, seed=11, offset=5, backend="triton")
    p_torch, m_torch = quantize(x, bits, scheme, stochastic, seed=11, offset=5, backend="torch")
    assert torch.equal(p_triton, p_torch)
    assert torch.equal(m_triton.view(torch.int32), m_torch.view(torch.int32)), "meta bits, signed zeros included"
    # NaN-filled outputs: any element a kernel forgets to write shows up.
    out_triton = torch.full((n,), float("nan"), dtype=dtype, device=device)
    out_torch = torch.full((n,), float("nan"), dtype=dtype, device=device)
    triton_dequantize(p_triton, m_triton, out_triton, bits, GROUP)
    torch_dequantize(p_torch, m_torch, out_torch, bits, GROUP)
    bits_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out_triton.view(bits_view), out_torch.view(bits_view)), "output bits, signed zeros included"
    assert torch.isfinite(out_triton).all(), "finite inputs decode finite"



@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
# Channel strides of the group size or more (GROUP is 64) take the kernels' per-group path (ROW_CHANNELS):
# a group in one channel ("group-sized"), or across two ("wide", "wider"), the last channel wrapping to 0.
@pytest.mark.parametrize("channel_stride, n_channels", [(1, 7), (25, 6), (64, 5), (100, 3), (130, 4)],
                         ids=["nhwc", "nchw", "group-sized", "wide", "wider"])
@pytest.mark.parametrize("scheme", ["minmax", "sigma"])
def test_standardized_triton_matches_torch_bit_for_bit(scheme, channel_stride, n_channels, bits, dtype, stochastic,
                                                       device):
    n = 1000  # not a multiple of the group size or of any channel layout: partial groups and channels
    x = activation_like(n, dtype, GROUP, seed=bits, device=device)
    g = torch.Generator().manual_seed(bits)
    channels = torch.stack([torch.randn(n_channels, generator=g), torch.rand(n_channels, generator=g) + 0.1], 1)
    channels = channels.to(device)
    outputs = []
    for backend, dequantize in (("triton", triton_dequantize), ("torch", torch_dequantize)):
        fn = triton_quantize if backend == "triton" else torch_quantize
        payload, meta = fn(x, bits, GROUP, scheme == "sigma", stochastic, 11, 5, channels, channel_stride)
        out = torch.full((n,), float("nan"), dtype=dtype, device=device)
        dequantize(payload, meta, out, bits, GROUP, channels, channel_stride)
        outputs.append((payload, meta, out))
    (p_triton, m_triton, out_triton), (p_torch, m_torch, out_torch) = outputs
    assert torch.equal(p_triton, p_torch)
    assert torch.equal(m_triton.view(torch.int32), m_torch.view(torch.int32))
    bits_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out_triton.view(bits_view), out_torch.view(bits_view))
    assert torch.isfinite(out_triton).all()


def test_standardized_reference_is_the_plain_reference_around_an_affine_map(device):
    """The standardized torch reference equals the plain one applied to (x - minimum) * (1 / scale) + 1,
    the reciprocal rounded to fp32 (docs/format.md), with the inverse map taken in fp32 before the one
    rounding to the output dtype. With each channel's own minimum (what the library uses) every mapped
    value is 1 or more, where the plain grid's sign rule allows every code, as the standardized one
    (which has no sign rule) does."""
    n, channel_stride, n_channels = 1000, 25, 6
    x = activation_like(n, torch.float32, GROUP, seed=1, device=device).nan_to_num(0.0)
    channel = (torch.arange(n, device=device) // channel_stride) % n_channels
    minima = torch.stack([x[channel == c].min() for c in range(n_channels)]).cpu()
    channels = torch.stack([minima, torch.linspace(0.5, 3, n_channels)], 1).to(device)
    minimum, scale = channels[channel, 0], channels[channel, 1]
    payload, meta = torch_quantize(x, 4, GROUP, False, False, 0, 0, channels, channel_stride)
    plain_payload, plain_meta = torch_quantize((x - minimum) * (1.0 / scale) + 1.0, 4, GROUP, False, False, 0, 0)
    assert torch.equal(payload, plain_payload) and torch.equal(meta, plain_meta)
    out = torch.empty(n, device=device)
    torch_dequantize(payload, meta, out, 4, GROUP, channels, channel_stride)
    assert torch.equal(out, (decode_fp32(plain_payload, plain_meta, n, 4) - 1.0) * scale + minimum)


@pytest.mark.parametrize("layout", ["plain", "nchw", "wide"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("scheme", ["minmax", "sigma"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_torch_reference_in_chunks_writes_what_it_writes_whole(bits, scheme, stochastic, layout, monkeypatch):
    """On the CPU the torch references work through a tensor a few groups at a time: chunks of 2 groups
    and grids worked out 4 groups at a time here, against one chunk for the whole tensor. Chunk starts
    fall inside channels (strides 25 and 100 elements), the dither counters continue across chunks, and
    the last chunk holds a partial group."""
    n, dtype, device = 1000, torch.bfloat16, "cpu"
    channel_stride, n_channels = {"plain": (1, 0), "nchw": (25, 6), "wide": (100, 3)}[layout]
    channels = None
    if n_channels:
        g = torch.Generator().manual_seed(bits)
        channels = torch.stack([torch.randn(n_channels, generator=g), torch.rand(n_channels, generator=g) + 0.1], 1)
        channels = channels.to(device)
    x = activation_like(n, dtype, GROUP, seed=bits, device=device)
    results = []
    for chunk in (1 << 20, 2 * GROUP):
        monkeypatch.setattr(quantize_module, "TORCH_CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(quantize_module, "TORCH_CHUNK_MIN_ELEMENTS", chunk)
        monkeypatch.setattr(quantize_module, "TORCH_GRID_GROUPS", 5)  # spans of 2 chunks
        payload, meta = torch_quantize(x, bits, GROUP, scheme == "sigma", stochastic, 11, 5, channels, channel_stride)
        out = torch.full((n,), float("nan"), dtype=dtype, device=device)
        torch_dequantize(payload, meta, out, bits, GROUP, channels, channel_stride)
        results.append((payload, meta.view(torch.int32), out.view(torch.int16)))
    (whole_payload, whole_meta, whole_out), (payload, meta, out) = results
    assert torch.equal(payload, whole_payload)
    assert torch.equal(meta, whole_meta)
    assert torch.equal(out, whole_out)


def test_torch_reference_never_takes_more_than_a_chunk(monkeypatch):
    """What bounds the CPU torch backend's temporaries: each step of the reference sees at most a chunk:
    an eighth of the tensor, within the two limits, in whole groups (and on other devices, or under
    torch.compile, the whole tensor)."""
    monkeypatch.setattr(quantize_module, "TORCH_CHUNK_ELEMENTS", 8 * GROUP)
    monkeypatch.setattr(quantize_module, "TORCH_CHUNK_MIN_ELEMENTS", 2 * GROUP)
    chunk = quantize_module.torch_chunk_elements
    cpu = torch.device("cpu")
    assert chunk(100_000, GROUP, cpu) == 8 * GROUP  # an eighth would be more than the most
    assert chunk(4000, GROUP, cpu) == 7 * GROUP  # an eighth, 500 elements, in whole groups
    assert chunk(1000, GROUP, cpu) == 2 * GROUP  # an eighth would be less than the least
    monkeypatch.setattr(quantize_module, "TORCH_GRID_GROUPS", 30)
    runs, grids = [], []
    values, grid = quantize_module._torch_group_values, quantize_module._torch_grid
    monkeypatch.setattr(quantize_module, "_torch_group_values", lambda flat, *args: runs.append(flat.numel()) or
                        values(flat, *args))
    monkeypatch.setattr(quantize_module, "_torch_grid", lambda lo, *args, **kwargs: grids.append(lo.numel()) or
                        grid(lo, *args, **kwargs))
    torch_quantize(torch.randn(4000), 4, GROUP, False, False, 0, 0)
    # Spans of 4 chunks (28 groups, at most 30), each in two passes: the groups' ranges, then their codes;
    # the last span is one chunk, whose values are kept from its first pass for its second.
    assert runs == [448] * 8 + [448] * 8 + [416]
    assert grids == [28, 28, 7]
    runs.clear()
    torch_quantize(torch.randn(100), 4, GROUP, False, False, 0, 0)
    assert runs == [100]  # one chunk: its values are kept from the first pass for the second
    assert chunk(100_000, GROUP, torch.device("cuda")) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert chunk(100_000, GROUP, cpu) is None


RUN_VARIANTS = {"nearest": ("minmax", False), "stochastic": ("minmax", True), "sigma": ("sigma", False)}


@pytest.mark.parametrize("variant", RUN_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_runs_are_read_where_they_lie_and_packed_as_their_dense_copy(bits, dtype, variant, device):
    """q, k and v of attention ([batch, heads, seq, head_dim] views of one [batch, seq, 3 * heads *
    head_dim] projection), read through ``runs``: the same bytes as a dense copy packed by the reference.
    The runs' neighbours hold NaN, so a read outside them would turn its group's step to NaN. 10 runs of
    3 groups: 30 groups, a partial last tile for the interpreter's and the GPU's tiles."""
    scheme, stochastic = RUN_VARIANTS[variant]
    batch, seq, heads, head_dim = 2, 5, 3, GROUP
    values = activation_like(batch * seq * heads * head_dim * 3, dtype, GROUP, seed=bits, device=device)
    projection = values.view(batch, seq, 3, heads, head_dim)
    for index in range(3):
        only_this = torch.full_like(projection, float("nan"))
        only_this[:, :, index] = projection[:, :, index]
        view = only_this.permute(2, 0, 3, 1, 4)[index]  # [batch, heads, seq, head_dim], runs heads * head_dim long
        runs = (heads * head_dim, 3 * heads * head_dim)
        dense_copy = torch.empty_like(view).copy_(view)
        expected = quantize(dense_copy, bits, scheme, stochastic, seed=5, offset=8)
        for backend in ("torch", "triton", "triton, pipelined"):
            fn = torch_quantize if backend == "torch" else triton_quantize
            # Pipelined: 3 tiles of 4 groups a program, the last program's partial.
            with autotune.use_config((4, 2, 3)) if backend.endswith("pipelined") else contextlib.nullcontext():
                payload, meta = fn(view, bits, GROUP, scheme == "sigma", stochastic, 5, 8, runs=runs)
            assert torch.equal(payload, expected[0]), (backend, index)
            assert torch.equal(meta, expected[1]), (backend, index)


@pytest.mark.parametrize("runs, channels, message", [
    ((96, 192), None, "multiple of group_size"),  # 1.5 groups per run
    ((192, 256), None, "divides the"),  # 640 elements are not whole runs of 192
    ((64, 64), None, "run_stride > run"),
    ((64, 128), torch.ones(1, 2), "channels"),
], ids=["partial-group", "partial-run", "no-gap", "standardized"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_runs_the_kernel_cannot_read_are_refused(backend, runs, channels, message):
    fn = triton_quantize if backend == "triton" else torch_quantize
    x = torch.zeros(640 * 2).as_strided((5, 128), (256, 1))  # 640 elements
    with pytest.raises(ValueError, match=message):
        fn(x, 4, GROUP, False, False, 0, 0, channels, 1, runs=runs)


@pytest.mark.parametrize("bits", (2, 4), ids=lambda b: f"{b}bit")
def test_references_compile_with_dynamic_shapes_and_give_the_same_bytes(bits):
    """The roofline benchmark compiles the references as here: dynamic shapes, ``bits`` held in a
    closure, which Dynamo then traces as a symbolic int. Under torch 2.11 a shift by it (``1 << bits``)
    failed to trace; the references compute ``2**bits`` instead. (aot_eager: the failure was in Dynamo's
    tracing, before any backend.)"""
    torch._dynamo.reset()
    try:
        quantize_compiled = torch.compile(lambda t: torch_quantize(t, bits, GROUP, False, False, 0, 0),
                                          dynamic=True, backend="aot_eager")
        dequantize_compiled = torch.compile(lambda p, m, o: torch_dequantize(p, m, o, bits, GROUP),
                                            dynamic=True, backend="aot_eager")
        for n in (640, 1280):  # a second size: served by the same dynamic graph
            x = activation_like(n, torch.bfloat16, GROUP, seed=n)
            payload, meta = torch_quantize(x, bits, GROUP, False, False, 0, 0)
            got_payload, got_meta = quantize_compiled(x)
            assert torch.equal(got_payload, payload) and torch.equal(got_meta, meta)
            out, got_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
            torch_dequantize(payload, meta, out, bits, GROUP)
            dequantize_compiled(payload, meta, got_out)
            assert torch.equal(got_out, out)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_output_is_fp32_decode_rounded_to_dtype(dtype, device):
    x = activation_like(2000, dtype, GROUP, seed=3, device=device)
    payload, meta = quantize(x, 4, backend="triton")
    out = torch.empty_like(x)
    triton_dequantize(payload, meta, out, 4, GROUP)
    assert torch.equal(out, decode_fp32(payload, meta, x.numel(), 4).to(dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_output_saturates_at_its_largest_finite_value(backend, device):
    # docs/format.md, Layout: decoded values round to the dtype, finite values saturating at its largest
    # finite value. At 2 bits this group's top level lies near 81880, past fp16's 65504.
    x = torch.zeros(GROUP, dtype=torch.float16, device=device)
    x[0], x[1] = -57316.0, 65504.0
    payload, meta = quantize(x, 2, backend=backend)
    assert (meta[0, 0] + 3 * meta[0, 1]).item() > 65504  # the grid overshoots fp16's range
    out = torch.empty_like(x)
    (triton_dequantize if backend == "triton" else torch_dequantize)(payload, meta, out, 2, GROUP)
    assert torch.isfinite(out).all() and out[1].item() == 65504.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_any_nan_step_decodes_to_nan_in_bf16(backend, device):
    # docs/format.md, rule 5 and "Bit-exact backends": a NaN step decodes to NaN, whatever its payload
    # bits. Rounding 0x7FFFFFFF's bits to bf16 as if it were a number would carry into the sign: -0.0.
    meta = torch.zeros(1, 2, device=device)
    meta.view(torch.int32)[0, 1] = 0x7FFFFFFF  # a NaN other than the canonical 0x7FC00000
    payload = torch.arange(GROUP // 2, dtype=torch.uint8, device=device)  # 4-bit codes, zero among them
    out = torch.zeros(GROUP, dtype=torch.bfloat16, device=device)
    (triton_dequantize if backend == "triton" else torch_dequantize)(payload, meta, out, 4, GROUP)
    assert out.isnan().all()


def group_view(t, group_size=GROUP):
    n_groups = -(-t.numel() // group_size)
    padded = torch.full((n_groups * group_size,), float("nan"), dtype=torch.float32, device=t.device)
    padded[: t.numel()] = t.float()
    return padded.view(n_groups, group_size)


def grid_facts(x, meta, bits):
    """Per group: step, zero code z (or None), whether z was pushed off its nearest position."""
    levels_m1 = 2**bits - 1
    xg = group_view(x)
    lo = torch.nan_to_num(xg, nan=float("inf")).amin(1)
    hi = torch.nan_to_num(xg, nan=float("-inf")).amax(1)
    base, step = meta[:, 0], meta[:, 1]
    mixed = (lo < 0) & (hi > 0)
    z = torch.where(mixed, torch.round(-base / step), torch.zeros_like(base))
    # A side holding less than half a step still gets its own level; the other side loses up to half a step.
    forced = mixed & (((z == 1) & (-lo < step / 2)) | ((z == levels_m1 - 1) & (hi < step / 2)))
    return xg, lo, hi, step, forced


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_minmax_nearest_error_bounds(bits, device):
    x = activation_like(4096, torch.float32, GROUP, seed=bits, device=device)
    payload, meta = quantize(x, bits)
    xh = group_view(decode_fp32(payload, meta, x.numel(), bits))
    xg, lo, hi, step, forced = grid_facts(x, meta, bits)
    err = (xh - xg).abs()
    slack = 1 + 2**-16  # fp32 rounding in t = (x - base) / step
    step = step.abs()[:, None]
    assert (err <= step * slack + 1e-30).all(), "every value within one step"
    zero_in_range = ((lo <= 0) & (hi >= 0))[:, None]
    moved = zero_in_range & (xg != 0) & (xg.abs() < step * slack)
    exempt = moved | forced[:, None]
    assert (err[~exempt] <= (step / 2 * slack + 1e-30).expand_as(err)[~exempt]).all(), "half a step unless moved"


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_sigma_error_bounds_inside_window_and_clamps_outside(bits, device):
    x = activation_like(4096, torch.float32, GROUP, seed=10 + bits, device=device)
    x[::97] *= 30  # outliers that the sigma window leaves outside
    payload, meta = quantize(x, bits, scheme="sigma")
    xh = group_view(decode_fp32(payload, meta, x.numel(), bits))
    xg = group_view(x)
    base, step = meta[:, 0:1], meta[:, 1:2]
    ends = torch.cat([base, base + (2**bits - 1) * step], dim=1)
    g_lo, g_hi = ends.amin(1, keepdim=True), ends.amax(1, keepdim=True)
    inside = (xg >= g_lo - step.abs() / 2) & (xg <= g_hi + step.abs() / 2)
    err = (xh - xg).abs()
    assert (err[inside] <= (step.abs() * (1 + 2**-16)).expand_as(err)[inside]).all()
    outside = ~inside & ~xg.isnan()
    assert outside.any(), "test needs values outside the window"
    # Clamped values land on the window's end on their own side (or at zero when sign keeps them there).
    assert (xh[outside] >= torch.minimum(g_lo, torch.zeros_like(g_lo)).expand_as(xh)[outside]).all()
    assert (xh[outside] <= torch.maximum(g_hi, torch.zeros_like(g_hi)).expand_as(xh)[outside]).all()


@pytest.mark.parametrize("scheme", ["minmax", "sigma"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_codes_in_range_and_stochastic_within_one_step(bits, scheme, device):
    x = activation_like(2048, torch.float32, GROUP, seed=bits, device=device)
    payload, meta = quantize(x, bits, scheme, stochastic=True, seed=5)
    assert payload.dtype == torch.uint8
    xh = decode_fp32(payload, meta, x.numel(), bits)
    assert torch.isfinite(xh).all()
    if scheme == "minmax":
        step = group_view(torch.ones_like(x)) * meta[:, 1:2].abs()
        assert ((group_view(xh) - group_view(x)).abs() <= step * (1 + 2**-16)).all()


@pytest.mark.parametrize("scheme", ["minmax", "sigma"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_zeros_exact_and_signs_kept(bits, stochastic, scheme, device):
    x = activation_like(4096, torch.float32, GROUP, seed=20 + bits, device=device)
    payload, meta = quantize(x, bits, scheme, stochastic, seed=3)
    xh = decode_fp32(payload, meta, x.numel(), bits)
    zero = x == 0
    assert zero.any() and (xh[zero] == 0).all()
    xg, xhg = group_view(x), group_view(xh)
    if bits == 1:  # one bit keeps signs for groups of one sign
        one_signed = ~((xg.nan_to_num(0) < 0).any(1) & (xg.nan_to_num(0) > 0).any(1))
        xg, xhg = xg[one_signed], xhg[one_signed]
    pos, neg = xg > 0, xg < 0
    assert (xhg[pos] > 0).all() and (xhg[neg] < 0).all()


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zeros_exact_in_groups_whose_step_has_no_reciprocal(backend, bits, stochastic, device):
    # Mixed-sign groups of subnormals: step is below 2**-126 (no finite reciprocal, every t is 0); in the
    # third group it underflows to exactly 0 from 4 bits on (every code then decodes to 0; at 2 bits
    # 2 * 2**-149 / 3 still rounds up to 2**-149).
    g = torch.Generator().manual_seed(bits)
    signs = torch.randint(-1, 2, (3, GROUP), generator=g).float()
    signs[:, :3] = torch.tensor([-1.0, 0.0, 1.0])  # both signs and a zero in every group
    x = (signs * torch.tensor([2.0**-128, 2.0**-140, 2.0**-149])[:, None]).reshape(-1).to(device)
    payload, meta = quantize(x, bits, stochastic=stochastic, seed=3, backend=backend)
    steps = meta[:, 1].abs()
    assert (steps < 2.0**-126).all() and (steps[:2] > 0).all() and (steps[2] == 0) == (bits > 2)
    xh = group_view(decode_fp32(payload, meta, x.numel(), bits))
    xg = group_view(x)
    assert (xh[xg == 0] == 0).all() and not xh[xg == 0].signbit().any()
    kept = steps > 0  # groups where codes can tell the signs apart
    assert (xh[kept][xg[kept] > 0] > 0).all() and (xh[kept][xg[kept] < 0] < 0).all()
    if backend == "triton":  # (the torch backend is the reference)
        reference = quantize(x, bits, stochastic=stochastic, seed=3, backend="torch")
        assert torch.equal(payload, reference[0]) and torch.equal(meta, reference[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_thin_negative_side_keeps_a_level_of_its_own(backend, device):
    # docs/format.md, rule 3: from 2 bits on, z is clamped to [1, 2^bits - 2], so each sign keeps a level.
    # Here -0.01 is under half a step (about 1.0) from zero: unclamped, z would be 0 and -0.01 would decode
    # to 0, breaking the sign rule.
    x = torch.linspace(0.1, 3.0, GROUP, device=device)
    x[0] = -0.01
    payload, meta = quantize(x, 2, backend=backend)
    decoded = decode_fp32(payload, meta, GROUP, 2)
    assert decoded[0] < 0 and (decoded[1:] > 0).all()


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_relu_mask_recovered_exactly(bits, device):
    pre = activation_like(4096, torch.float32, GROUP, seed=1, device=device)
    post = pre.clamp(min=0)
    payload, meta = quantize(post, bits)
    xh = decode_fp32(payload, meta, post.numel(), bits)
    assert torch.equal(xh > 0, post > 0)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("scheme", ["minmax", "sigma"])
def test_grid_values_and_constant_groups_roundtrip_exactly(bits, scheme, device):
    levels = 2**bits
    g = torch.Generator().manual_seed(bits)
    # Groups of k * 0.25 with both ends of the grid present: every value sits on a grid point.
    codes = torch.randint(0, levels, (8, GROUP), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, levels - 1
    on_grid = (codes - codes.new_tensor([0, 1, 2, 0, 0, 1, 3, 0])[:, None].clamp(max=levels - 1)) * 0.25
    constants = torch.tensor([0.0, -0.0, 1.5, -3.25, 1e-20, -7e30, 65504.0, 2.0**-126])[:, None].expand(8, GROUP)
    x = torch.cat([on_grid, constants]).reshape(-1).to(device)
    if scheme == "sigma":
        x = x[on_grid.numel():]  # sigma narrows the window of spread groups; constants must still be exact
    payload, meta = quantize(x, bits, scheme)
    assert torch.equal(decode_fp32(payload, meta, x.numel(), bits), x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nearest_rounding_breaks_ties_to_even(backend, device):
    # A group spanning [0, 12] at 2 bits has step 4: 2, 6 and 10 lie halfway between grid points and
    # go to the even code (0 -> lifted to 1 by the sign rule, 2, 2); 5 and 11 are no ties.
    x = torch.zeros(GROUP, device=device)
    x[:6] = torch.tensor([12.0, 2.0, 6.0, 10.0, 5.0, 11.0])
    payload, meta = quantize(x, 2, backend=backend)
    assert meta[0].tolist() == [0.0, 4.0]
    decoded = decode_fp32(payload, meta, GROUP, 2)
    assert decoded[:6].tolist() == [12.0, 4.0, 8.0, 8.0, 4.0, 12.0]


@pytest.mark.parametrize("backend, exact_fma", [("torch", None), ("triton", True), ("triton", False)],
                         ids=["torch", "triton-fma", "triton-float64"])
def test_nearest_rounding_rounds_the_product_once(backend, exact_fma, device, monkeypatch):
    # A group spanning [0, 1] at 4 bits: base 0, step = fl(1/15), inv_step = fl(1/step). For these three
    # values the exact x * inv_step lies just off a half (5.49999977, 6.50000009, 8.50000029), and
    # rounding it to float32 first would land on the half and tie to 6, 6 and 8 (docs/format.md, rule 4).
    # The kernel rounds with one fma, or in float64 where tl.fma would round twice (quantize._round_product).
    if exact_fma and not quantize_module.fma_rounds_once():
        pytest.skip("this Triton's interpreter rounds tl.fma twice (its kernels take the float64 path)")
    if exact_fma is not None:
        monkeypatch.setattr(quantize_module, "_EXACT_FMA", exact_fma)
    values = [0.36666667461395264, 0.4333333671092987, 0.5666667222976685]
    x = torch.zeros(GROUP, device=device)
    x[:4] = torch.tensor([1.0, *values])
    payload, meta = quantize(x, 4, backend=backend)
    step = meta[0, 1]
    assert meta[0, 0].item() == 0.0 and step.item() == (torch.tensor(1.0) / torch.tensor(15.0)).item()
    inv_step = torch.tensor(1.0, device=device) / step
    assert torch.round(x[1:4] * inv_step).tolist() == [6.0, 6.0, 8.0]  # what two roundings would give
    codes = decode_fp32(payload, meta, GROUP, 4)[1:4] / step
    assert codes.tolist() == [5.0, 7.0, 9.0]


@pytest.mark.parametrize("bad_values", [(float("nan"),), (float("inf"),), (float("-inf"),), (3e38, -3e38)],
                         ids=["nan", "inf", "-inf", "range-overflow"])
@pytest.mark.parametrize("partial", [False, True], ids=["whole-groups", "partial-last-group"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_group_decodes_non_finite(bad_values, backend, dtype, partial, device):
    # Each dtype, and tensors of whole groups or not, take their own path to a group's range in the kernel.
    # A range that overflows float32 (finite values of both signs near the maximum) gives an infinite
    # step: such a group is stored as a non-finite one (on a GPU the compiled min/max would otherwise
    # clamp its NaN products to codes the references do not give).
    if dtype == torch.float16 and math.isfinite(bad_values[0]):
        pytest.skip("fp16 values span at most 131008: their range cannot overflow float32")
    n = 5 * GROUP - (3 if partial else 0)
    x = activation_like(n, dtype, GROUP, seed=0, device=device)
    x[2 * GROUP + 17:2 * GROUP + 17 + len(bad_values)] = torch.tensor(bad_values, dtype=dtype, device=device)
    payload, meta = quantize(x, 4, backend=backend)
    out = torch.empty_like(x)
    (triton_dequantize if backend == "triton" else torch_dequantize)(payload, meta, out, 4, GROUP)
    groups = out.split(GROUP)
    assert not torch.isfinite(groups[2]).any()
    assert all(torch.isfinite(groups[i]).all() for i in (0, 1, 3, 4))
    # docs/format.md: such a group stores base 0, step NaN and all-zero codes.
    assert meta[2, 0].item() == 0.0 and meta[2, 1].isnan()
    assert not payload.view(5, -1)[2].any()


def test_stochastic_rounding_is_unbiased(device):
    # Values more than one step from zero, so sign preservation never moves them.
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(GROUP, generator=g) * 2 + 1).to(device)
    x[0], x[1] = 1.0, 3.0
    draws = 2000
    total = torch.zeros_like(x)
    for seed in range(draws):
        payload, meta = quantize(x, 2, stochastic=True, seed=seed)
        total += decode_fp32(payload, meta, x.numel(), 2)
    step = (3.0 - 1.0) / 3
    # One draw has sd <= step / 2; the mean of 2000 has sd <= step / 89; allow 5 sd.
    assert ((total / draws - x).abs() <= 5 * step / 2 / draws**0.5).all()
    nearest_payload, nearest_meta = quantize(x, 2)
    nearest_bias = (decode_fp32(nearest_payload, nearest_meta, x.numel(), 2) - x).abs().mean()
    assert (total / draws - x).abs().mean() < nearest_bias / 4, "averaging draws must beat nearest rounding"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_reproducible_and_seed_dependent(backend, device):
    x = activation_like(1000, torch.float32, GROUP, seed=4, device=device)
    a = quantize(x, 2, stochastic=True, seed=9, backend=backend)
    b = quantize(x, 2, stochastic=True, seed=9, backend=backend)
    c = quantize(x, 2, stochastic=True, seed=10, backend=backend)
    d = quantize(x, 2, stochastic=True, seed=9, offset=GROUP, backend=backend)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_leaves_global_rng_alone(backend, device):
    x = activation_like(1000, torch.float32, GROUP, seed=4, device=device)
    torch.manual_seed(123)
    expected = torch.rand(8)
    torch.manual_seed(123)
    quantize(x, 2, stochastic=True, seed=1, backend=backend)
    assert torch.equal(torch.rand(8), expected)


@pytest.mark.parametrize("bits, group_size", list(itertools.product(BITS, [8, 64, 256, 4096])))
def test_payload_size_is_n_bits_plus_metadata(bits, group_size, device):
    n = 100_000
    x = torch.randn(n, device=device)
    payload, meta = quantize(x, bits, group_size=group_size)
    n_groups = -(-n // group_size)
    assert payload.numel() == payload_nbytes(n, bits, group_size) == n_groups * group_size * bits // 8
    assert meta.shape == (n_groups, 2) and meta.dtype == torch.float32
    ideal = n * bits / 8 + n_groups * 8
    assert payload.nbytes + meta.nbytes <= ideal * 1.03


GOLDEN_QUANTIZE = [
    # name, input, bits, payload bytes, (base, step). Group of 8, codes packed LSB first.
    ("relu_like", [0, 1, 2, 3, 0, 3, 2, 1], 2, [0b11100100, 0b01101100], (0.0, 1.0)),
    # mixed signs: step 1, zero on code 1, base -1
    ("mixed", [-1, 0, 1, 2, 2, 1, 0, -1], 2, [0b11100100, 0b00011011], (-1.0, 1.0)),
    # all negative: counts down from the value nearest zero, step is negative
    ("negative", [-4, -3, -2, -1, -4, -1, -1, -2], 2, [0b00011011, 0b01000011], (-1.0, -1.0)),
    ("positive_4bit", [1, 16, 2, 3, 4, 5, 6, 7], 4, [0xF0, 0x21, 0x43, 0x65], (1.0, 1.0)),
]


@pytest.mark.parametrize("name, values, bits, payload, meta", GOLDEN_QUANTIZE, ids=[g[0] for g in GOLDEN_QUANTIZE])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quantize_golden_bytes(name, values, bits, payload, meta, backend, device):
    x = torch.tensor(values, dtype=torch.float32, device=device)
    got_payload, got_meta = quantize(x, bits, group_size=8, backend=backend)
    assert got_payload.tolist() == payload
    assert got_meta.tolist() == [list(meta)]
    assert torch.equal(decode_fp32(got_payload, got_meta, 8, bits, group_size=8), x)


def test_sigma_window_is_mean_plus_minus_three_std(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g) + torch.linspace(-1, 1, 16)[:, None]
    x[:, ::50] = 25.0  # outliers widen min..max far beyond the 3-sigma window
    x[:, 1::50] = -25.0
    payload, meta = quantize(x.reshape(-1).to(device), 8, scheme="sigma", group_size=256)
    base, step = meta[:, 0].double().cpu(), meta[:, 1].double().cpu()
    low_end = torch.minimum(base, base + 255 * step)
    high_end = torch.maximum(base, base + 255 * step)
    mean, std = x.double().mean(1), x.double().std(1, correction=0)
    # Zero sits on a grid point, so each end is within half a step of the window's end;
    # the 16-bit fixed-point statistics add at most ~1e-3 sigma.
    tolerance = step.abs() / 2 + 1e-3 * std
    assert ((low_end - (mean - 3 * std)).abs() <= tolerance).all()
    assert ((high_end - (mean + 3 * std)).abs() <= tolerance).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigma_window_of_a_partial_last_group_uses_its_own_elements(backend, device):
    # docs/format.md, rule 1: the sigma window is mean +/- 3 std of the group's values; a partial last
    # group (100 of 256 here) has only its own elements, not 256 of them, to average over.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256 + 100, generator=g) + 0.5
    x[::50] = 25.0  # outliers widen min..max far beyond the 3-sigma window
    x[1::50] = -25.0
    payload, meta = quantize(x.to(device), 8, scheme="sigma", group_size=256, backend=backend)
    base, step = meta[:, 0].double().cpu(), meta[:, 1].double().cpu()
    low_end = torch.minimum(base, base + 255 * step)
    high_end = torch.maximum(base, base + 255 * step)
    groups = x.double().split(256)
    mean = torch.stack([group.mean() for group in groups])
    std = torch.stack([group.std(correction=0) for group in groups])
    tolerance = step.abs() / 2 + 1e-3 * std  # (as in test_sigma_window_is_mean_plus_minus_three_std)
    assert ((low_end - (mean - 3 * std)).abs() <= tolerance).all()
    assert ((high_end - (mean + 3 * std)).abs() <= tolerance).all()


@pytest.mark.parametrize("sign", [-1.0, 1.0], ids=["negative", "positive"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigma_window_of_a_one_signed_group_holding_zero_is_widened_to_zero(sign, backend, device):
    # docs/format.md, rule 1: a group holding zero (lo <= 0 <= hi) gets a window widened to include zero,
    # also when zero is its maximum (or minimum) and the sigma window ends short of it (around +/-6 here);
    # with base 0 (rule 2) the exact zero then decodes to exactly 0.
    g = torch.Generator().manual_seed(2)
    x = (sign * (10 + 0.1 * torch.randn(GROUP, generator=g))).to(device)
    x[5] = 0.0
    payload, meta = quantize(x, 4, scheme="sigma", backend=backend)
    decoded = decode_fp32(payload, meta, GROUP, 4)
    assert decoded[5].item() == 0.0
    assert (decoded[x != 0] * sign > 0).all()


@pytest.mark.parametrize("split_first", [True, False], ids=["split-first", "rows-first"])
@pytest.mark.parametrize("split", [1, 2, 4, 8], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("variant", ["minmax", "sigma", "stochastic", "standardized", "standardized-per-group"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n", [256 * 5 + 7, 256 * 4], ids=["partial", "whole"])
def test_every_split_of_a_group_writes_the_same_bytes(n, dtype, variant, split, split_first, device, monkeypatch):
    """_quantize_kernel cuts each group into SPLIT chunks (split_for picks 4 for bf16 and 8 for fp32 at
    group size 256), and puts the SPLIT axis first or second in its tile (SPLIT_FIRST, which depends on
    the Triton version): the tiling changes which thread holds what, never the bytes."""

    monkeypatch.setattr(quantize_module, "split_for", lambda group_size, element_size, threads: split)
    monkeypatch.setattr(quantize_module, "SPLIT_FIRST", split_first)
    x = activation_like(n, dtype, 256, seed=split, device=device)
    x[300] = 0.0
    channels = None
    standardized = variant.startswith("standardized")
    if standardized:
        channels = torch.tensor([[-1.0, 0.5], [0.25, 2.0], [0.0, 1.0]], device=device)
    channel_stride = 300 if variant == "standardized-per-group" else 16  # (the per-group path from 256 on)
    args = (x, 2 if standardized else 4, 256, variant == "sigma", variant == "stochastic", 5, 17,
            channels, channel_stride)
    payload, meta = triton_quantize(*args)
    ref_payload, ref_meta = torch_quantize(*args)
    assert torch.equal(payload, ref_payload)
    assert torch.equal(meta, ref_meta)


@pytest.mark.parametrize("group_size, element_size, threads, expected", [
    (256, 2, 8, 4), (256, 4, 8, 8), (64, 2, 8, 1), (64, 4, 8, 2), (8, 4, 8, 1), (4096, 2, 8, 64),
    (256, 2, 4, 8), (256, 4, 4, 16), (64, 2, 4, 2), (64, 4, 4, 4), (8, 4, 4, 1), (4096, 2, 4, 128)])
def test_split_for_gives_each_thread_a_16_byte_vector_of_a_chunk(group_size, element_size, threads, expected):
    from tritonquant.kernels.quantize import split_for

    assert split_for(group_size, element_size, threads) == expected
    chunk = group_size // expected
    assert chunk * element_size == min(group_size * element_size, threads * 16)


@pytest.mark.parametrize("rows, num_warps, expected", [(16, 4, 8), (32, 4, 4), (8, 1, 4), (4, 1, 8), (64, 8, 4),
                                                       (32, 8, 8), (1, 1, 8)])
def test_a_tile_with_8_rows_or_more_per_warp_shares_each_row_among_4_threads(rows, num_warps, expected):
    from tritonquant.kernels.quantize import threads_per_group

    assert threads_per_group(rows, num_warps) == expected
