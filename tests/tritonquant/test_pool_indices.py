"""Max-pooling indices as window positions (tritonquant/pool_indices.py, codec.encode_pool_indices and
decode_pool_indices): exact round trips through PyTorch's own indices, on both backends, and the byte
layout. (tests/kernels/test_pool_index_kernels.py checks the kernels against their references.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import CPU_BACKENDS
from tritonquant.codec import decode_pool_indices, encode_pool_indices
from tritonquant.kernels.bitpack import torch_pack_padded_codes, torch_unpack_padded_codes
from tritonquant.pool_indices import PoolWindows, pool_windows


def round_trip(indices: torch.Tensor, windows: PoolWindows, backend: str) -> torch.Tensor:
    codes = encode_pool_indices(indices, windows, backend)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-indices.numel() * windows.bits // 8)
    restored = decode_pool_indices(codes, windows, indices.shape, indices.stride(), backend)
    assert restored.dtype == torch.int64 and restored.stride() == indices.stride()
    return restored

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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", POOLS)
@pytest.mark.parametrize("values", ["random", "ties", "minus-inf", "nan"])
def test_window_positions_restore_the_indices_exactly(name, values, backend):
    pool, shape = POOLS[name]
    torch.manual_seed(0)
    x = {
        "random": lambda: torch.randn(shape),
        "ties": lambda: torch.randint(0, 2, shape).float(),  # many equal maxima: PyTorch picks the first
        "minus-inf": lambda: torch.full(shape, float("-inf")),  # no value beats the start: its first position
        "nan": lambda: torch.where(torch.rand(shape) < 0.1, float("nan"), torch.randn(shape)),
    }[values]()
    indices = indices_of(pool, x)
    assert torch.equal(round_trip(indices, pool_windows(pool, x.shape), backend), indices)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", POOLS)
def test_index_zero_outside_its_window_restores_exactly(name, backend):
    # CUDA's channels-last kernel starts every window at position 0 of the plane with the value -inf, so
    # a window of -inf only keeps index 0, outside most windows (seen on an H200, torch 2.11). No CPU
    # kernel does this: the indices are made here as that kernel makes them for an input of -inf.
    pool, shape = POOLS[name]
    indices = torch.zeros_like(indices_of(pool, torch.randn(shape)))
    assert torch.equal(round_trip(indices, pool_windows(pool, torch.Size(shape)), backend), indices)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d"])
def test_channels_last_indices_keep_their_strides(layout, backend):
    pool, shape = (nn.MaxPool2d(3, 2, 1), (2, 8, 15, 15)) if layout == "channels_last" else (
        nn.MaxPool3d(3, 2, 1), (2, 8, 7, 9, 8))
    x = torch.randn(shape).to(memory_format=getattr(torch, layout))
    indices = indices_of(pool, x)
    assert indices.is_contiguous(memory_format=getattr(torch, layout)) and not indices.is_contiguous()
    assert torch.equal(round_trip(indices, pool_windows(pool, x.shape), backend), indices)


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
    assert torch_pack_padded_codes(codes, 4).tolist() == [0x21, 0x43, 0x05]
    assert torch_pack_padded_codes(codes[:4] % 4, 2).tolist() == [0b00111001]
    assert torch_pack_padded_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [
        0b10001101, 1]
    for bits in (1, 2, 4, 8):
        values = torch.randint(0, 1 << bits, (37,), dtype=torch.uint8)
        assert torch.equal(torch_unpack_padded_codes(torch_pack_padded_codes(values, bits), bits, 37), values)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_position_layout_golden(backend):
    # A 3x3 window, stride 2, padding 1, on a 4x4 plane: output (0, 0)'s window starts at (-1, -1),
    # so input position (0, 0) (index 0) is window position (1, 1) = 4; output (1, 1)'s window starts
    # at (1, 1), and input (3, 2) (index 14) is window position (2, 1) = 7.
    windows = PoolWindows((4, 4), (3, 3), (2, 2), (1, 1), (1, 1))
    indices = torch.tensor([[[[0, 2], [8, 14]]]])
    # (0, 1) starts at (-1, 1): index 2 = (0, 2) is position (1, 1) = 4; (1, 0) starts at (1, -1):
    # index 8 = (2, 0) is position (1, 1) = 4.
    assert encode_pool_indices(indices, windows, backend).tolist() == [0x44, 0x74]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_codes_follow_the_memory_order_golden(backend):
    # 2x2 windows, stride 2, on a 2x4 plane; two output positions along the width, two channels. Logical
    # order (c0 w0, c0 w1, c1 w0, c1 w1) holds window positions 0, 1, 2, 3; channels_last memory holds
    # them as (c0 w0, c1 w0, c0 w1, c1 w1), so its codes are 0, 2, 1, 3.
    windows = PoolWindows((2, 4), (2, 2), (2, 2), (0, 0), (1, 1))
    logical = torch.tensor([[[[0, 3]], [[4, 7]]]])  # (plane row 0 col 0, row 0 col 3, row 1 col 0, row 1 col 3)
    assert encode_pool_indices(logical, windows, backend).tolist() == [0x10, 0x32]
    channels_last = logical.to(memory_format=torch.channels_last)
    assert encode_pool_indices(channels_last, windows, backend).tolist() == [0x20, 0x31]
    restored = decode_pool_indices(torch.tensor([0x20, 0x31], dtype=torch.uint8), windows, channels_last.shape,
                                   channels_last.stride(), backend)
    assert torch.equal(restored, logical) and restored.stride() == channels_last.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outside_code_layout_golden(backend):
    # A 2x2 window, stride 2, on a 4x4 plane: index 0 lies in output (0, 0)'s window (position 0) and
    # outside the other three, whose code is then 4 (the window's 4 positions, then "outside").
    windows = PoolWindows((4, 4), (2, 2), (2, 2), (0, 0), (1, 1))
    indices = torch.zeros(1, 1, 2, 2, dtype=torch.int64)
    codes = encode_pool_indices(indices, windows, backend)
    assert windows.bits == 4 and codes.tolist() == [0x40, 0x44]
    assert torch.equal(decode_pool_indices(codes, windows, indices.shape, indices.stride(), backend), indices)
