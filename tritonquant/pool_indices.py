"""Max-pooling indices stored exactly as positions inside their pooling window.

``nn.MaxPool1d/2d/3d`` saves, for each output element, the int64 flat position of its maximum in the
(n, c) plane of the input. That position lies inside the output element's window, with one exception:
CUDA's kernel for channels-last inputs starts each window at position 0 of the plane with the value
-inf, and keeps that index where no value beats -inf (a window of -inf only). So an index is fully
described by its place in the window, one of ``prod(kernel_size)`` values (9 for a 3x3 pool), or by one
more code, ``prod(kernel_size)``, for "position 0 of the plane, outside the window". Stored in the
fewest of 1, 2, 4 or 8 bits that hold that many codes and packed several to a byte, ResNet-50's stem
pool keeps its indices in 4 bits each instead of 64 (6.4 MB instead of 103 MB at batch 64). The
encoding uses only the module's settings and the input's shape, never the values, so it needs no host
synchronization; decoding reverses it exactly.

Layout of the packed codes: the window positions, in the logical (row-major) order of the index
tensor, ``8 // bits`` to a byte, the first in the lowest bits; the last byte padded with zeros. A
window position is ``sum_d k_d * prod(kernel[d+1:])``, where ``k_d`` is the position's step along
spatial dimension d, counted in dilations from the window's start ``o_d * stride_d - padding_d``; an
index outside its window (only ever 0, see above) is stored as ``PoolWindows.outside``, which is
``prod(kernel_size)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .kernels.bitpack import torch_pack_codes, torch_unpack_codes

# Windows of up to 255 positions (and the code for "outside") fit a byte; larger windows keep the
# int16/int32 narrowing.
CODE_BITS = (1, 2, 4, 8)
_MAX_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


@dataclass(frozen=True)
class PoolWindows:
    """The windows of one max-pooling call: what is needed to map an index to its window position.

    All tuples have one entry per spatial dimension (1-3), outermost first.
    """

    input_sizes: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def outside(self) -> int:
        """The code of an index outside its window (position 0 of the plane): one past the last position."""
        return math.prod(self.kernel_size)

    @property
    def bits(self) -> int:
        """Bits per stored code: the fewest of CODE_BITS holding the window's positions and ``outside``."""
        return next(b for b in CODE_BITS if self.outside < 1 << b)


def pool_windows(module: nn.Module, input_shape: torch.Size | None) -> PoolWindows | None:
    """The windows of an exact ``nn.MaxPool1d/2d/3d`` applied to an input of ``input_shape``; None for
    any other module (adaptive pools have windows of varying size), an unknown shape, or a window of
    more than 255 positions."""
    dims = _MAX_POOL_DIMS.get(type(module))
    if dims is None or input_shape is None or len(input_shape) < dims + 1:
        return None

    def per_dim(value) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

    stride = module.stride if module.stride is not None else module.kernel_size
    windows = PoolWindows(tuple(input_shape[-dims:]), per_dim(module.kernel_size), per_dim(stride),
                          per_dim(module.padding), per_dim(module.dilation))
    # (encode computes in int32: planes of more than 2**31 positions keep the int64 indices' narrowing)
    if windows.outside >= 1 << CODE_BITS[-1] or math.prod(windows.input_sizes) > 2**31:
        return None
    return windows


def _window_starts(windows: PoolWindows, out_sizes: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
    """For each spatial dimension d, int32 ``o * stride - padding`` shaped to broadcast along d."""
    dims = len(out_sizes)
    starts = []
    for d, (size, stride, padding) in enumerate(zip(out_sizes, windows.stride, windows.padding)):
        start = torch.arange(size, device=device, dtype=torch.int32) * stride - padding
        starts.append(start.view((size,) + (1,) * (dims - 1 - d)))
    return starts


def encode(indices: torch.Tensor, windows: PoolWindows) -> torch.Tensor:
    """int64 max-pooling indices [..., *out_sizes] -> uint8 packed window positions (module docstring)."""
    dims = len(windows.input_sizes)
    out_sizes = tuple(indices.shape[-dims:])
    position = indices.to(torch.int32)  # (a plane of more than 2**31 positions is not pooled in practice)
    local = torch.zeros_like(position)
    inside = torch.ones_like(position, dtype=torch.bool)
    # Innermost dimension first: peel each coordinate off the flat position.
    starts = _window_starts(windows, out_sizes, indices.device)
    for d in reversed(range(dims)):
        coordinate = position % windows.input_sizes[d]
        position = position // windows.input_sizes[d]
        offset = coordinate - starts[d]
        step = offset // windows.dilation[d] if windows.dilation[d] != 1 else offset
        inside &= (offset >= 0) & (step < windows.kernel_size[d])
        if windows.dilation[d] != 1:
            inside &= offset % windows.dilation[d] == 0
        local += step * math.prod(windows.kernel_size[d + 1:])
    local = torch.where(inside, local, windows.outside)
    return _pack_codes(local.to(torch.uint8).reshape(-1), windows.bits)


def decode(codes: torch.Tensor, windows: PoolWindows, shape: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``encode``: int64 indices of ``shape``, laid out with ``stride``."""
    dims = len(windows.input_sizes)
    local = _unpack_codes(codes, windows.bits, math.prod(shape)).to(torch.int32).view(shape)
    starts = _window_starts(windows, tuple(shape[-dims:]), codes.device)
    position = torch.zeros(shape, dtype=torch.int64, device=codes.device)
    for d in range(dims):
        inner = math.prod(windows.kernel_size[d + 1:])
        step = (local // inner) % windows.kernel_size[d]
        position = position * windows.input_sizes[d] + (starts[d] + step * windows.dilation[d])
    position = torch.where(local == windows.outside, 0, position)
    if position.stride() != tuple(stride):
        position = torch.empty_strided(shape, stride, dtype=torch.int64, device=codes.device).copy_(position)
    return position


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [n] values below 2**bits -> uint8 [ceil(n * bits / 8)], ``8 // bits`` to a byte, first lowest
    (the payload's own bit order, ``kernels.bitpack``), the last byte padded with zeros."""
    per_byte = 8 // bits
    padded = torch.zeros(-(-codes.numel() // per_byte) * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:codes.numel()] = codes
    return torch_pack_codes(padded, bits)


def _unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``_pack_codes``: uint8 [n]."""
    return torch_unpack_codes(packed, bits)[:n]
