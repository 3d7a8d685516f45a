"""The channel of each element of a flat run, for standardized packings: ``(i // channel_stride) % C``.

The quantize and dequantize kernels of a standardized tensor (see kernels/quantize.py) look up the
statistics of each element's channel. A GPU has no integer divide instruction: a division by a value
known only at run time costs it tens of instructions per element, and a 64-bit one more. So for runs
of fewer than 2**31 elements the launcher computes, for each divisor d, a multiplier M and a shift s
such that ``i // d == (i * M) >> (31 + s)`` for every 0 <= i < 2**31 (Granlund and Montgomery,
"Division by invariant integers using multiplication", PLDI 1994). The kernel takes that as the high
32 bits of the product (2 * i) * M, shifted right by s: a doubling, one multiply-high and a shift.
Longer runs keep the 64-bit division.

Why the pair is exact: with s = ceil(log2 d) and M = ceil(2**(31 + s) / d), M * d = 2**(31 + s) + e
with 0 <= e < d <= 2**s. Then i * M / 2**(31 + s) = i / d + i * e / (d * 2**(31 + s)), and the second
term is below 1 / d for i < 2**31, too little to carry i / d past the next integer. M < 2**32 (and
2 * i < 2**32), so both factors of the multiply-high are 32-bit.
"""

import torch
import triton
import triton.language as tl

# Runs shorter than this divide with a multiplier (the module docstring); longer ones with 64-bit division.
INDEX32_LIMIT = 2**31


def divider(d: int) -> int:
    """The multiplier and shift that divide every 0 <= i < 2**31 by ``d`` (>= 1), in one int: the
    shift in the low 8 bits, the multiplier above them. (The multiplier is at least 2**31, so the int is
    at least 2**39: a 64-bit value for compiled kernels and Triton's interpreter alike, which holds ints
    between 2**31 and 2**32 in 32 bits.)"""
    if d < 1:
        raise ValueError(f"d must be a positive int, got {d}")
    shift = (d - 1).bit_length()
    multiplier = -(-(1 << (31 + shift)) // d)
    return shift | multiplier << 8


def channel_index_args(n_elements: int, channel_stride: int, n_channels: int) -> tuple[int, int, bool]:
    """Kernel arguments for ``channel_of``: (stride divider, channel-count divider, INDEX64)."""
    if n_elements >= INDEX32_LIMIT:
        return 0, 0, True
    return divider(channel_stride), divider(n_channels), False


@triton.jit
def _divide(i, packed_divider):
    """i // d for uint32 ``i`` below 2**31, with ``packed_divider = divider(d)``."""
    multiplier = (packed_divider >> 8).to(tl.uint32)
    shift = (packed_divider & 0xFF).to(tl.uint32)
    return tl.umulhi(i + i, multiplier) >> shift


@triton.jit
def channel_of(idx, channel_stride, n_channels, stride_divider, count_divider, INDEX64: tl.constexpr):
    """The channel ``(idx // channel_stride) % n_channels`` of each flat element index in ``idx``
    (int64, any shape; indices at or past the run's end, which callers mask, may give any value).
    ``stride_divider``, ``count_divider``, ``INDEX64``: from ``channel_index_args``."""
    if INDEX64:
        return (idx // channel_stride) % n_channels
    else:
        i = idx.to(tl.uint32)
        quotient = _divide(i, stride_divider)
        return (quotient - _divide(quotient, count_divider) * n_channels.to(tl.uint32)).to(tl.int32)


def torch_channel_of(n: int, channel_stride: int, n_channels: int, device: torch.device) -> torch.Tensor:
    """int64 [n]: the channel of each element of a flat run (``(i // channel_stride) % n_channels``)."""
    return torch.div(torch.arange(n, device=device), channel_stride, rounding_mode="floor") % n_channels
