"""Layers beyond the ones the rest of the suite is built from: recurrent, 1-d and 3-d convolutions,
transposed convolutions, group and instance norms, attention modules, pooling with indices and
unpooling, parametrized weights, gathers, sorts, samplers. Each trains one step under compress():
the forward stays bit for bit exact training's, something is packed, and at 8 bits every parameter's
gradient points where exact training's does.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonquant as tq


class Calls(nn.Module):
    """``forward(x) = fn(x, *modules)``: a layer used in a way nn.Sequential cannot express."""

    def __init__(self, fn, *modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.layers)


def _first_output(layer: nn.Module) -> Calls:
    return Calls(lambda x, m: m(x)[0], layer)


def _gather_reversed(x, linear):
    y = torch.cumsum(linear(x), dim=1)
    order = torch.arange(x.shape[1] - 1, -1, -1).view(1, -1, 1).expand(x.shape[0], -1, y.shape[2])
    return y.gather(1, order).index_select(2, torch.arange(0, y.shape[2], 2))


# name -> (model builder, input builder)
LAYERS = {
    "lstm-2-layers": (lambda: _first_output(nn.LSTM(16, 32, num_layers=2, batch_first=True)),
                      lambda: torch.randn(4, 10, 16)),
    "gru-bidirectional": (lambda: _first_output(nn.GRU(16, 32, bidirectional=True, batch_first=True)),
                          lambda: torch.randn(4, 10, 16)),
    "conv1d-leaky-relu-avgpool": (lambda: nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.LeakyReLU(inplace=True),
                                                        nn.AvgPool1d(2), nn.Conv1d(16, 8, 3)),
                                  lambda: torch.randn(4, 8, 64)),
    "conv3d-batchnorm3d-maxpool3d": (lambda: nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.BatchNorm3d(8),
                                                           nn.ReLU(inplace=True), nn.MaxPool3d(2), nn.Conv3d(8, 4, 1)),
                                     lambda: torch.randn(2, 4, 8, 8, 8)),
    "conv-transpose-groupnorm-silu": (lambda: nn.Sequential(nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1),
                                                            nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 8, 3)),
                                      lambda: torch.randn(2, 8, 16, 16)),
    "instancenorm-prelu": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True),
                                                 nn.PReLU(16), nn.Conv2d(16, 4, 3)),
                           lambda: torch.randn(2, 3, 32, 32)),
    "pixelshuffle-upsample-hardswish": (lambda: nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.PixelShuffle(2),
                                                              nn.Upsample(scale_factor=2, mode="bilinear"),
                                                              nn.Conv2d(4, 4, 3), nn.Hardswish()),
                                        lambda: torch.randn(2, 4, 16, 16)),
    "multihead-attention": (lambda: Calls(lambda x, m, out: out(m(x, x, x)[0]),
                                          nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 32)),
                            lambda: torch.randn(4, 40, 32)),
    "transformer-encoder-layer": (lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True),
                                  lambda: torch.randn(4, 40, 32)),
    "transformer-encoder-layer-norm-first-gelu": (
        lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu"),
        lambda: torch.randn(4, 40, 32)),
    "mish-softplus-elu-sigmoid": (lambda: nn.Sequential(nn.Linear(32, 256), nn.Mish(), nn.Linear(256, 256),
                                                        nn.Softplus(), nn.Linear(256, 256), nn.ELU(),
                                                        nn.Linear(256, 32), nn.Sigmoid()),
                                  lambda: torch.randn(64, 32)),
    "adaptive-max-and-avg-pools": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(5),
                                                         nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                         nn.Linear(16, 4)),
                                   lambda: torch.randn(4, 3, 33, 33)),
    "maxpool-dilated-ceil-mode": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3),
                                                        nn.MaxPool2d(3, stride=2, dilation=2, ceil_mode=True,
                                                                     padding=1),
                                                        nn.Conv2d(16, 8, 1)),
                                  lambda: torch.randn(4, 3, 33, 33)),
    "maxpool-indices-unpool": (lambda: Calls(lambda x, conv, pool, unpool: unpool(*pool(conv(x))),
                                             nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2, return_indices=True),
                                             nn.MaxUnpool2d(2)),
                               lambda: torch.randn(2, 3, 16, 16)),
    "einsum-softmax-matmul": (lambda: Calls(lambda x, q, k: torch.einsum("bij,bkj->bik", q(x), k(x)).softmax(-1) @ x,
                                            nn.Linear(32, 32), nn.Linear(32, 32)),
                              lambda: torch.randn(4, 64, 32)),
    "cumsum-gather-index-select": (lambda: Calls(_gather_reversed, nn.Linear(16, 32)), lambda: torch.randn(4, 50, 16)),
    "topk-sort": (lambda: Calls(lambda x, m: m(x).topk(8, dim=-1).values.sort(-1).values.relu(), nn.Linear(16, 128)),
                  lambda: torch.randn(64, 16)),
    "embedding-bag": (lambda: Calls(lambda x, bag, out: out(bag(x)), nn.EmbeddingBag(1000, 64, mode="mean"),
                                    nn.Linear(64, 8)),
                      lambda: torch.randint(0, 1000, (32, 6))),
    "weight-norm-spectral-norm": (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(32, 256)),
                                                        nn.Tanh(),
                                                        nn.utils.parametrizations.spectral_norm(nn.Linear(256, 32))),
                                  lambda: torch.randn(64, 32)),
    "unfold-fold": (lambda: Calls(lambda x, conv: F.fold(F.unfold(conv(x), 3, padding=1).relu(), (16, 16), 3,
                                                         padding=1),
                                  nn.Conv2d(3, 8, 3, padding=1)),
                    lambda: torch.randn(2, 3, 16, 16)),
    "grid-sample": (lambda: Calls(lambda x, conv: F.grid_sample(conv(x), torch.linspace(-0.9, 0.9, 2 * 8 * 8 * 2)
                                                                .view(2, 8, 8, 2), align_corners=False),
                                  nn.Conv2d(3, 8, 3, padding=1)),
                    lambda: torch.randn(2, 3, 16, 16)),
    "softmax-and-log-softmax": (lambda: Calls(lambda x, m: m(x).log_softmax(-1) + m(x).softmax(-1), nn.Linear(32, 512)),
                                lambda: torch.randn(64, 32)),
    "float64-inside": (lambda: Calls(lambda x, m: m(x).double().tanh().float(), nn.Linear(32, 512)),
                       lambda: torch.randn(64, 32)),
}

# A parameter whose exact gradient is this small next to the largest one is one the loss does not
# depend on (a key bias under softmax, a bias before a norm): its gradient is rounding noise, and so
# is its direction.
NEGLIGIBLE = 1e-3


def _step(model: nn.Module, x: torch.Tensor, compressing: bool, autocast: bool):
    """(loss, gradients of the parameters, then of x when it is a float input, the block's stats)."""
    model.zero_grad()
    x = x.clone().requires_grad_(x.is_floating_point())
    session = tq.compress(bits=8, min_bytes=0) if compressing else contextlib.nullcontext()
    torch.manual_seed(1)  # (the same dropout masks in both steps)
    with contextlib.ExitStack() as stack:
        if autocast:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        stack.enter_context(session)
        loss = model(x).float().square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    if x.is_floating_point():
        grads.append(x.grad)
    return loss.detach(), grads, session.stats if compressing else None


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_trains_under_compress_with_its_forward_exact(layer, autocast):
    make_model, make_input = LAYERS[layer]
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    twin = copy.deepcopy(model)  # (a forward may change buffers: spectral norm's power iteration)
    exact_loss, exact_grads, _ = _step(model, x, compressing=False, autocast=autocast)
    loss, grads, stats = _step(twin, x, compressing=True, autocast=autocast)

    assert torch.equal(loss, exact_loss)  # the forward is exact training's
    assert stats.packed_tensors > 0
    assert len(grads) == len(exact_grads)
    largest = max(g.norm() for g in exact_grads)
    for i, (got, want) in enumerate(zip(grads, exact_grads)):
        assert got.isfinite().all(), i
        if want.norm() > NEGLIGIBLE * largest:
            cosine = F.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0).item()
            assert cosine > 0.999, (i, cosine)
