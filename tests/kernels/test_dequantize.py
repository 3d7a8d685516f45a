"""The dequantize kernel's activation epilogue: GELU or SiLU of the decoded values, written in the same pass.

The decoded tensor must not change by a bit when an activation is asked for. The activation itself is
torch's (``torch_activation``) computed with Triton's erf and exp, so it is held to a tolerance; in the
half dtypes, values away from GELU's cancellation must still agree bit for bit, which they would not
if the kernel applied the activation to the decoded value before rounding it, as torch never does.
"""

import pytest
import torch

from tests.activations import activation_like, assert_activation_matches_torch
from tritonquant.kernels import ACTIVATIONS, torch_activation, torch_dequantize, triton_dequantize, triton_quantize

# Under the interpreter, exp(-x) of a large negative x overflows to inf in numpy, which warns; the result,
# x / inf = -0.0, is torch's.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GROUP = 64


def _decode(payload, meta, n, dtype, bits, activation=None, dequantize=triton_dequantize, channels=None,
            channel_stride=1):
    """(decoded, activated or None), written into NaN-filled tensors: any element left unwritten shows."""
    out = torch.full((n,), float("nan"), dtype=dtype, device=meta.device)
    activated = torch.full_like(out, float("nan")) if activation is not None else None
    dequantize(payload, meta, out, bits, GROUP, channels, channel_stride, activation=activation,
               activated=activated)
    return out, activated


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("n", [63, 1000, 4096], ids=lambda n: f"n{n}")
def test_the_activation_is_written_beside_an_unchanged_decode(n, bits, dtype, activation, device):
    x = activation_like(n, dtype, GROUP, seed=n + bits, device=device)
    payload, meta = triton_quantize(x, bits, GROUP, False, False, 0, 0)
    plain, _ = _decode(payload, meta, n, dtype, bits)
    decoded, activated = _decode(payload, meta, n, dtype, bits, activation)
    bits_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(decoded.view(bits_view), plain.view(bits_view)), "the decode did not change"
    assert_activation_matches_torch(activated, decoded, activation)
    # The reference writes the same decode, and torch's activation of it.
    reference_decoded, reference_activated = _decode(payload, meta, n, dtype, bits, activation, torch_dequantize)
    assert torch.equal(reference_decoded.view(bits_view), plain.view(bits_view))
    assert torch.equal(reference_activated, torch_activation(plain, activation))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_groups_that_decode_to_nan_activate_to_nan(activation, device):
    x = torch.randn(4 * GROUP, device=device)
    x[5], x[GROUP + 7], x[2 * GROUP + 9] = float("nan"), float("inf"), float("-inf")
    payload, meta = triton_quantize(x, 4, GROUP, False, False, 0, 0)
    decoded, activated = _decode(payload, meta, x.numel(), torch.float32, 4, activation)
    assert torch.isnan(activated[:3 * GROUP]).all() and torch.isfinite(activated[3 * GROUP:]).all()
    assert_activation_matches_torch(activated, decoded, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_a_standardized_packing_activates_its_decoded_values(activation, device):
    n, channel_stride, n_channels = 1000, 25, 6
    x = activation_like(n, torch.bfloat16, GROUP, seed=3, device=device)
    g = torch.Generator().manual_seed(3)
    channels = torch.stack([torch.randn(n_channels, generator=g), torch.rand(n_channels, generator=g) + 0.1], 1)
    channels = channels.to(device)
    payload, meta = triton_quantize(x, 2, GROUP, False, False, 0, 0, channels, channel_stride)
    plain, _ = _decode(payload, meta, n, torch.bfloat16, 2, channels=channels, channel_stride=channel_stride)
    decoded, activated = _decode(payload, meta, n, torch.bfloat16, 2, activation, channels=channels,
                                 channel_stride=channel_stride)
    assert torch.equal(decoded.view(torch.int16), plain.view(torch.int16))
    assert_activation_matches_torch(activated, decoded, activation)


@pytest.mark.parametrize("dequantize", [triton_dequantize, torch_dequantize], ids=["triton", "torch"])
def test_activation_arguments_are_checked(dequantize, device):
    payload, meta = triton_quantize(torch.randn(GROUP, device=device), 4, GROUP, False, False, 0, 0)
    out = torch.empty(GROUP, device=device)
    with pytest.raises(ValueError, match="activation must be one of .*'gelu'.*got 'relu'"):
        dequantize(payload, meta, out, 4, GROUP, activation="relu", activated=torch.empty_like(out))
    for activated in (None, torch.empty(GROUP, dtype=torch.bfloat16, device=device),
                      torch.empty(2 * GROUP, device=device)[::2]):
        with pytest.raises(ValueError, match="activated must be a tensor of out's dtype, shape, strides"):
            dequantize(payload, meta, out, 4, GROUP, activation="gelu", activated=activated)
