"""Fused dequantize: load packed codes and the group's (base, step), decode, cast, store; one pass.

Element i of group g decodes to ``base[g] + code[i] * step[g]`` in float32 (two roundings, no FMA),
then rounds to the output dtype. See kernels/quantize.py for how base and step are chosen.
Standardized packings (``channels``) decode to ``(value - 1) * scale[c] + minimum[c]`` in float32
(three roundings, no FMA) before that one rounding.

With an ``activation`` ("gelu", "gelu_tanh" or "silu"), the same pass also writes that activation of
the decoded values to a second output: a GELU's or SiLU's output is computed again in backward from
its input's packing (tritonquant's ``recompute_activations``), and both tensors are needed there, the
input for the activation's gradient and the output for the next layer's. One pass reads the packing
once and writes both, where decoding and then applying the activation would read the decoded input
again. The activation is computed in float32 from the decoded value as rounded to the output dtype,
as torch computes it, then rounded once; Triton's erf and exp stand in for the C library's, so the
result agrees with ``torch_activation`` to within a few float32 ulps, not bit for bit
(tests/kernels/test_dequantize.py holds the tolerances).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bitpack import torch_unpack_codes, unpack_codes
from . import launch as launch_module
from .autotune import config_generation, dequantize_launch_config
from .channels import channel_launch_args, channel_of, channel_statistics, row_channels, torch_channel_pieces
from .launch import KernelLauncher, cdiv, flat_view, is_interpreted
from .quantize import torch_chunk_elements


@triton.jit
def _element_mask(idx, row_valid, n_elements, GROUP: tl.constexpr, EVEN: tl.constexpr):
    """[ROWS, GROUP] mask of the elements that exist. EVEN (n_elements a multiple of GROUP): every
    group is whole, so the row mask, broadcast to the tile, saves a 64-bit compare per element."""
    if EVEN:
        return row_valid[:, None] & (tl.arange(0, GROUP) < GROUP)[None, :]
    return idx < n_elements


@triton.jit
def _round_to(value, DTYPE: tl.constexpr, HARDWARE_CAST: tl.constexpr):
    """float32 -> DTYPE with round-to-nearest-even, identical on GPU and under the interpreter.

    Finite values saturate at DTYPE's largest finite value: a grid may overshoot the group's range by up
    to half a step (a step at 1 bit), which must not turn a finite fp16 input into Inf. NaN stays NaN.
    HARDWARE_CAST (compiled kernels): the GPU's own conversion, which rounds to nearest even too, one
    instruction for two values; the interpreter's bf16 cast truncates, so it gets integer rounding.
    """
    if DTYPE != tl.float32:
        limit: tl.constexpr = 65504.0 if DTYPE == tl.float16 else 3.3895313892515355e38
        value = tl.clamp(value, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
    if DTYPE == tl.bfloat16 and not HARDWARE_CAST:
        # Integer rounding of the float32 bits: the interpreter's own bf16 cast truncates.
        # NaN is replaced by the quiet NaN first, so the rounding carry cannot turn it into +/-0.
        bits = tl.where(value != value, 0x7FC00000, value.to(tl.uint32, bitcast=True))
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(DTYPE)


# The activations the kernel can apply as it decodes; ``torch_activation`` defines them.
ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def torch_activation(x: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``activation`` (one of ACTIVATIONS) of ``x`` as torch computes it (``F.gelu``, ``F.silu``),
    written into ``out`` when given (no temporary)."""
    if activation == "silu":
        return torch.ops.aten.silu(x) if out is None else torch.ops.aten.silu.out(x, out=out)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    if out is None:
        return torch.ops.aten.gelu(x, approximate=approximate)
    return torch.ops.aten.gelu.out(x, approximate=approximate, out=out)


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    """GELU (erf or tanh form) or SiLU of float32 ``x``, in float32, in the order torch's CUDA kernels
    compute them. The divisions are Triton's ``/`` (within 2 ulps on a GPU), not IEEE's: Triton's exp
    already differs from the C library's by an ulp or two, and an IEEE division costs 7 more instructions
    per element and 35-40 more registers on sm_90 (docs/kernels.md)."""
    if ACTIVATION == "gelu":
        return x * 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + exp(-2u)): Triton has no tanh of its own.
        u = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        return x / (1.0 + tl.exp(-2.0 * u))
    else:  # "silu"
        return x / (1.0 + tl.exp(-x))


