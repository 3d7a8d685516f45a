"""Validated quantization settings shared by ``quantize``, ``compress`` and ``attach``."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

BITS_CHOICES = (1, 2, 4, 8)
SCHEMES = ("minmax", "sigma")
BACKENDS = ("auto", "triton", "torch")
MIN_GROUP_SIZE = 8  # a group must fill whole bytes at 1 bit
MAX_GROUP_SIZE = 4096  # keeps the sigma statistics' integer sums inside int32/int64
GROUP_SIZES = tuple(2**k for k in range(MIN_GROUP_SIZE.bit_length() - 1, MAX_GROUP_SIZE.bit_length()))
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
    stochastic: stochastic rounding from Philox(seed, element counter) instead of nearest (unbiased
        between grid levels; not where a value is clamped or moved by the sign rule, docs/format.md).
    group_size: elements per group of shared (base, step); a power of two in 8..4096.
    seed: Philox key for stochastic rounding; None draws from the library's own stream
        (``tritonquant.manual_seed``), an int makes every call with it reproducible: ``quantize``
        packs the same input the same way each time, and a compression block draws each packed
        tensor's numbers from its own stream of that seed, the same numbers every time the block
        runs (for new numbers each step that are still reproducible, ``tritonquant.manual_seed``
        once and no seed).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """

    bits: int = 4
    scheme: str = "minmax"
    stochastic: bool = False
    group_size: int = DEFAULT_GROUP_SIZE
    seed: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("bits", "group_size", "seed"):  # numpy integers and the like, stored as int
            value = getattr(self, name)
            if _is_int(value) and type(value) is not int:
                object.__setattr__(self, name, int(value))
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
    """An integer other than a bool: int, numpy's integer types and other ``numbers.Integral``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Saved tensors whose storage is smaller than this pass through: a kernel launch and a Python hook cost
# more than the few bytes they would save, and in real models such tensors are a negligible share.
DEFAULT_MIN_BYTES = 64 * 1024
QUANT_FIELDS = ("bits", "scheme", "stochastic", "group_size", "seed", "backend")
# Where packed payloads wait between forward and backward: None keeps them on the tensor's device,
# "cpu" moves CUDA payloads to pinned host memory (tritonquant/offload.py; a no-op for CPU tensors).
OFFLOAD_CHOICES = (None, "cpu")


@dataclass(frozen=True)
class CompressConfig:
    """Settings of a ``compress`` block or an ``attach`` handle.

    quant: how packed tensors are quantized (QuantConfig).
    min_bytes: saved tensors whose storage holds fewer bytes pass through unpacked.
    overrides: (key, QuantConfig or None) pairs. A key is a module name pattern (``fnmatch`` syntax,
        matched against names like "layer1.0.conv1") or an ``nn.Module`` subclass. Tensors saved while
        a matching module runs use that QuantConfig; None leaves them unpacked. The innermost running
        module that matches decides; for one module a name match beats a type match.
    offload: None, or "cpu" to keep packed payloads of CUDA tensors in pinned host memory between
        forward and backward (see ``tritonquant.offload``); CPU tensors are unaffected.
    sensitive_bits: the narrowest width for probabilities (``policy.is_sensitive``: softmax and
        log_softmax outputs, also after views and dropout), unless an override decides; default 4, so
        that it matters below 4 bits (docs/fidelity.md); 1 turns the floor off.
    auto_budget: set by ``bits="auto", budget=B``: per-tensor widths chosen by ``tritonquant.autobits``
        so that the average code width stays within B bits (1 <= B <= 8); ``quant.bits`` is then the
        calibration width.
    recast_weights: True (default): autocast's low-precision copies of parameters, which layers save for
        the gradient of their input, are not kept from forward to backward; backward casts the
        parameter again (bit for bit the same copy; ``policy.weight_cast_source``). It needs the
        parameter unchanged, in place and storage, until backward; a changed one raises at backward.
        Autocast also keeps each copy in its cache until the autocast region ends, after the loss, so
        the block clears that cache when the outermost module running in it (the model; for ``attach``,
        the attached model) returns, unless that module has run before in the block (a model called
        twice: the cache then saves a cast per call). False keeps the copies, as exact training does,
        and leaves the cache alone.
    recompute_activations: True (default): the output of a GELU or SiLU that the next layer saves is not
        packed; backward computes it again from the activation's own packed input, which the activation
        saved for its gradient (``policy.activation_output``). An MLP then packs one [tokens, 4 * dim]
        tensor instead of two. It applies where the input was packed at least as wide as the output
        would be; elsewhere, and with False, the output is packed as any other tensor.
    """

    quant: QuantConfig = QuantConfig()
    min_bytes: int = DEFAULT_MIN_BYTES
    overrides: tuple = ()
    offload: str | None = None
    auto_budget: float | None = None
    sensitive_bits: int = 4
    recast_weights: bool = True
    recompute_activations: bool = True

    @classmethod
    def from_kwargs(
        cls, min_bytes: int = DEFAULT_MIN_BYTES, overrides: dict | None = None, offload: str | None = None,
        budget: float | None = None, sensitive_bits: int = 4, recast_weights: bool = True,
        recompute_activations: bool = True, **quant_kwargs
    ) -> "CompressConfig":
        unknown = sorted(set(quant_kwargs) - set(QUANT_FIELDS))
        if unknown:
            allowed = QUANT_FIELDS + ("min_bytes", "overrides", "offload", "budget", "sensitive_bits",
                                      "recast_weights", "recompute_activations")
            raise TypeError(f"unexpected keyword {unknown[0]!r}; allowed: {', '.join(allowed)}")
        auto_budget = None
        bits = quant_kwargs.get("bits")
        if "bits" in quant_kwargs and bits != "auto" and not (_is_int(bits) and bits in BITS_CHOICES):
            raise ValueError(f"bits must be one of {BITS_CHOICES} or 'auto' (with budget), got {bits!r}")
        if bits == "auto":
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1 <= budget <= 8:
                raise ValueError(f"bits='auto' needs budget, the average bits per element, in [1, 8]; got {budget!r}")
            auto_budget = float(budget)
            quant_kwargs["bits"] = 8  # calibration width
        elif budget is not None:
            raise ValueError("budget applies only with bits='auto'")
        quant = QuantConfig(**quant_kwargs)
        if not _is_int(sensitive_bits) or sensitive_bits not in BITS_CHOICES:
            raise ValueError(f"sensitive_bits must be one of {BITS_CHOICES}, got {sensitive_bits!r}")
        if not _is_int(min_bytes) or min_bytes < 0:
            raise ValueError(f"min_bytes must be an int >= 0, got {min_bytes!r}")
        if not isinstance(recast_weights, bool):
            raise ValueError(f"recast_weights must be True or False, got {recast_weights!r}")
        if not isinstance(recompute_activations, bool):
            raise ValueError(f"recompute_activations must be True or False, got {recompute_activations!r}")
        if not (offload is None or (isinstance(offload, str) and offload in OFFLOAD_CHOICES)):
            raise ValueError(f"offload must be one of None, 'cpu'; got {offload!r}")
        return cls(quant=quant, min_bytes=min_bytes, overrides=_parse_overrides(overrides or {}, quant), offload=offload,
                   auto_budget=auto_budget, sensitive_bits=sensitive_bits, recast_weights=recast_weights,
                   recompute_activations=recompute_activations)


def _parse_overrides(overrides: dict, base: QuantConfig) -> tuple:
    import torch.nn as nn  # config stays importable without building torch.nn for plain quantize

    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict mapping a module name pattern or class to settings, got {type(overrides).__name__}")
    parsed = []
    for key, value in overrides.items():
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise TypeError(f"overrides keys must be module name patterns (str) or nn.Module subclasses, got {key!r}")
        if value is None or value == "skip":
            parsed.append((key, None))
            continue
        if not isinstance(value, dict):
            raise TypeError(f"overrides[{key!r}] must be a dict of settings or None (leave unpacked), got {value!r}")
        unknown = sorted(set(value) - set(QUANT_FIELDS))
        if unknown:
            raise ValueError(f"overrides[{key!r}] has unknown setting {unknown[0]!r}; allowed: {', '.join(QUANT_FIELDS)}")
        fields = {name: getattr(base, name) for name in QUANT_FIELDS}
        fields.update(value)
        parsed.append((key, QuantConfig(**fields)))
    return tuple(parsed)
