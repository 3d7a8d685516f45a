"""Max-pooling indices as window positions (tritonquant/pool_indices.py): exact round trips and the byte layout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritonquant.pool_indices import PoolWindows, _pack_codes, _unpack_codes, decode, encode, pool_windows

POOLS = {
    "1d-k4": (nn.MaxPool1d(4), (2, 3, 41)),
    "1d-k3-s2-p1-d2-ceil": (nn.MaxPool1d(3, 2, 1, dilation=2, ceil_mode=True), (2, 3, 40)),
    "2d-k3-s2-p1": (nn.MaxPool2d(3, 2, 1), (2, 4, 17, 19)),
    "2d-k2": (nn.MaxPool2d(2), (2, 4, 16, 16)),
    "2d-k2x3-s1-d2": (nn.MaxPool2d((2, 3), 1, dilation=(2, 1)), (1, 2, 11, 9)),
    "2d-k3-s2-ceil": (nn.MaxPool2d(3, 2, ceil_mode=True), (2, 2, 10, 12)),
    "2d-unbatched": (nn.MaxPool2d(3, 2, 1), (4, 13, 13)),
    "3d-k2": (nn.MaxPool3d(2), (1, 2, 6, 8, 8)),
    "3d-k3-s2-p1": (nn.MaxPool3d(3, 2, 1), (1, 2, 7, 9, 8)),
    "2d-k15x17": (nn.MaxPool2d((15, 17)), (1, 1, 30, 34)),  # 255 positions and "outside": the most 8 bits hold
}


def indices_of(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(pool)]
    _, indices = functional(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                            return_indices=True)
    return indices


@pytest.mark.parametrize("name", POOLS)
@pytest.mark.parametrize("values", ["random", "ties", "minus-inf", "nan"])
def test_window_positions_restore_the_indices_exactly(name, values):
    pool, shape = POOLS[name]
    torch.manual_seed(0)
    x = {
        "random": lambda: torch.randn(shape),
        "ties": lambda: torch.randint(0, 2, shape).float(),  # many equal maxima: PyTorch picks the first
        "minus-inf": lambda: torch.full(shape, float("-inf")),  # no value beats the start: its first position
        "nan": lambda: torch.where(torch.rand(shape) < 0.1, float("nan"), torch.randn(shape)),
    }[values]()
    indices = indices_of(pool, x)
    windows = pool_windows(pool, x.shape)
    codes = encode(indices, windows)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-indices.numel() * windows.bits // 8)
    restored = decode(codes, windows, indices.shape, indices.stride())
    assert restored.dtype == torch.int64 and torch.equal(restored, indices)


@pytest.mark.parametrize("name", POOLS)
def test_index_zero_outside_its_window_restores_exactly(name):
    # CUDA's channels-last kernel starts every window at position 0 of the plane with the value -inf, so
    # a window of -inf only keeps index 0, outside most windows (seen on an H200, torch 2.11). No CPU
    # kernel does this: the indices are made here as that kernel makes them for an input of -inf.
    pool, shape = POOLS[name]
    indices = torch.zeros_like(indices_of(pool, torch.randn(shape)))
    windows = pool_windows(pool, torch.Size(shape))
    restored = decode(encode(indices, windows), windows, indices.shape, indices.stride())
    assert torch.equal(restored, indices)


def test_channels_last_indices_keep_their_strides():
    pool = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 8, 15, 15).to(memory_format=torch.channels_last)
    indices = indices_of(pool, x)
    assert indices.is_contiguous(memory_format=torch.channels_last) and not indices.is_contiguous()
    windows = pool_windows(pool, x.shape)
    restored = decode(encode(indices, windows), windows, indices.shape, indices.stride())
    assert restored.stride() == indices.stride() and torch.equal(restored, indices)


@pytest.mark.parametrize("kernel, bits", [(2, 2), ((1, 3), 2), ((2, 2), 4), (3, 4), ((3, 5), 4), ((4, 4), 8),
                                          ((15, 17), 8)],
                         ids=["2", "1x3", "2x2", "3x3", "3x5", "4x4", "15x17"])
def test_bits_are_the_fewest_that_hold_every_window_position_and_outside(kernel, bits):
    pool = nn.MaxPool1d(kernel) if isinstance(kernel, int) and kernel == 2 else nn.MaxPool2d(kernel)
    shape = (1, 1, 64) if isinstance(pool, nn.MaxPool1d) else (1, 1, 64, 64)
    assert pool_windows(pool, torch.Size(shape)).bits == bits


def test_other_modules_and_large_windows_are_not_encoded():
    assert pool_windows(nn.MaxPool2d(16), torch.Size((1, 1, 64, 64))) is None  # 256 positions and "outside"
    assert pool_windows(nn.AdaptiveMaxPool2d(3), torch.Size((1, 1, 64, 64))) is None
    assert pool_windows(nn.MaxPool2d(2), None) is None
    assert pool_windows(nn.Linear(2, 2), torch.Size((1, 1, 64, 64))) is None


def test_code_layout_golden_bytes():
    # First value in the lowest bits; the last byte padded with zeros.
    codes = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    assert _pack_codes(codes, 4).tolist() == [0x21, 0x43, 0x05]
    assert _pack_codes(codes[:4] % 4, 2).tolist() == [0b00111001]
    assert _pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b10001101, 1]
    for bits in (1, 2, 4, 8):
        values = torch.randint(0, 1 << bits, (37,), dtype=torch.uint8)
        assert torch.equal(_unpack_codes(_pack_codes(values, bits), bits, 37), values)


def test_window_position_layout_golden():
    # A 3x3 window, stride 2, padding 1, on a 4x4 plane: output (0, 0)'s window starts at (-1, -1),
    # so input position (0, 0) (index 0) is window position (1, 1) = 4; output (1, 1)'s window starts
    # at (1, 1), and input (3, 2) (index 14) is window position (2, 1) = 7.
    windows = PoolWindows((4, 4), (3, 3), (2, 2), (1, 1), (1, 1))
    indices = torch.tensor([[[[0, 2], [8, 14]]]])
    # (0, 1) starts at (-1, 1): index 2 = (0, 2) is position (1, 1) = 4; (1, 0) starts at (1, -1):
    # index 8 = (2, 0) is position (1, 1) = 4.
    assert encode(indices, windows).tolist() == [0x44, 0x74]


def test_outside_code_layout_golden():
    # A 2x2 window, stride 2, on a 4x4 plane: index 0 lies in output (0, 0)'s window (position 0) and
    # outside the other three, whose code is then 4 (the window's 4 positions, then "outside").
    windows = PoolWindows((4, 4), (2, 2), (2, 2), (0, 0), (1, 1))
    indices = torch.zeros(1, 1, 2, 2, dtype=torch.int64)
    codes = encode(indices, windows)
    assert windows.bits == 4 and codes.tolist() == [0x40, 0x44]
    assert torch.equal(decode(codes, windows, indices.shape, indices.stride()), indices)
