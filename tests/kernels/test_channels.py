"""kernels/channels.py: the channel index of standardized packings, by multiply-high instead of division."""

import random

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from tritonquant.kernels import triton_dequantize, triton_quantize
from tritonquant.kernels.autotune import use_config
from tritonquant.kernels.channels import (COUNT_LIMIT, INDEX32_LIMIT, as_loadable, channel_index_args,
                                          channel_launch_args, channel_of, divider, row_channels,
                                          torch_channel_pieces, uses_row_channels)
from tritonquant.kernels.quantize import quantize_launch_arguments

# Divisors the layouts give (feature-map areas, channel counts, a vocabulary) and the awkward ones.
DIVISORS = [1, 2, 3, 7, 49, 64, 196, 255, 256, 257, 784, 3136, 50257, 2**16 + 1, 2**30 - 1, 2**30, 2**30 + 1,
            2**31 - 1]


def _divide_as_the_kernel_does(i: int, packed: int) -> int:
    multiplier, shift = packed >> 8, packed & 0xFF
    return ((2 * i * multiplier) >> 32) >> shift


def _numerators(d: int, rng: random.Random) -> list[int]:
    """Multiples of d and their neighbours (where a wrong quotient shows first), near 0 and near 2**31."""
    top = (INDEX32_LIMIT - 1) // d * d
    near = [0, 1, d - 1, d, d + 1, top - 1, top, min(top + 1, INDEX32_LIMIT - 1), INDEX32_LIMIT - 1]
    multiples = [k * d + offset for k in (rng.randrange(1, max(2, INDEX32_LIMIT // d)) for _ in range(200))
                 for offset in (-1, 0, 1)]
    return [i for i in near + multiples + [rng.randrange(INDEX32_LIMIT) for _ in range(200)] if 0 <= i < INDEX32_LIMIT]


@pytest.mark.parametrize("d", DIVISORS, ids=str)
def test_multiply_high_divides_exactly_below_2_to_31(d):
    packed = divider(d)
    assert 2**31 <= packed >> 8 < 2**32 and packed & 0xFF < 32  # a 32-bit multiplier, a shift below 32
    for i in _numerators(d, random.Random(d)):
        assert _divide_as_the_kernel_does(i, packed) == i // d, (i, d)


def test_every_divisor_up_to_4096_divides_its_boundary_numerators():
    for d in range(1, 4097):
        packed = divider(d)
        top = (INDEX32_LIMIT - 1) // d * d
        for i in (d - 1, d, top - 1, top, INDEX32_LIMIT - 1):
            assert _divide_as_the_kernel_does(i, packed) == i // d, (i, d)


def test_bad_divisor_is_rejected():
    with pytest.raises(ValueError, match="d must be a positive int"):
        divider(0)


def test_runs_of_2_to_31_elements_or_more_and_huge_channel_counts_divide_in_64_bits():
    assert channel_index_args(INDEX32_LIMIT - 1, 49, 64) == (divider(49) | 49 << 40, divider(64) | 64 << 40, False)
    assert channel_index_args(INDEX32_LIMIT, 49, 64) == (49, 64, True)
    assert channel_index_args(1000, 1, COUNT_LIMIT) == (1, COUNT_LIMIT, True)
    assert channel_index_args(1000, 1, COUNT_LIMIT - 1)[1] < 2**63, "a signed 64-bit int"


@triton.jit
def _channel_kernel(idx_ptr, out_ptr, n, stride_divisor, count_divisor, INDEX64: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    idx = tl.load(idx_ptr + offsets, mask=mask, other=0)
    channel = channel_of(idx, stride_divisor, count_divisor, INDEX64)
    tl.store(out_ptr + offsets, channel.to(tl.int64), mask=mask)


@pytest.mark.parametrize("index64", [False, True], ids=["multiply-high", "64-bit"])
@pytest.mark.parametrize("channel_stride, n_channels", [(1, 3), (49, 2048), (3136, 64), (1, 50257), (7, 1)],
                         ids=["nhwc-rgb", "nchw-7x7", "nchw-56x56", "vocabulary", "one-channel"])
def test_channel_of_matches_the_reference_at_the_ends_of_the_index_range(channel_stride, n_channels, index64, device):
    limit = 2**40 if index64 else INDEX32_LIMIT
    rng = random.Random(channel_stride * n_channels)
    indices = [0, 1, channel_stride - 1, channel_stride, limit - 1, limit - 2, limit - channel_stride]
    indices += [rng.randrange(limit) for _ in range(100)]
    idx = torch.tensor(indices, dtype=torch.int64, device=device)
    out = torch.full_like(idx, -1)
    stride_divisor, count_divisor, index64_args = channel_index_args(limit if index64 else 1, channel_stride,
                                                                     n_channels)
    assert index64_args == index64
    _channel_kernel[(1,)](idx, out, idx.numel(), stride_divisor, count_divisor, INDEX64=index64, BLOCK=128)
    torch.testing.assert_close(out, (idx // channel_stride) % n_channels, rtol=0, atol=0)


@pytest.mark.parametrize("n_elements, channel_stride, n_channels, group_size, expected", [
    (1000, 256, 3, 256, True), (1000, 300, 3, 256, True), (1000, 255, 3, 256, False), (1000, 1, 64, 8, False),
    (INDEX32_LIMIT, 3136, 64, 256, False), (1000, COUNT_LIMIT, 2, 256, False), (1000, 3136, COUNT_LIMIT, 256, False),
], ids=["group-sized", "wider", "narrower", "nhwc", "64-bit-run", "huge-stride", "huge-count"])
def test_groups_read_their_statistics_per_group_where_they_span_at_most_two_channels(
        n_elements, channel_stride, n_channels, group_size, expected):
    assert uses_row_channels(n_elements, channel_stride, n_channels, group_size) == expected


@pytest.mark.parametrize("channel_stride", [1, 7, 3136])
def test_a_single_pair_of_statistics_is_read_per_group_whatever_the_stride(channel_stride):
    # Log-probabilities are packed with one pair for all elements, at channel stride 1: every group then
    # lies in that one channel, and the kernels need not find an element's channel.
    channels, placeholder = torch.tensor([[2.0, 1.0]]), torch.empty(1)
    *_, index64, by_row = channel_launch_args(1000, channels, channel_stride, 256, placeholder)
    assert by_row and not index64
    *_, index64, by_row = channel_launch_args(INDEX32_LIMIT, channels, channel_stride, 256, placeholder)
    assert index64 and not by_row, "2**31 elements and more: the 64-bit path"
    *_, by_row = channel_launch_args(1000, torch.tensor([[2.0, 1.0], [3.0, 1.0]]), channel_stride, 256, placeholder)
    assert by_row == (channel_stride >= 256), "two channels: only a stride of a group or more"


@triton.jit
def _row_channels_kernel(channels_ptr, out_ptr, first_row, stride_divisor, count_divisor,
                         ROWS: tl.constexpr, GROUP: tl.constexpr):
    rows = first_row + tl.arange(0, ROWS)
    minimum, scale, next_minimum, next_scale, boundary = row_channels(
        channels_ptr, rows, rows >= 0, stride_divisor, count_divisor, GROUP)
    columns = tl.arange(0, ROWS)
    tl.store(out_ptr + columns * 5 + 0, minimum)
    tl.store(out_ptr + columns * 5 + 1, scale)
    tl.store(out_ptr + columns * 5 + 2, next_minimum)
    tl.store(out_ptr + columns * 5 + 3, next_scale)
    tl.store(out_ptr + columns * 5 + 4, boundary.to(tl.float32))


@pytest.mark.parametrize("channel_stride, n_channels", [(256, 3), (300, 5), (3136, 64), (784, 1)],
                         ids=["group-sized", "wider", "nchw-56x56", "one-channel"])
@pytest.mark.parametrize("where", ["start", "end"], ids=["first-rows", "last-rows-below-2**31"])
def test_row_channels_gives_each_group_its_two_channels_and_the_boundary(channel_stride, n_channels, where, device):
    group, rows = 256, 16
    first_row = 0 if where == "start" else (INDEX32_LIMIT - 1) // group - rows + 1
    # Channel c holds (minimum, scale) = (c, c + 0.5): the loaded values name the channel.
    channels = torch.stack([torch.arange(n_channels), torch.arange(n_channels) + 0.5], 1).float().to(device)
    out = torch.empty(rows, 5, device=device)
    stride_divisor, count_divisor, _ = channel_index_args(1000, channel_stride, n_channels)
    _row_channels_kernel[(1,)](channels, out, first_row, stride_divisor, count_divisor, ROWS=rows, GROUP=group)
    start = (first_row + torch.arange(rows, dtype=torch.int64)) * group
    first = (start // channel_stride) % n_channels
    boundary = (start // channel_stride + 1) * channel_stride - start
    expected = torch.stack([first, first + 0.5, (first + 1) % n_channels, (first + 1) % n_channels + 0.5,
                            boundary], 1).float()
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


class _HostDataRecorder(TorchDispatchMode):
    """Counts tensors made from host data (``torch.tensor(...)``): on CUDA each is a copy from the host,
    which makes the host wait."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def channels_by_pieces(n: int, start: int, stride: int, n_channels: int) -> list[int]:
    """Each element's channel as ``torch_channel_pieces`` gives it, checking that its pieces are views
    of the run that cover it once, with indices made on the run's device (no data from the host)."""
    run = torch.arange(n, dtype=torch.float64)  # each element holds its position
    channel_of = torch.full((n,), -1, dtype=torch.int64)
    covered = torch.zeros(n, dtype=torch.int64)
    with _HostDataRecorder() as recorder:
        pieces = list(torch_channel_pieces(run, start, stride, n_channels))
    assert recorder.count == 0, "a channel index made from host data: a synchronizing copy on CUDA"
    for piece, channel in pieces:
        assert piece.untyped_storage().data_ptr() == run.untyped_storage().data_ptr()
        position = piece.long().flatten()
        channel_of[position] = channel.expand_as(piece).flatten()
        covered[position] += 1
    assert covered.eq(1).all()
    return channel_of.tolist()


def test_torch_channel_pieces_follow_the_layout():
    # NCHW [2, 3, 2, 2]: dimension 1's stride is 4, so the flat run holds 4 of channel 0, 4 of 1, 4 of 2, ...
    assert channels_by_pieces(24, 0, 4, 3) == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4
    # NHWC [2, 2, 2, 3]: a stride of 1, the channels cycle along the run
    assert channels_by_pieces(12, 0, 1, 3) == [0, 1, 2] * 4


@pytest.mark.parametrize("start, n, stride, n_channels", [
    (10, 8, 4, 3), (0, 1000, 7, 3), (5, 3, 16, 3), (16, 16, 16, 3), (3, 100, 1, 3), (3, 100, 1, 7), (0, 50, 1, 1),
    (5, 2, 1, 64), (2**31 - 4, 8, 4, 3), (0, 8, 3_000_000_000, 3), (2**32 + 2, 8, 2**31, 3), (2**31 - 50, 100, 1, 3),
    (2**40 + 7, 300, 3, 5), (37, 2000, 64, 5), (64, 640, 64, 5), (100, 10, 64, 5), (2**40 + 7, 3000, 33, 5),
], ids=["small", "many-periods", "inside-one-block", "one-whole-period", "stride-1", "stride-1-7-channels",
        "one-channel", "stride-1-inside-a-row", "past-int32", "wide-stride", "both", "stride-1-past-int32",
        "past-2**40", "many-blocks", "whole-blocks", "inside-a-block", "blocks-past-2**40"])
def test_torch_channel_pieces_of_a_run_from_its_start(start, n, stride, n_channels):
    # The CPU references take a chunk from its start, which may fall anywhere in a block of a channel
    # (strides from TORCH_BLOCKS_FROM_STRIDE = 32) or in a period of all of them (shorter strides);
    # indices and strides past int32 must not wrap.
    expected = [(i // stride) % n_channels for i in range(start, start + n)]
    assert channels_by_pieces(n, start, stride, n_channels) == expected


def test_statistics_at_a_misaligned_address_are_copied_and_give_the_same_bytes(device):
    # The kernels read a channel's (minimum, scale) as one 8-byte word: a view 4 bytes into a buffer is
    # copied first, and packs exactly as the aligned statistics do.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, device=device)
    aligned = torch.stack([torch.randn(3), torch.rand(3) + 0.5], 1).to(device)
    buffer = torch.empty(7, device=device)
    buffer[1:].copy_(aligned.flatten())
    misaligned = buffer[1:].view(3, 2)
    assert misaligned.data_ptr() % 8 == 4 and as_loadable(misaligned).data_ptr() % 8 == 0
    assert as_loadable(aligned) is aligned
    packed = [triton_quantize(x, 2, 64, False, False, 0, 0, stats, 64) for stats in (aligned, misaligned)]
    assert all(torch.equal(a, b) for a, b in zip(*packed))
    outs = [torch.empty_like(x) for _ in range(2)]
    for out, stats in zip(outs, (aligned, misaligned)):
        triton_dequantize(*packed[0], out, 2, 64, stats, 64)
    assert torch.equal(outs[0], outs[1])


def test_standardized_packings_take_one_tile_a_program_whatever_the_config(device):
    # The kernel pipelines plain tiles only (quantize.py, TILES): a config that asks for more leaves a
    # standardized launch at one tile a program, with the same bytes; a caller that launches the kernel
    # itself is told.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, device=device)
    stats = torch.stack([torch.randn(3), torch.rand(3) + 0.5], 1).to(device)
    expected = triton_quantize(x, 2, 64, False, False, 0, 0, stats, 64)
    with use_config((2, 1, 4)):
        packed = triton_quantize(x, 2, 64, False, False, 0, 0, stats, 64)
    assert all(torch.equal(a, b) for a, b in zip(expected, packed))
    payload, meta = torch.empty_like(packed[0]), torch.empty_like(packed[1])
    with pytest.raises(ValueError, match="tiles must be 1 with channels"):
        quantize_launch_arguments(x, payload, meta, 2, 64, 2, 1, channels=stats, channel_stride=64, tiles=4)
