"""torch.autocast (bf16, fp16) with GradScaler inside compress().

The scaler skips a step when a gradient is inf/NaN. An activation that overflowed in the forward pass
reaches the gradients only through the saved tensors, so packing must keep it non-finite; and large but
finite activations must not come back as inf (which would make the scaler skip for nothing).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonquant as tq
from tritonquant.models import SmallCNN, cnn_batch, cnn_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))


def scaled_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, ctx) -> tuple[bool, torch.Tensor]:
    """One autocast step with a GradScaler; returns (whether the optimizer stepped, the loss)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with ctx, torch.autocast("cpu", dtype=dtype):
        out = model(x)
        # Row 0 of the batch is left out of the loss, so its activations reach the gradients only
        # through the tensors autograd saved (0 * inf = NaN in the weight gradients).
        loss = out[1:].float().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    stepped = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return stepped, loss.detach()


def with_large_row(dtype: torch.dtype, fraction: float) -> tuple[nn.Module, torch.Tensor]:
    """A model and input whose first-layer output h[0, 0] is ``fraction`` of ``dtype``'s largest value.

    Unit 0 of the first layer sums its 64 inputs with weight 1, and row 0 of x holds max * fraction / 64
    (representable in ``dtype`` itself, so the overflow, if any, happens in the layer's output).
    """
    model = two_layers()
    with torch.no_grad():
        model[0].weight[0] = 1.0
        model[0].bias[0] = 0.0
    x = torch.randn(64, 64)
    x[0] = fraction * torch.finfo(dtype).max / 64
    return model, x


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("compressed", [False, True], ids=["exact", "compressed"])
def test_overflowed_activation_makes_the_scaler_skip(dtype, compressed):
    model, x = with_large_row(dtype, 4.0)  # h[0, 0] overflows to inf in `dtype`
    ctx = tq.compress(bits=4, min_bytes=0) if compressed else contextlib.nullcontext()
    stepped, loss = scaled_step(model, x, dtype, ctx)
    assert torch.isfinite(loss), "the loss itself is finite: only saved activations carry the overflow"
    assert not stepped
    if compressed:
        assert ctx.stats.packed_tensors >= 2


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_large_finite_activations_do_not_make_the_scaler_skip(dtype):
    model, x = with_large_row(dtype, 0.4)  # finite; its 4-bit reconstruction must stay finite too
    session = tq.compress(bits=4, min_bytes=0)
    stepped, loss = scaled_step(model, x, dtype, session)
    assert torch.isfinite(loss)
    assert stepped
    assert session.stats.packed_tensors >= 2


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_autocast_training_with_scaler_tracks_exact(dtype):
    def train(ctx_for) -> tuple[torch.Tensor, list[float]]:
        torch.manual_seed(0)
        model = SmallCNN(width=8, blocks=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        losses = []
        for step in range(4):
            batch = cnn_batch(16, size=16, seed=step)
            opt.zero_grad()
            with ctx_for(), torch.autocast("cpu", dtype=dtype):
                loss = cnn_loss(model, batch)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        return torch.cat([p.detach().flatten() for p in model.parameters()]), losses

    exact, exact_losses = train(contextlib.nullcontext)
    packed, packed_losses = train(lambda: tq.compress(bits=8, min_bytes=0))
    initial = torch.cat([p.detach().flatten() for p in (torch.manual_seed(0), SmallCNN(width=8, blocks=1))[1].parameters()])
    # Compare the parameter updates (not the parameters, which are dominated by their initial values).
    cos = F.cosine_similarity(exact - initial, packed - initial, dim=0).item()
    assert cos > 0.99
    assert abs(packed_losses[-1] - exact_losses[-1]) < 0.05 * exact_losses[-1]
