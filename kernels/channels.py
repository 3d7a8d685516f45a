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

Where the channel stride is at least the group size, a group lies in at most two channels: the
kernels then find the channels once per group (``row_channels``) and no index per element.
"""

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# Runs shorter than this divide with a multiplier (the module docstring); longer ones with 64-bit division.
INDEX32_LIMIT = 2**31
# Channel counts below this travel inside their prepared divisor (bits 40 and up); larger ones (never seen
# in practice) take the 64-bit path too.
COUNT_LIMIT = 2**23


def divider(d: int) -> int:
    """The multiplier and shift that divide every 0 <= i < 2**31 by ``d`` (>= 1), in one int: the
    shift in the low 8 bits, the multiplier in the next 32. (The multiplier is at least 2**31, so the int
    is at least 2**39: a 64-bit value for compiled kernels and Triton's interpreter alike, which holds
    ints between 2**31 and 2**32 in 32 bits.)"""
    if d < 1:
        raise ValueError(f"d must be a positive int, got {d}")
    shift = (d - 1).bit_length()
    multiplier = -(-(1 << (31 + shift)) // d)
    return shift | multiplier << 8


def channel_index_args(n_elements: int, channel_stride: int, n_channels: int) -> tuple[int, int, bool]:
    """The kernels' arguments for ``channel_of``: (stride_divisor, count_divisor, INDEX64).

    Runs of fewer than 2**31 elements get the divisors prepared for multiply-high (``divider``), the
    channel count riding above the count's divider, and the stride above the stride's (when below
    COUNT_LIMIT; ``row_channels``); longer runs get them as they are, for 64-bit division.
    """
    if n_elements >= INDEX32_LIMIT or n_channels >= COUNT_LIMIT:
        return channel_stride, n_channels, True
    stride_above = channel_stride << 40 if channel_stride < COUNT_LIMIT else 0
    return divider(channel_stride) | stride_above, divider(n_channels) | n_channels << 40, False


def uses_row_channels(n_elements: int, channel_stride: int, n_channels: int, group_size: int) -> bool:
    """The kernels' ROW_CHANNELS: whether every group of ``group_size`` consecutive elements lies in at
    most two channels, whose statistics are then read once per group (``row_channels``) instead of once
    per element. True when ``channel_stride >= group_size`` and the divisors are prepared for
    multiply-high with the stride riding along (``channel_index_args``)."""
    return (group_size <= channel_stride < COUNT_LIMIT and n_elements < INDEX32_LIMIT
            and n_channels < COUNT_LIMIT)


def channel_launch_args(n_elements: int, channels: torch.Tensor | None, channel_stride: int, group_size: int,
                        placeholder: torch.Tensor) -> tuple[torch.Tensor, int, int, bool, bool]:
    """What a quantize or dequantize launch passes for its channels: (statistics, stride_divisor,
    count_divisor, INDEX64, ROW_CHANNELS). Without standardization (``channels`` None) ``placeholder``,
    any tensor of the launch, stands in for the statistics pointer, which the kernel then never reads."""
    if channels is None:
        return placeholder, 1, 1, False, False
    n_channels = channels.shape[0]
    if n_channels == 1:
        # One pair for every element (the "shift" of log-probabilities, or a dimension 1 of size 1), whatever
        # the stride: given as a stride of one group, the kernels read it once per group (``row_channels``)
        # instead of finding a channel and loading its pair for every element. The bytes are the same.
        channel_stride = group_size
    return (as_loadable(channels), *channel_index_args(n_elements, channel_stride, n_channels),
            uses_row_channels(n_elements, channel_stride, n_channels, group_size))


@triton.jit
def divide(i, prepared):
    """i // d for uint32 ``i`` below 2**31, with ``prepared`` = ``divider(d)`` (bits above 40 ignored)."""
    multiplier = (prepared >> 8).to(tl.uint32)
    shift = (prepared & 0xFF).to(tl.uint32)
    return tl.umulhi(i + i, multiplier) >> shift


