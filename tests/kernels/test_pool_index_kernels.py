"""The pool-index kernels against their torch references, byte for byte (kernels/pool_indices.py).

Round trips through PyTorch's own indices and the golden layout are in tests/tritonquant/test_pool_indices.py.
"""

import pytest
import torch
import torch.nn.functional as F

from tritonquant import codec
from tritonquant.kernels import pool_indices
from tritonquant.kernels.pool_indices import (BLOCK_ELEMENTS, PoolWindows, torch_decode_pool_indices,
                                              torch_encode_pool_indices, triton_decode_pool_indices,
                                              triton_encode_pool_indices)

# name: (input shape, kernel, stride, padding, dilation, ceil_mode); sizes chosen so that most cases
# span several programs (BLOCK_ELEMENTS indices each) and end inside a byte.
CASES = {
    "1d-k3-s2-p1-d2-ceil": ((3, 5, 301), 3, 2, 1, 2, True),
    "2d-k3-s2-p1": ((3, 5, 33, 33), 3, 2, 1, 1, False),  # ResNet's stem pool, smaller
    "2d-k2": ((2, 8, 30, 26), 2, 2, 0, 1, False),
    "2d-k2x3-s1-d2": ((2, 4, 23, 21), (2, 3), 1, 0, (2, 1), False),
    "2d-width-1": ((4, 8, 130, 2), 3, 2, 1, 1, False),  # one output column: its coordinate is always 0
    "2d-unbatched": ((11, 27, 29), 3, 2, 1, 1, False),
    "3d-k2": ((2, 4, 12, 14, 16), 2, 2, 0, 1, False),
    "3d-k3-s2-p1": ((2, 5, 13, 11, 10), 3, 2, 1, 1, True),
    "2d-k15x17": ((1, 2, 30, 68), (15, 17), (15, 17), 0, 1, False),  # 8-bit codes
}
POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def spatial_dims(name: str) -> int:
    return int(name[0])


def windows_and_indices(name: str, layout: str, values: str, device: torch.device
                        ) -> tuple[PoolWindows, torch.Tensor]:
    shape, kernel, stride, padding, dilation, ceil_mode = CASES[name]
    dims = spatial_dims(name)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    if layout == "channels-last":
        x = x.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    _, indices = POOL[dims](x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    if layout == "permuted":  # dense, in an order no memory format names: width slowest
        order = [indices.dim() - 1, *range(indices.dim() - 1)]
        indices = indices.permute(order).contiguous().permute(torch.argsort(torch.tensor(order)).tolist())
    if values == "outside":  # index 0 everywhere: outside most windows (CUDA's channels-last kernel, -inf)
        indices = torch.zeros_like(indices)

    def per_dim(v):
        return tuple(v) if isinstance(v, tuple) else (v,) * dims

    windows = PoolWindows(tuple(shape[-dims:]), per_dim(kernel), per_dim(stride), per_dim(padding), per_dim(dilation))
    return windows, indices


LAYOUTS = ["contiguous", "channels-last", "permuted"]


@pytest.mark.parametrize("values", ["pooled", "outside"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_kernels_match_the_references_byte_for_byte(name, layout, values, device):
    if layout == "channels-last" and spatial_dims(name) == 1 or (layout != "contiguous" and "unbatched" in name):
        pytest.skip("no channels-last format for this rank")
    windows, indices = windows_and_indices(name, layout, values, device)
    codes = triton_encode_pool_indices(indices, windows)
    assert torch.equal(codes, torch_encode_pool_indices(indices, windows))
    # Every index written: the outputs start as a value no index takes.
    restored = torch.full_like(indices, -7)
    expected = torch.full_like(indices, -7)
    triton_decode_pool_indices(codes, windows, restored)
    torch_decode_pool_indices(codes, windows, expected)
    assert restored.stride() == indices.stride()
    assert torch.equal(restored, expected) and torch.equal(restored, indices)


def test_the_cases_span_several_programs_and_end_inside_a_byte():
    # (So the tests above cover tiles past the first, and a last byte that the codes fill only in part.)
    counts = {name: windows_and_indices(name, "contiguous", "pooled", torch.device("cpu")) for name in CASES}
    assert sum(indices.numel() > BLOCK_ELEMENTS for _, indices in counts.values()) >= len(CASES) - 1
    assert any(indices.numel() % (8 // windows.bits) for windows, indices in counts.values())


def test_no_indices(device):
    windows = PoolWindows((4, 4), (2, 2), (2, 2), (0, 0), (1, 1))
    indices = torch.empty(0, 3, 2, 2, dtype=torch.int64, device=device)
    codes = triton_encode_pool_indices(indices, windows)
    assert codes.numel() == 0
    triton_decode_pool_indices(codes, windows, torch.empty_like(indices))


@pytest.mark.parametrize("fits", [True, False], ids=["kernels", "too-many-for-kernels"])
def test_codec_passes_what_the_kernels_cannot_index_to_the_reference(fits, monkeypatch, device):
    windows, indices = windows_and_indices("2d-k2", "contiguous", "pooled", device)
    launched = []

    def recorded(name, launcher):
        def launch(*args):
            launched.append(name)
            return launcher(*args)
        return launch

    monkeypatch.setitem(codec._ENCODE_POOL, "triton", recorded("encode", codec._ENCODE_POOL["triton"]))
    monkeypatch.setitem(codec._DECODE_POOL, "triton", recorded("decode", codec._DECODE_POOL["triton"]))
    monkeypatch.setattr(pool_indices, "fits_kernels", lambda t: fits)
    codes = codec.encode_pool_indices(indices, windows, "triton")
    restored = codec.decode_pool_indices(codes, windows, indices.shape, indices.stride(), "triton")
    assert torch.equal(restored, indices)
    assert launched == (["encode", "decode"] if fits else [])


def test_fits_kernels_below_2_31_indices():
    class Sized:  # (a tensor of 2**31 indices would take 16 GB)
        def __init__(self, n):
            self.n = n

        def numel(self):
            return self.n

    assert pool_indices.fits_kernels(Sized(2**31 - 1)) and not pool_indices.fits_kernels(Sized(2**31))
