"""A training step captured whole in a CUDA graph (torch.cuda.graph) with compress() inside it.

The pack and unpack hooks run once, at capture; each replay runs only the kernels they launched: the
quantize kernels write the new batch's codes into the same packed buffers, and the captured backward
decodes them. So a replay must compute what an eager compressed step computes on the same data, and
not what exact training computes (compression active), nor what the captured batch gave (stale codes).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import tritonquant as tq
from tritonquant.models import SmallCNN, TinyTransformer, cnn_batch, cnn_loss, lm_batch, lm_loss

pytestmark = pytest.mark.gpu


def _cnn():
    return SmallCNN(width=32, blocks=2), lambda seed: cnn_batch(16, size=32, seed=seed, device="cuda"), cnn_loss


def _transformer():
    # No dropout: eager steps and replays draw their masks at different points of torch's random stream.
    return (TinyTransformer(dim=128, layers=2, seq=64, dropout=0.0),
            lambda seed: lm_batch(8, seq=64, seed=seed, device="cuda"), lm_loss)


MODELS = {"cnn": _cnn, "transformer": _transformer}


def _flat(grads: list) -> torch.Tensor:
    return torch.cat([g.flatten().float() for g in grads if g is not None])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_replayed_step_computes_what_an_eager_compressed_step_computes(name, autocast, monkeypatch):
    monkeypatch.setenv("TRITONQUANT_AUTOTUNE", "0")  # tuning synchronizes: not inside a capture
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    model, make_batch, loss_fn = MODELS[name]()
    model = model.cuda()
    params = list(model.parameters())
    static = make_batch(0)

    def step(batch, compressed: bool) -> None:
        with tq.compress(bits=2) if compressed else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model, batch)
        loss.backward()

    # Warm-up on a side stream (torch's recipe): kernels compiled and loaded before the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step(static, compressed=True)
    torch.cuda.current_stream().wait_stream(side)

    model.zero_grad(set_to_none=True)  # the captured backward allocates the gradients: replays write them
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static, compressed=True)
    graph_grads = [p.grad for p in params]

    for seed in (1, 2):
        batch = make_batch(seed)
        for slot, value in zip(static, batch):
            slot.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        replayed = _flat(graph_grads)
        eager = {}
        for compressed in (True, False):
            for p in params:
                p.grad = None
            step(batch, compressed)
            eager[compressed] = _flat([p.grad for p in params])
        for p, g in zip(params, graph_grads):
            p.grad = g
        compression_error = (eager[True] - eager[False]).norm()
        assert compression_error > 1e-3 * eager[False].norm(), "2 bits must move the gradients measurably"
        # Within a small fraction of what compression moves: not exact training's gradients (compression
        # off), not the captured batch's (stale codes), not the old parameters' (stale weight casts).
        assert (replayed - eager[True]).norm() <= 0.05 * compression_error, (
            f"{name}: a replay differs from the eager compressed step by {(replayed - eager[True]).norm():.3g}; "
            f"compression itself moves the gradients by {compression_error:.3g}")
        # An in-place parameter update between replays, as an optimizer step makes outside the graph: the
        # weight casts that backward makes again under autocast must read the new values.
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=1e-2)


def test_stochastic_rounding_inside_a_capture_warns(monkeypatch):
    monkeypatch.setenv("TRITONQUANT_AUTOTUNE", "0")
    x = torch.randn(64, 256, device="cuda")
    # Every kernel the captures run is compiled first: loading a new one inside a capture is an error.
    tq.quantize(x, bits=4, stochastic=True)
    tq.quantize(x, bits=4)
    tq.quantize(x, bits=4, stochastic=True, seed=7)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(RuntimeWarning, match="every replay rounds with the same random numbers"):
        with torch.cuda.graph(graph):
            tq.quantize(x, bits=4, stochastic=True)
    with torch.cuda.graph(torch.cuda.CUDAGraph()):  # nearest rounding and seeded streams: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tq.quantize(x, bits=4)
            tq.quantize(x, bits=4, stochastic=True, seed=7)


def test_offload_refuses_to_be_captured(monkeypatch):
    monkeypatch.setenv("TRITONQUANT_AUTOTUNE", "0")
    torch.manual_seed(0)
    model = SmallCNN(width=32, blocks=1).cuda()
    batch = cnn_batch(16, size=32, device="cuda")
    with tq.compress(bits=4, offload="cpu"):
        loss = cnn_loss(model, batch)
    loss.backward()
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="offload='cpu' cannot run inside a CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            with tq.compress(bits=4, offload="cpu"):
                cnn_loss(model, batch)
