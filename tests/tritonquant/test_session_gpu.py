"""compress() on CUDA: real memory released and returned, kernels launched on the tensor's device."""

import gc

import pytest
import torch

import tritonquant as tq
from tritonquant.models import SmallCNN, cnn_batch, cnn_loss

pytestmark = pytest.mark.gpu


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_activation_memory_drops_and_returns_to_baseline():
    torch.manual_seed(0)
    model = SmallCNN(width=64, blocks=2).cuda()
    batch = cnn_batch(64, device="cuda")
    cnn_loss(model, batch).backward()  # allocate gradients once, so later steps start from the same state
    model.zero_grad(set_to_none=False)
    baseline = _allocated()

    loss = cnn_loss(model, batch)
    exact_held = _allocated() - baseline
    loss.backward()
    del loss
    assert _allocated() == baseline

    with tq.compress(bits=4) as session:
        loss = cnn_loss(model, batch)
    packed_held = _allocated() - baseline
    assert packed_held < 0.35 * exact_held, (packed_held, exact_held)
    assert session.stats.packed_bytes <= packed_held
    loss.backward()
    del loss
    assert _allocated() == baseline, "backward frees every packed tensor"

    with tq.compress(bits=4):
        loss = cnn_loss(model, batch)
    del loss  # the graph is dropped without backward
    assert _allocated() == baseline
    assert "peak CUDA memory" in session.report()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_launch_on_the_tensors_own_device():
    torch.manual_seed(0)
    model = SmallCNN(width=16, blocks=1).to("cuda:1")
    batch = cnn_batch(8, device="cuda:1")
    reference = tq.compress(bits=4, backend="torch")
    with torch.cuda.device(1), reference:
        loss = cnn_loss(model, batch)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.cuda.device(0), tq.compress(bits=4, backend="triton"):  # current device differs
        loss = cnn_loss(model, batch)
    with torch.cuda.device(0):
        loss.backward()
    for got, want in zip((p.grad for p in model.parameters()), expected):
        assert torch.equal(got, want)
