"""Which max-pooling calls get their indices stored as window positions, and with what windows.

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

``pool_windows`` describes a pooling call's windows (``PoolWindows``); the encoding itself is
``codec.encode_pool_indices`` / ``codec.decode_pool_indices``, whose kernels and references are in
``kernels/pool_indices.py``, and whose layout docs/format.md gives.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .kernels.pool_indices import CODE_BITS, PoolWindows

__all__ = ["PoolWindows", "pool_windows"]

_MAX_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


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
    # (the encoding computes in int32: planes of more than 2**31 positions keep the int64 indices' narrowing)
    if windows.outside >= 1 << CODE_BITS[-1] or math.prod(windows.input_sizes) > 2**31:
        return None
    return windows
