"""Test tensors shaped like real activations, with the hard cases planted in known groups."""

import torch

# The dequantize kernel's GELU and SiLU (computed with Triton's erf and exp) against torch's, by output
# dtype: (atol, rtol). The absolute part covers where GELU is tiny and both sides lose their digits to
# 1 + erf(x) or 1 + tanh(u); the relative part is one unit in the last place for the half dtypes, and a
# few dozen float32 ones.
ACTIVATION_TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-6, 2**-10), torch.bfloat16: (1e-6, 2**-7)}
# In the half dtypes, the share of values that must agree bit for bit where neither side loses digits to
# cancellation: inputs of -2 or more, outputs of magnitude 1e-3 or more. (Taking the activation of the
# decoded value before its rounding to the half dtype, as torch never does, leaves 75-80%.)
HALF_EXACT_SHARE = 0.99


def assert_activation_matches_torch(activated: torch.Tensor, decoded: torch.Tensor, activation: str) -> None:
    """``activated``, the dequantize kernel's ``activation`` of ``decoded``, against torch's activation of
    it: within ACTIVATION_TOLERANCES, and in the half dtypes bit for bit where well conditioned."""
    from tritonquant.kernels import torch_activation

    reference = torch_activation(decoded, activation)
    atol, rtol = ACTIVATION_TOLERANCES[decoded.dtype]
    torch.testing.assert_close(activated, reference, atol=atol, rtol=rtol, equal_nan=True)
    if decoded.dtype != torch.float32:
        well_conditioned = (decoded.float() >= -2) & (reference.float().abs() >= 1e-3)
        same = (activated == reference)[well_conditioned].float().mean().item()
        assert same >= HALF_EXACT_SHARE, f"{same:.3f} of the well-conditioned values agree bit for bit"


def activation_like(n: int, dtype: torch.dtype = torch.float32, group_size: int = 64, seed: int = 0,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """A flat tensor of n elements: mostly N(0.3, 2) values, with group-aligned stretches that are
    ReLU outputs (zeros and positives), all negative, constant, all zero, tiny, and huge.

    Values are drawn in float32 and rounded to ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2 + 0.3
    planted = [
        lambda v: v.clamp(min=0),  # post-ReLU: exact zeros and positives
        lambda v: -v.abs() - 0.5,  # strictly negative
        lambda v: torch.full_like(v, 1.75),  # constant
        lambda v: torch.zeros_like(v),  # all zero
        lambda v: v * 1e-6,  # tiny, mixed signs
        lambda v: v * 1e3,  # large (still finite in fp16)
        lambda v: v.abs() + 3.0,  # strictly positive, far from zero
        lambda v: -v.clamp(min=0),  # -ReLU: zeros and negatives
    ]
    n_groups = -(-n // group_size)
    for k in range(1, n_groups, 2):  # every other group gets a planted pattern
        start, stop = k * group_size, min((k + 1) * group_size, n)
        x[start:stop] = planted[(k // 2) % len(planted)](x[start:stop])
    return x.to(dtype).to(device)


def confident_logits(rows: int = 48, classes: int = 50) -> torch.Tensor:
    """[rows, classes] float32 logits whose class 0 wins every row by 12 to 30 nats: log_softmax of them
    is exactly 0 (p rounds to 1) in some rows and just below 0 in others, as for a classifier that fits
    its data."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, classes, generator=g) * 3
    logits[:, 0] += torch.linspace(12, 30, rows)
    return logits
