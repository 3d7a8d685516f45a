"""Max-pooling indices <-> 1-8 bit window positions, each launcher beside its plain-torch reference.

``nn.MaxPool1d/2d/3d`` saves, for each output element, the int64 flat position of its maximum in the
(n, c) plane of its input. Encoding stores each as its place inside the output element's window, or as
the code ``PoolWindows.outside`` for index 0 outside the window (CUDA's channels-last kernel keeps it for
a window of -inf only); decoding restores the int64 indices exactly. docs/format.md gives the layout:
the codes in the memory order of the index tensor, ``8 // bits`` to a byte, the first in the lowest bits.

Why kernels: the torch reference runs some 30 ops over the whole index tensor each way (int64 and int32
temporaries, masks, broadcast window starts). For ResNet-50's stem pool, which saves 51 million indices
at batch 256, they moved about 340 bytes per index, encode and decode together (counted by
benchmarks/device_ledger.py); one pass each way moves 17 (8 bytes of int64 read and half a byte of codes
written at 4 bits, and back).

Both kernels find an element's output coordinates from its place ``p`` in memory, ``(p // stride_d) %
size_d`` for each spatial dimension d, and the window coordinates of an index by peeling the plane's
sizes off it. Those sizes are runtime values, so every division is a multiply-high by a prepared
divisor (``channels.divider``), exact below 2**31: the launchers take tensors of fewer than 2**31
elements (``fits_kernels``), and the library's codec passes larger ones to the reference. The window's
own sizes (kernel, stride, padding, dilation) are constexprs: they are few per model, and make their
divisions and products free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .bitpack import (pack_codes, packed_codes_nbytes, torch_pack_padded_codes, torch_unpack_padded_codes,
                      unpack_codes)
from .channels import INDEX32_LIMIT, divide, divider
from .launch import KernelLauncher, cdiv

# Windows of up to 255 positions (and the code for "outside") fit a byte.
CODE_BITS = (1, 2, 4, 8)
# Indices one program encodes or decodes, and its warps: a memory-bound pass, like the bool kernels.
BLOCK_ELEMENTS = 2048
NUM_WARPS = 4
# The kernels treat every pool as 3-D: a 1-D or 2-D pool gets leading dimensions of size 1 with a
# window of 1 (stride 1, padding 0, dilation 1), whose step is always 0.
KERNEL_DIMS = 3


@dataclass(frozen=True)
class PoolWindows:
    """The windows of one max-pooling call: what maps an index to its window position and back.

    All tuples have one entry per spatial dimension (1-3), outermost first: ``input_sizes`` are the
    spatial sizes of the pooled input (the plane the indices point into).
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


def memory_order(t: torch.Tensor) -> list[int]:
    """The dimensions of dense ``t`` from the slowest in memory to the fastest: ``t.permute(order)`` is
    contiguous. (Dimensions of size 1 may land anywhere; they hold one position.)"""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def fits_kernels(indices: torch.Tensor) -> bool:
    """True when the kernels' 32-bit index arithmetic covers ``indices``: fewer than 2**31 of them. (The
    programs' tiles, BLOCK_ELEMENTS positions from 0 on, a power of two, then all end by 2**31.)"""
    return indices.numel() < INDEX32_LIMIT


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------


@triton.jit
def _output_coordinate(p, stride_divisor, size_divisor, size):
    """(p // stride) % size for uint32 ``p`` below 2**31, both divisors from ``divider``."""
    quotient = divide(p, stride_divisor)
    return (quotient - divide(quotient, size_divisor) * size).to(tl.int32)