@triton.jit
def channel_of(idx, stride_divisor, count_divisor, INDEX64: tl.constexpr):
    """The channel ``(idx // channel_stride) % n_channels`` of each flat element index in ``idx`` (int64,
    any shape; indices at or past the run's end, which callers mask, may give any value), from the
    divisors ``channel_index_args`` prepared."""
    if INDEX64:
        return (idx // stride_divisor) % count_divisor
    else:
        quotient = divide(idx.to(tl.uint32), stride_divisor)
        n_channels = (count_divisor >> 40).to(tl.uint32)
        return (quotient - divide(quotient, count_divisor) * n_channels).to(tl.int32)


@triton.jit
def row_channels(channels_ptr, rows, row_valid, stride_divisor, count_divisor, GROUP: tl.constexpr):
    """For groups that lie in at most two channels (``uses_row_channels``): per row ([ROWS], int32 rows
    below 2**31 // GROUP), the statistics of the channel holding the row's first element, those of the
    next channel, and the position in the row where the next channel begins (GROUP or more: none does).
    Each group then selects per element between two pairs, with no index arithmetic or load per element.
    """
    start = rows.to(tl.uint32) * GROUP
    quotient = divide(start, stride_divisor)
    n_channels = (count_divisor >> 40).to(tl.uint32)
    first = (quotient - divide(quotient, count_divisor) * n_channels).to(tl.int32)
    second = tl.where(first + 1 == n_channels.to(tl.int32), 0, first + 1)
    channel_stride = (stride_divisor >> 40).to(tl.int64)
    boundary = (quotient.to(tl.int64) + 1) * channel_stride - start.to(tl.int64)
    minimum, scale = channel_statistics(channels_ptr, first, row_valid)
    next_minimum, next_scale = channel_statistics(channels_ptr, second, row_valid)
    return minimum, scale, next_minimum, next_scale, boundary.to(tl.int32)


def standardizing_pairs(channels: torch.Tensor) -> torch.Tensor:
    """float32 [C, 2]: (minimum, 1 / scale) of each channel, from ``channels`` (minimum, scale): what the
    quantize kernel and its reference multiply by (docs/format.md). A division per element costs the
    kernel a correctly rounded division's dozen instructions; the reciprocal, rounded to float32 once per
    channel by this one torch op for both, makes it a multiplication."""
    return torch.stack([channels[:, 0], channels[:, 1].reciprocal()], dim=1)


def as_loadable(channels: torch.Tensor) -> torch.Tensor:
    """``channels`` (float32 [C, 2]) as ``channel_statistics`` reads it: contiguous rows at an 8-byte
    aligned address. Statistics the library computed already are; a view is copied."""
    if channels.is_contiguous() and channels.data_ptr() % 8 == 0:
        return channels
    return channels.clone(memory_format=torch.contiguous_format)


@triton.jit
def channel_statistics(channels_ptr, channel, mask):
    """The pair of each element's channel from ``channels`` (float32 [C, 2], ``as_loadable``): (minimum,
    scale), or (minimum, 1 / scale) for quantize (``standardizing_pairs``). One 8-byte load per element
    rather than two 4-byte ones; masked elements get (0.0, 1.0)."""
    pairs = channels_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    pair = tl.load(pairs + channel, mask=mask, other=0x3F80000000000000)  # (little-endian: scale 1.0 on top)
    minimum = pair.to(tl.uint32).to(tl.float32, bitcast=True)
    scale = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return minimum, scale


# torch_channel_pieces takes the layout in blocks of one channel from this stride on, and in periods of
# every channel below it: a channel index per block of fewer elements would cost about what one per
# element did (docs/kernels.md, "The torch backend on the CPU").
TORCH_BLOCKS_FROM_STRIDE = 32


def torch_channel_pieces(run: torch.Tensor, start: int, channel_stride: int, n_channels: int,
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cover the 1-D ``run``, elements ``start ..`` of a flat tensor, with views, each with the channel
    of its elements (``(i // channel_stride) % n_channels``) as int64 indices that broadcast against
    it; the torch references apply per-channel statistics this way, with no index per element.

    The layout repeats in units: blocks of ``channel_stride`` elements of one channel (for strides of
    ``TORCH_BLOCKS_FROM_STRIDE`` or more), or else periods of ``channel_stride * n_channels`` elements
    that run through every channel. The whole units are one 2-D view, with a channel per block, or the
    same channels along each period; a partial unit at either end is a view of its own.
    """
    n = run.numel()
    device = run.device
    blocks = channel_stride >= TORCH_BLOCKS_FROM_STRIDE
    unit = channel_stride if blocks else channel_stride * n_channels
    head = min(n, -start % unit)
    units = (n - head) // unit
    tail = n - head - units * unit

    def end_piece(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        piece = run[first - start:first - start + count]
        if blocks:  # inside one block (a 1-element index, not 0-d: 0-d values take no part in type promotion;
            # filled on the device: torch.tensor would copy from the host, a synchronizing copy on CUDA)
            return piece, torch.full((1,), (first // channel_stride) % n_channels, dtype=torch.int64, device=device)
        position = torch.arange(first, first + count, device=device)
        return piece, position.div_(channel_stride, rounding_mode="floor").remainder_(n_channels)

    if head:
        yield end_piece(start, head)
    if units:
        body = run[head:head + units * unit].view(units, unit)
        if blocks:
            first_block = (start + head) // channel_stride
            yield body, torch.arange(first_block, first_block + units, device=device).remainder_(n_channels)[:, None]
        else:  # each period starts in channel 0
            yield body, torch.arange(unit, device=device).div_(channel_stride, rounding_mode="floor")
    if tail:
        yield end_piece(start + n - tail, tail)