@triton.jit
def _dequantize_kernel(
    payload_ptr, meta_ptr, out_ptr, activated_ptr, n_elements, n_groups,
    channels_ptr, stride_divisor, count_divisor,
    BITS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, STANDARDIZE: tl.constexpr,
    INDEX64: tl.constexpr, ROW_CHANNELS: tl.constexpr, HARDWARE_CAST: tl.constexpr, EVEN: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    # EVEN: n_elements is a multiple of GROUP, so the store mask is per row (as in _quantize_kernel).
    BYTES_PER_GROUP: tl.constexpr = GROUP * BITS // 8
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_valid = rows < n_groups
    # Each thread stores one 16-byte vector of outputs; the contiguity hint makes it load just the
    # payload bytes those outputs come from, instead of 16-byte payload loads redistributed through
    # shared memory.
    VECTOR: tl.constexpr = 128 // out_ptr.dtype.element_ty.primitive_bitwidth
    THREAD_BYTES: tl.constexpr = max(VECTOR * BITS // 8, 1)
    in_idx = (rows.to(tl.int64)[:, None] * BYTES_PER_GROUP
              + tl.max_contiguous(tl.arange(0, BYTES_PER_GROUP), THREAD_BYTES)[None, :])
    packed = tl.load(payload_ptr + in_idx, mask=row_valid[:, None], other=0)
    # The code as a float32 without a conversion instruction (those run at 1/8 of the float32 rate):
    # the bits 0x4B000000 | code are the float 2**23 + code, exactly.
    code = (unpack_codes(packed, ROWS, GROUP, BITS).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
    code = code - 8388608.0
    base, step = tl.split(tl.load(meta_ptr + rows.to(tl.int64)[:, None] * 2 + tl.arange(0, 2)[None, :],
                                  mask=row_valid[:, None], other=0.0))  # [ROWS, 2]: one load for both
    value = base[:, None] + code * step[:, None]
    idx = rows.to(tl.int64)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    valid = _element_mask(idx, row_valid, n_elements, GROUP, EVEN)
    if STANDARDIZE and ROW_CHANNELS:  # each group in at most two channels: their statistics per row
        minimum, scale, next_minimum, next_scale, boundary = row_channels(
            channels_ptr, rows, row_valid, stride_divisor, count_divisor, GROUP)
        in_next = tl.arange(0, GROUP)[None, :] >= boundary[:, None]
        minimum = tl.where(in_next, next_minimum[:, None], minimum[:, None])
        scale = tl.where(in_next, next_scale[:, None], scale[:, None])
        value = (value - 1.0) * scale + minimum
    elif STANDARDIZE:  # (kernels/channels.py: the channel index without a division per element)
        channel = channel_of(idx, stride_divisor, count_divisor, INDEX64)
        minimum, scale = channel_statistics(channels_ptr, channel, valid)
        value = (value - 1.0) * scale + minimum
    decoded = _round_to(value, out_ptr.dtype.element_ty, HARDWARE_CAST)
    tl.store(out_ptr + idx, decoded, mask=valid)
    if ACTIVATION != "none":  # (activated_ptr: a second output of out's dtype and layout)
        activated = _activate(decoded.to(tl.float32), ACTIVATION)
        tl.store(activated_ptr + idx, _round_to(activated, activated_ptr.dtype.element_ty, HARDWARE_CAST), mask=valid)


_launch_dequantize = KernelLauncher(_dequantize_kernel)
# Whether the kernel above was compiled or is interpreted was decided when triton.jit ran: compiled
# kernels round to bf16 with the GPU's conversion, interpreted ones with integer operations (_round_to).
_HARDWARE_CAST = not is_interpreted()


def triton_dequantize(payload: torch.Tensor, meta: torch.Tensor, out: torch.Tensor, bits: int, group_size: int,
                      channels: torch.Tensor | None = None, channel_stride: int = 1, activation: str | None = None,
                      activated: torch.Tensor | None = None) -> None:
    """Decode into ``out``: float32/float16/bfloat16, dense (``launch.flat_view``) with the original n
    elements, written in memory order.

    ``channels``, ``channel_stride``: as given to ``triton_quantize`` (None: not standardized).
    ``activation`` (one of ACTIVATIONS): also write that activation of the decoded values into
    ``activated``, of ``out``'s dtype, shape and strides, in the same pass (module docstring).
    """
    _check_activation(out, activation, activated)
    n = out.numel()
    n_groups = meta.shape[0]
    if n == 0:
        return
    rows, num_warps = dequantize_launch_config(out, n_groups, bits, group_size, channels is not None)
    activated = out if activated is None else activated
    plan = None
    if channels is None:
        # What this launch's grid, constexprs and Triton's specialization depend on (payload may be a view,
        # out the caller's): a repeat skips building them (KernelLauncher.launch_planned).
        plan = _plan(out.dtype, n, n_groups, bits, group_size, rows, num_warps, activation,
                     payload.data_ptr() % 16 == 0, meta.data_ptr() % 16 == 0, out.data_ptr() % 16 == 0,
                     activated.data_ptr() % 16 == 0)
        if _launch_dequantize.launch_planned(plan, (payload, meta, out, activated, n, n_groups, meta, 1, 1)):
            return
    statistics, stride_divisor, count_divisor, index64, by_row = channel_launch_args(
        n, channels, channel_stride, group_size, meta)
    _launch_dequantize(
        cdiv(n_groups, rows),
        (payload, meta, out, activated, n, n_groups, statistics, stride_divisor, count_divisor),
        dict(BITS=bits, GROUP=group_size, ROWS=rows, STANDARDIZE=channels is not None, INDEX64=index64,
             ROW_CHANNELS=by_row, HARDWARE_CAST=_HARDWARE_CAST, EVEN=n % group_size == 0,
             ACTIVATION=activation or "none"),
        num_warps,
        plan,
    )


def _plan(dtype: torch.dtype, n: int, n_groups: int, bits: int, group_size: int, rows: int, num_warps: int,
          activation: str | None, *aligned: bool) -> tuple:
    """The launch-plan key of an unstandardized dequantize launch; ``aligned``: whether payload, meta, out
    and activated are 16-byte aligned."""
    return (dtype, n, n_groups, bits, group_size, rows, num_warps, activation, *aligned)


class PreparedDequantize(NamedTuple):
    """``triton_dequantize``'s launch for one kind of output, worked out once for calls that repeat it
    (``prepare_dequantize``)."""

    n_elements: int
    n_groups: int
    plan: tuple  # the launcher's plan key
    generation: int  # autotune.config_generation() when the tile was read


def prepare_dequantize(out: torch.Tensor, n_groups: int, bits: int, group_size: int) -> PreparedDequantize | None:
    """What ``triton_dequantize(payload, meta, out, bits, group_size)`` (no standardization, no
    activation) launches with payload, meta and ``out`` 16-byte aligned, for a caller that decodes into
    tensors of ``out``'s dtype, element count and dense layout again and again (``dequantize_prepared``).
    None under the interpreter, or while a ``use_config`` block forces the tile."""
    generation = config_generation()
    n = out.numel()
    if generation is None or n == 0 or is_interpreted():
        return None
    rows, num_warps = dequantize_launch_config(out, n_groups, bits, group_size)
    return PreparedDequantize(n, n_groups, _plan(out.dtype, n, n_groups, bits, group_size, rows, num_warps, None,
                                                 True, True, True, True), generation)


def dequantize_prepared(payload: torch.Tensor, meta: torch.Tensor, out: torch.Tensor,
                        prepared: PreparedDequantize) -> bool:
    """Decode into ``out`` as ``triton_dequantize`` does, launched from ``prepared`` (made by
    ``prepare_dequantize`` for an output of ``out``'s dtype, element count and layout, and ``meta`` of
    its groups). False, launching nothing, where that launch would not be the one ``triton_dequantize``
    makes: a tensor not 16-byte aligned, a tuning since, or no plan held by the launcher (none made yet,
    direct launches off)."""
    if (prepared.generation != config_generation() or payload.data_ptr() % 16 or meta.data_ptr() % 16
            or out.data_ptr() % 16 or not launch_module.DIRECT_LAUNCH):
        return False
    return _launch_dequantize.launch_planned(
        prepared.plan, (payload, meta, out, out, prepared.n_elements, prepared.n_groups, meta, 1, 1))


def _check_activation(out: torch.Tensor, activation: str | None, activated: torch.Tensor | None) -> None:
    if activation is None and activated is None:
        return
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    if (activated is None or activated.dtype != out.dtype or activated.shape != out.shape
            or activated.stride() != out.stride() or activated.device != out.device):
        raise ValueError("activated must be a tensor of out's dtype, shape, strides and device when an activation "
                         "is given")


def torch_dequantize(payload: torch.Tensor, meta: torch.Tensor, out: torch.Tensor, bits: int, group_size: int,
                     channels: torch.Tensor | None = None, channel_stride: int = 1, activation: str | None = None,
                     activated: torch.Tensor | None = None) -> None:
    """Plain-PyTorch reference for ``triton_dequantize``: same signature, same bits out in ``out``;
    ``activated`` gets ``torch_activation`` of ``out``, which the kernel's matches to within a few ulps.

    On the CPU it decodes a chunk of groups at a time (``quantize.torch_chunk_elements``).
    """
    _check_activation(out, activation, activated)
    if activation is not None:
        torch_dequantize(payload, meta, out, bits, group_size, channels, channel_stride)
        # (On ``out`` in its own shape, as ``codec.activate`` computes it: torch's CPU kernels can round
        # a few elements differently when the same memory is walked as one flat run.)
        torch_activation(out, activation, out=activated)
        return
    out = flat_view(out)
    n = out.numel()
    chunk = torch_chunk_elements(n, group_size, out.device)
    if chunk is None or n <= chunk:
        _torch_dequantize_run(payload, meta, out, 0, bits, channels, channel_stride)
        return
    group_bytes = group_size * bits // 8
    for start in range(0, n, chunk):
        first, end = start // group_size, -(-min(start + chunk, n) // group_size)
        _torch_dequantize_run(payload[first * group_bytes:end * group_bytes], meta[first:end],
                              out[start:start + chunk], start, bits, channels, channel_stride)


def _torch_dequantize_run(payload: torch.Tensor, meta: torch.Tensor, out: torch.Tensor, start: int, bits: int,
                          channels: torch.Tensor | None, channel_stride: int) -> None:
    """``torch_dequantize`` into the 1-D run ``out`` (the groups of ``payload`` and ``meta``), which
    starts at element ``start`` of the tensor (for its channels)."""
    n = out.numel()
    n_groups = meta.shape[0]
    if n == 0:
        return
    # (In place where the arithmetic allows: on the CPU this is how training restores tensors, and its
    # temporaries count against the memory compression saves.)
    value = torch_unpack_codes(payload.view(n_groups, -1), bits).float().mul_(meta[:, 1:2]).add_(meta[:, 0:1])
    value = value.view(-1)[:n]
    if channels is not None:
        for piece, channel in torch_channel_pieces(value, start, channel_stride, channels.shape[0]):
            piece.sub_(1.0).mul_(channels[channel, 1]).add_(channels[channel, 0])
    if out.dtype != torch.float32:
        limit = torch.finfo(out.dtype).max
        value = value.clamp(-limit, limit)  # (NaN stays NaN)
    out.copy_(value)