@triton.jit
def _window_step(coordinate, o, K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    """(steps from the window's start, whether ``coordinate`` lies on the window) along one dimension."""
    offset = coordinate - (o * S - P)
    if D == 1:
        return offset, (offset >= 0) & (offset < K)
    else:
        # (A negative offset is off the window whatever its quotient.)
        step = offset // D
        return step, (offset >= 0) & (step < K) & (offset % D == 0)


@triton.jit
def _encode_kernel(indices_ptr, codes_ptr, n_elements, in_size1, in_size2, in_divisor1, in_divisor2,
                   out_stride_divisor0, out_size_divisor0, out_size0,
                   out_stride_divisor1, out_size_divisor1, out_size1,
                   out_stride_divisor2, out_size_divisor2, out_size2,
                   K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                   S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                   P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                   D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   SPATIAL: tl.constexpr, BITS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    # One program writes BLOCK_BYTES bytes of codes, PER_BYTE indices each, read in memory order.
    PER_BYTE: tl.constexpr = 8 // BITS
    OUTSIDE: tl.constexpr = K0 * K1 * K2
    pid = tl.program_id(0)
    byte_idx = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    p = byte_idx[:, None] * PER_BYTE + tl.arange(0, PER_BYTE)[None, :]  # (int32: fits_kernels)
    valid = p < n_elements
    index = tl.load(indices_ptr + p, mask=valid, other=0).to(tl.int32)
    pu = p.to(tl.uint32)
    # The index's coordinates in its plane, innermost first; dimensions the pool lacks stay at 0.
    position = index.to(tl.uint32)
    c0 = tl.zeros_like(index)
    c1 = tl.zeros_like(index)
    if SPATIAL == 1:
        c2 = index
    else:
        rest = divide(position, in_divisor2)
        c2 = (position - rest * in_size2).to(tl.int32)
        if SPATIAL == 2:
            c1 = rest.to(tl.int32)
        else:
            c0u = divide(rest, in_divisor1)
            c1 = (rest - c0u * in_size1).to(tl.int32)
            c0 = c0u.to(tl.int32)
    o2 = _output_coordinate(pu, out_stride_divisor2, out_size_divisor2, out_size2)
    step2, inside = _window_step(c2, o2, K2, S2, P2, D2)
    local = step2
    if SPATIAL >= 2:
        o1 = _output_coordinate(pu, out_stride_divisor1, out_size_divisor1, out_size1)
        step1, inside1 = _window_step(c1, o1, K1, S1, P1, D1)
        inside = inside & inside1
        local += step1 * K2
    if SPATIAL == 3:
        o0 = _output_coordinate(pu, out_stride_divisor0, out_size_divisor0, out_size0)
        step0, inside0 = _window_step(c0, o0, K0, S0, P0, D0)
        inside = inside & inside0
        local += step0 * (K1 * K2)
    code = tl.where(inside, local, OUTSIDE)
    code = tl.where(valid, code, 0).to(tl.uint8)  # (the last byte's padding: zeros)
    packed = tl.reshape(pack_codes(code, BLOCK_BYTES, PER_BYTE, BITS), (BLOCK_BYTES,))
    out_idx = pid * BLOCK_BYTES + tl.max_contiguous(tl.arange(0, BLOCK_BYTES), 1)
    tl.store(codes_ptr + out_idx, packed, mask=byte_idx * PER_BYTE < n_elements)


@triton.jit
def _decode_kernel(codes_ptr, out_ptr, n_elements, in_size1, in_size2,
                   out_stride_divisor0, out_size_divisor0, out_size0,
                   out_stride_divisor1, out_size_divisor1, out_size1,
                   out_stride_divisor2, out_size_divisor2, out_size2,
                   K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                   S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                   P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                   D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   SPATIAL: tl.constexpr, BITS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    PER_BYTE: tl.constexpr = 8 // BITS
    OUTSIDE: tl.constexpr = K0 * K1 * K2
    pid = tl.program_id(0)
    byte_idx = pid * BLOCK_BYTES + tl.max_contiguous(tl.arange(0, BLOCK_BYTES), 1)
    packed = tl.load(codes_ptr + byte_idx, mask=byte_idx * PER_BYTE < n_elements, other=0)
    code = unpack_codes(tl.reshape(packed, (BLOCK_BYTES, 1)), BLOCK_BYTES, PER_BYTE, BITS).to(tl.int32)
    p = byte_idx[:, None] * PER_BYTE + tl.arange(0, PER_BYTE)[None, :]
    pu = p.to(tl.uint32)
    # Coordinate along each dimension: the window's start plus the code's steps, counted in dilations.
    o2 = _output_coordinate(pu, out_stride_divisor2, out_size_divisor2, out_size2)
    index = o2 * S2 - P2 + (code % K2) * D2
    if SPATIAL >= 2:
        o1 = _output_coordinate(pu, out_stride_divisor1, out_size_divisor1, out_size1)
        index += (o1 * S1 - P1 + ((code // K2) % K1) * D1) * in_size2
    if SPATIAL == 3:
        o0 = _output_coordinate(pu, out_stride_divisor0, out_size_divisor0, out_size0)
        index += (o0 * S0 - P0 + ((code // (K1 * K2)) % K0) * D0) * (in_size1 * in_size2)
    index = tl.where(code == OUTSIDE, 0, index)
    tl.store(out_ptr + p, index.to(tl.int64), mask=p < n_elements)


_launch_encode = KernelLauncher(_encode_kernel)
_launch_decode = KernelLauncher(_decode_kernel)


def _padded(windows: PoolWindows) -> dict:
    """The constexprs of a launch: the window's sizes, led by 1-position dimensions up to KERNEL_DIMS."""
    lead = KERNEL_DIMS - len(windows.input_sizes)
    constexprs = {"SPATIAL": len(windows.input_sizes), "BITS": windows.bits}
    for prefix, values, pad in (("K", windows.kernel_size, 1), ("S", windows.stride, 1),
                                ("P", windows.padding, 0), ("D", windows.dilation, 1)):
        for d, value in enumerate((pad,) * lead + tuple(values)):
            constexprs[f"{prefix}{d}"] = value
    return constexprs


def _plane_args(windows: PoolWindows) -> tuple[int, int]:
    """The input plane's two inner sizes (1 where the pool has fewer dimensions)."""
    sizes = (1,) * (KERNEL_DIMS - len(windows.input_sizes)) + tuple(windows.input_sizes)
    return sizes[1], sizes[2]


def _output_args(t: torch.Tensor, spatial: int) -> tuple[int, ...]:
    """For each of the KERNEL_DIMS spatial dimensions of dense ``t`` (outermost first): the divisor of its
    stride, the divisor of its size, and its size; a dimension the pool lacks gets size 1."""
    args: list[int] = []
    for d in range(KERNEL_DIMS):
        dim = t.dim() - KERNEL_DIMS + d
        if d < KERNEL_DIMS - spatial or t.shape[dim] == 1:
            args += [divider(1), divider(1), 1]  # (one position: coordinate 0)
        else:
            args += [divider(t.stride(dim)), divider(t.shape[dim]), t.shape[dim]]
    return tuple(args)


def _block_bytes(bits: int) -> int:
    return BLOCK_ELEMENTS // (8 // bits)


def triton_encode_pool_indices(indices: torch.Tensor, windows: PoolWindows) -> torch.Tensor:
    """int64 indices [..., *out_sizes], dense in any dimension order (``fits_kernels``)
    -> uint8 [packed_codes_nbytes(n, windows.bits)]: their window positions in memory order (module docstring)."""
    n = indices.numel()
    bits = windows.bits
    codes = torch.empty(packed_codes_nbytes(n, bits), dtype=torch.uint8, device=indices.device)
    if n:
        in_size1, in_size2 = _plane_args(windows)
        block = _block_bytes(bits)
        _launch_encode(cdiv(codes.numel(), block),
                       (indices, codes, n, in_size1, in_size2, divider(in_size1), divider(in_size2),
                        *_output_args(indices, len(windows.input_sizes))),
                       dict(_padded(windows), BLOCK_BYTES=block), NUM_WARPS)
    return codes


def triton_decode_pool_indices(codes: torch.Tensor, windows: PoolWindows, out: torch.Tensor) -> None:
    """Inverse of ``triton_encode_pool_indices``: writes the int64 indices into ``out`` (dense, the index
    tensor's shape and strides, ``fits_kernels``) in memory order."""
    n = out.numel()
    if n:
        in_size1, in_size2 = _plane_args(windows)
        block = _block_bytes(windows.bits)
        _launch_decode(cdiv(codes.numel(), block),
                       (codes, out, n, in_size1, in_size2, *_output_args(out, len(windows.input_sizes))),
                       dict(_padded(windows), BLOCK_BYTES=block), NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# torch references
# ---------------------------------------------------------------------------------------------


def _window_starts(windows: PoolWindows, run: torch.Tensor, order: list[int]) -> list[torch.Tensor]:
    """For each spatial dimension d, int32 ``o * stride - padding`` shaped to broadcast against ``run``
    (the index tensor permuted to ``order``) along d's place in it."""
    spatial = len(windows.input_sizes)
    starts = []
    for d, (stride, padding) in enumerate(zip(windows.stride, windows.padding)):
        axis = order.index(run.dim() - spatial + d)
        size = run.shape[axis]
        start = torch.arange(size, device=run.device, dtype=torch.int32) * stride - padding
        starts.append(start.view([size if a == axis else 1 for a in range(run.dim())]))
    return starts


def torch_encode_pool_indices(indices: torch.Tensor, windows: PoolWindows) -> torch.Tensor:
    """Reference for ``triton_encode_pool_indices`` (any number of elements)."""
    order = memory_order(indices)
    run = indices.permute(order)  # contiguous: the indices in memory order
    position = run.to(torch.int32)  # (planes of more than 2**31 positions are not encoded: pool_windows)
    local = torch.zeros_like(position)
    inside = torch.ones_like(position, dtype=torch.bool)
    starts = _window_starts(windows, run, order)
    # Innermost dimension first: peel each coordinate off the flat position.
    for d in reversed(range(len(windows.input_sizes))):
        coordinate = position % windows.input_sizes[d]
        position = position // windows.input_sizes[d]
        offset = coordinate - starts[d]
        step = offset // windows.dilation[d] if windows.dilation[d] != 1 else offset
        inside &= (offset >= 0) & (step < windows.kernel_size[d])
        if windows.dilation[d] != 1:
            inside &= offset % windows.dilation[d] == 0
        local += step * math.prod(windows.kernel_size[d + 1:])
    local = torch.where(inside, local, windows.outside)
    return torch_pack_padded_codes(local.to(torch.uint8).reshape(-1), windows.bits)


def torch_decode_pool_indices(codes: torch.Tensor, windows: PoolWindows, out: torch.Tensor) -> None:
    """Reference for ``triton_decode_pool_indices`` (any number of elements)."""
    order = memory_order(out)
    run = out.permute(order)  # contiguous: written in memory order
    local = torch_unpack_padded_codes(codes, windows.bits, out.numel()).to(torch.int32).view(run.shape)
    starts = _window_starts(windows, run, order)
    position = torch.zeros(run.shape, dtype=torch.int64, device=out.device)
    for d in range(len(windows.input_sizes)):
        inner = math.prod(windows.kernel_size[d + 1:])
        step = (local // inner) % windows.kernel_size[d]
        position = position * windows.input_sizes[d] + (starts[d] + step * windows.dilation[d])
    run.copy_(torch.where(local == windows.outside, 0, position))
