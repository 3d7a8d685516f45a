"""Dense bit packing of small integer codes, and the lossless 1-bit path for bool tensors.

Layout (pinned by golden-byte tests, described in docs/format.md): codes are packed
least-significant-bits first. With ``per_byte = 8 // bits``, code ``i`` of the stream lands in byte
``i // per_byte`` at bit offset ``(i % per_byte) * bits``. A stream of n codes takes
``ceil(n / per_byte)`` bytes; groups are whole bytes because group sizes are powers of two >= 8.
"""

import torch
import triton
import triton.language as tl

from .launch import BOOL_BLOCK_BYTES, BOOL_NUM_WARPS, KernelLauncher, cdiv, flat_view

# ---------------------------------------------------------------------------------------------
# Triton helpers shared by the quantize and dequantize kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def pack_codes(codes, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, COLS] uint8 codes < 2**BITS -> [ROWS, COLS * BITS // 8] uint8 bytes."""
    PER_BYTE: tl.constexpr = 8 // BITS
    if PER_BYTE == 1:
        return codes
    grouped = tl.reshape(codes, (ROWS, COLS // PER_BYTE, PER_BYTE))
    shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)
    # The shifted fields are disjoint, so their sum is their bitwise or.
    return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def unpack_codes(packed, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, COLS * BITS // 8] uint8 bytes -> [ROWS, COLS] uint8 codes (inverse of pack_codes)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    if PER_BYTE == 1:
        return packed
    shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)
    fields = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(fields, (ROWS, COLS)).to(tl.uint8)


def torch_pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference for ``pack_codes``: uint8 codes [..., m] with m % (8 // bits) == 0 -> uint8 [..., m * bits // 8]."""
    per_byte = 8 // bits
    fields = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = fields[..., 0].clone()
    for k in range(1, per_byte):  # code k of a byte at bit k * bits (codes < 2**bits: no bit leaves the byte)
        packed |= fields[..., k] << (k * bits)
    return packed


def torch_unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference for ``unpack_codes``: uint8 [..., k] -> uint8 codes [..., k * 8 // bits]."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)  # code k of a byte at bit k * bits
    fields = (packed[..., None] >> shifts) & (2**bits - 1)  # (2**: see quantize._torch_grid)
    return fields.reshape(*packed.shape[:-1], -1)


def packed_codes_nbytes(n_codes: int, bits: int) -> int:
    """Bytes of ``n_codes`` codes of ``bits`` bits, ``8 // bits`` to a byte."""
    return cdiv(n_codes, 8 // bits)


def torch_pack_padded_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [n] values below 2**bits -> uint8 [packed_codes_nbytes(n, bits)], the last byte padded with zeros."""
    per_byte = 8 // bits
    padded = torch.zeros(packed_codes_nbytes(codes.numel(), bits) * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:codes.numel()] = codes
    return torch_pack_codes(padded, bits)


def torch_unpack_padded_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``torch_pack_padded_codes``: uint8 [n]."""
    return torch_unpack_codes(packed, bits)[:n]


# ---------------------------------------------------------------------------------------------
# bool <-> 1-bit, lossless
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pack_bool_kernel(src_ptr, dst_ptr, n_elements, BLOCK_BYTES: tl.constexpr):
    # One program packs BLOCK_BYTES output bytes = 8 * BLOCK_BYTES input elements.
    pid = tl.program_id(0)
    byte_idx = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    elem_idx = byte_idx[:, None] * 8 + tl.arange(0, 8)[None, :]
    bits = tl.load(src_ptr + elem_idx, mask=elem_idx < n_elements, other=0)
    codes = (bits != 0).to(tl.uint8)
    packed = tl.reshape(pack_codes(codes, BLOCK_BYTES, 8, 1), (BLOCK_BYTES,))
    # (The hint keeps the store in the layout the bytes are computed in: one byte a thread, a warp's
    # 32 bytes contiguous; without it Triton widens the store through shared memory.)
    out_idx = pid.to(tl.int64) * BLOCK_BYTES + tl.max_contiguous(tl.arange(0, BLOCK_BYTES), 1)
    tl.store(dst_ptr + out_idx, packed, mask=byte_idx * 8 < n_elements)


@triton.jit
def _unpack_bool_kernel(src_ptr, dst_ptr, n_elements, BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0)
    byte_idx = pid.to(tl.int64) * BLOCK_BYTES + tl.max_contiguous(tl.arange(0, BLOCK_BYTES), 1)
    packed = tl.load(src_ptr + byte_idx, mask=byte_idx * 8 < n_elements, other=0)
    codes = unpack_codes(tl.reshape(packed, (BLOCK_BYTES, 1)), BLOCK_BYTES, 8, 1)
    elem_idx = byte_idx[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(dst_ptr + elem_idx, codes, mask=elem_idx < n_elements)


_launch_pack_bool = KernelLauncher(_pack_bool_kernel)
_launch_unpack_bool = KernelLauncher(_unpack_bool_kernel)


def packed_bool_nbytes(n_elements: int) -> int:
    return packed_codes_nbytes(n_elements, 1)


def triton_pack_bool(x: torch.Tensor) -> torch.Tensor:
    """bool, dense (``launch.flat_view``), n elements -> uint8 [ceil(n / 8)], element i of the
    memory-order run at bit i % 8 of byte i // 8."""
    n = x.numel()
    out = torch.empty(packed_bool_nbytes(n), dtype=torch.uint8, device=x.device)
    if n:
        _launch_pack_bool(cdiv(out.numel(), BOOL_BLOCK_BYTES), (x.view(torch.uint8), out, n),
                          dict(BLOCK_BYTES=BOOL_BLOCK_BYTES), BOOL_NUM_WARPS)
    return out


def torch_pack_bool(x: torch.Tensor) -> torch.Tensor:
    """Reference for ``triton_pack_bool``."""
    return torch_pack_padded_codes(flat_view(x).view(torch.uint8), 1)


def triton_unpack_bool(packed: torch.Tensor, out: torch.Tensor) -> None:
    """uint8 [ceil(n / 8)] -> writes the n = out.numel() bools into ``out`` (dense, in memory order)."""
    n = out.numel()
    if n:
        _launch_unpack_bool(cdiv(packed.numel(), BOOL_BLOCK_BYTES), (packed, out.view(torch.uint8), n),
                            dict(BLOCK_BYTES=BOOL_BLOCK_BYTES), BOOL_NUM_WARPS)


def torch_unpack_bool(packed: torch.Tensor, out: torch.Tensor) -> None:
    """Reference for ``triton_unpack_bool``."""
    out = flat_view(out)
    out.view(torch.uint8).copy_(torch_unpack_padded_codes(packed, 1, out.numel()))
