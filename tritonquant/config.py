"""Validated quantization settings shared by ``quantize``, ``compress`` and ``attach``."""

from __future__ import annotations

from dataclasses import dataclass

BITS_CHOICES = (1, 2, 4, 8)
SCHEMES = ("minmax", "sigma")
BACKENDS = ("auto", "triton", "torch")
MIN_GROUP_SIZE = 8  # a group must fill whole bytes at 1 bit
MAX_GROUP_SIZE = 4096  # keeps the sigma statistics' integer sums inside int32/int64
GROUP_SIZES = tuple(2**k for k in range(3, 13))
MAX_SEED = 2**63 - 1

# 256 elements a group: the 8 bytes of fp32 (base, step) cost 0.25 bit an element, so 2-bit codes
# take 2.25 bits (7.1x smaller than bf16, 14.2x than fp32) while groups stay small enough for
# outliers to stay local. docs/format.md has the table for other sizes.
DEFAULT_GROUP_SIZE = 256


@dataclass(frozen=True)
class QuantConfig:
    """How one tensor is quantized. Every field is checked on construction.

    bits: code width, one of 1, 2, 4, 8.
    scheme: "minmax" (grid over the group's min..max) or "sigma" (mean +/- 3 std, clipped to min..max).
    stochastic: unbiased stochastic rounding from Philox(seed, element counter) instead of nearest.
    group_size: elements per group of shared (base, step); a power of two in 8..4096.
    seed: Philox key for stochastic rounding; None draws from the library's own stream
        (``tritonquant.manual_seed``), an int makes every call with it reproducible.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """

    bits: int = 4
    scheme: str = "minmax"
    stochastic: bool = False
    group_size: int = DEFAULT_GROUP_SIZE
    seed: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in BITS_CHOICES:
            raise ValueError(f"bits must be one of {BITS_CHOICES}, got {self.bits!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if not isinstance(self.stochastic, bool):
            raise TypeError(f"stochastic must be a bool, got {type(self.stochastic).__name__}")
        if not _is_int(self.group_size) or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"group_size must be a power of two from {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE}, got {self.group_size!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be None or an int in [0, 2**63 - 1], got {self.seed!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
