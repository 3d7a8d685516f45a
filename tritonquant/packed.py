"""The packed form of one tensor: codes, per-group (base, step), and what is needed to restore layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False, init=False)
class PackedTensor:
    """A quantized, bit-packed tensor. Produced by ``tritonquant.quantize``, restored by ``dequantize``.

    Attributes:
        payload: uint8 [n_groups * group_size * bits // 8] codes in physical memory order,
            least-significant bits first (docs/format.md). For bool inputs: ceil(numel / 8) bytes.
        meta: float32 [n_groups, 2] holding (base, step) per group; None for bool inputs.
        shape, stride: the original tensor's size and strides.
        stored_shape, stored_stride: the layout that was packed. Broadcast (stride-0) dimensions are
            collapsed to size 1 and never materialized; a tensor with gaps between its elements is
            packed as a dense copy with the same dimension order.
        dtype: the original dtype (float32, float16, bfloat16 or bool).
        bits, group_size, scheme, stochastic: the settings used (bool inputs: bits 1, scheme "bool").
        channels: float32 [C, 2] holding (minimum, scale) per index of dimension 1 when the tensor was
            standardized per channel before quantization (BatchNorm inputs at 1-2 bits and probabilities),
            or [1, 2] holding (2, 1) for every element: log-probabilities, shifted to x - 1 (docs/format.md);
            restoring computes (decoded - 1) * scale + minimum. None otherwise.
    """

    payload: torch.Tensor
    meta: torch.Tensor | None
    shape: torch.Size
    stride: tuple[int, ...]
    stored_shape: torch.Size
    stored_stride: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    group_size: int
    scheme: str
    stochastic: bool
    channels: torch.Tensor | None = None

    def __init__(self, payload: torch.Tensor, meta: torch.Tensor | None, shape: torch.Size, stride: tuple[int, ...],
                 stored_shape: torch.Size, stored_stride: tuple[int, ...], dtype: torch.dtype, bits: int,
                 group_size: int, scheme: str, stochastic: bool, channels: torch.Tensor | None = None) -> None:
        # The fields in one update of the instance dict: a frozen dataclass's generated __init__ sets them
        # one object.__setattr__ at a time, five times slower, and the pack hook builds one per tensor.
        vars(self).update(payload=payload, meta=meta, shape=shape, stride=stride, stored_shape=stored_shape,
                          stored_stride=stored_stride, dtype=dtype, bits=bits, group_size=group_size, scheme=scheme,
                          stochastic=stochastic, channels=channels)

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def stored_numel(self) -> int:
        """Elements actually packed (broadcast copies are not stored)."""
        return self.stored_shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held: payload plus metadata (and channel statistics, if any)."""
        meta_bytes = 0 if self.meta is None else self.meta.nbytes
        channel_bytes = 0 if self.channels is None else self.channels.nbytes
        return self.payload.nbytes + meta_bytes + channel_bytes

    @property
    def raw_nbytes(self) -> int:
        """Bytes the packed elements took before quantization."""
        return self.stored_numel * self.dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"PackedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, bits={self.bits}, "
            f"scheme={self.scheme!r}, group_size={self.group_size}, standardized={self.channels is not None}, "
            f"nbytes={self.nbytes}, raw_nbytes={self.raw_nbytes})"
        )
