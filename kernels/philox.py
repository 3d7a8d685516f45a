"""Philox4x32 in plain PyTorch, matching Triton's ``tl.randint4x`` and ``tl.rand`` bit for bit.

Stochastic rounding draws its uniforms from a counter-based generator so that a draw depends only on
(seed, element counter): no state is consumed from torch's global generator (dropout masks and
``torch.rand`` stay unchanged) and the torch backend can reproduce the Triton kernel exactly.

Triton's ``tl.rand4x(seed, offset)`` with an int64 ``offset`` runs Philox4x32 with
counter = (offset_lo, offset_hi, 0, 0) and key = (seed_lo, seed_hi), then maps each of the four output
words to a float in [0, 1); ``tl.rand`` is the first of them. The same is done here with uint32
arithmetic emulated in int64 tensors.

Stochastic rounding takes its dither from the raw words of a 7-round Philox (``DITHER_ROUNDS``,
``torch_dither4``): the 23 high bits of a word become a float in [-0.5, 0.5) without an integer-to-float
conversion, which GPUs run at an eighth of the float rate. Salmon et al. ("Parallel random numbers: as
easy as 1, 2, 3", SC 2011) found 7 rounds of Philox4x32 to be the fewest that pass TestU01's BigCrush;
10, Triton's default, adds a safety margin that a rounding dither does not need.
"""

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_ROUNDS = 10  # tl.rand and tl.rand4x
DITHER_ROUNDS = 7  # stochastic rounding (module docstring)
# Largest float32 with (2**31 - 1) * scale < 1 after rounding; the constant tl.rand uses.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(constant: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``constant * value`` for uint32 operands held in int64.

    The product is below 2**64, and int64 multiplication wraps modulo 2**64, so its bit pattern is
    the exact unsigned product: the words are its upper and lower halves (the shift is arithmetic,
    hence the mask).
    """
    product = value * constant
    return (product >> 32).bitwise_and_(_MASK32), product.bitwise_and_(_MASK32)


def torch_philox4x32(seed: int, counters: torch.Tensor, rounds: int = _ROUNDS) -> torch.Tensor:
    """The four words ``tl.randint4x(seed, counters, rounds)`` gives, as uint32 values in int64
    [*counters.shape, 4].

    Args:
        seed: integer key, 0 <= seed < 2**64 (values >= 2**63 must be passed as their int64 wrap).
        counters: int64 tensor of any shape; each element is one Philox4x32 evaluation.
        rounds: Philox rounds (Triton's default 10).
    """
    counters = counters.to(torch.int64)
    seed &= (1 << 64) - 1
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        # new c0 = hi(B * c2) ^ c1 ^ k0, new c2 = hi(A * c0) ^ c3 ^ k1, new c1 = lo(B * c2), new c3 = lo(A * c0)
        c0 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = hi_a.bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def torch_philox_uniform4(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four uniforms ``tl.rand4x(seed, counters)`` gives, as float32 [*counters.shape, 4] in [0, 1):
    ``[..., k]`` is output word k of Philox4x32-10, mapped to a float as ``tl.rand`` maps it."""
    return _to_uniform(torch_philox4x32(seed, counters))


def torch_dither4(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding's dithers: float32 [*counters.shape, 4] in [-0.5, 0.5), from the words of
    Philox4x32 with DITHER_ROUNDS rounds. A word w gives the float whose bits are
    ``(w >> 9) | 0x3F800000`` (in [1, 2), 23 random mantissa bits), minus 1.5: exact, no conversion."""
    words = torch_philox4x32(seed, counters, DITHER_ROUNDS)
    return ((words >> 9) | 0x3F800000).to(torch.int32).view(torch.float32) - 1.5


def torch_philox_uniform(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) for every int64 counter, equal to ``tl.rand(seed, counters)`` (the
    first word of ``torch_philox_uniform4``)."""
    return torch_philox_uniform4(seed, counters)[..., 0]


def _to_uniform(word: torch.Tensor) -> torch.Tensor:
    """uint32 words held in int64 -> float32 in [0, 1), as tl.rand maps them."""
    # Reinterpret the word as int32, fold negatives with bitwise not, scale into [0, 1).
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, ~signed, signed).to(torch.int32)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)
