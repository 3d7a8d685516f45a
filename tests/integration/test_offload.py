"""offload="cpu": validation, the CPU no-op, the fetch/prefetch bookkeeping, and (on a GPU) the real path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tritonquant as tq
from tritonquant.offload import OffloadedPacked, Offloader


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 8))


def grads_with(model: nn.Module, x: torch.Tensor, session: tq.Session, copy_cpu: bool = False) -> torch.Tensor:
    model.zero_grad()
    if copy_cpu:
        # Exercise the offload bookkeeping with CPU tensors: payloads are copied to fresh host tensors.
        session._offloader = Offloader(copy_cpu=True)
    with session:
        loss = model(x).square().sum()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("value", ["cuda", "CPU", True, 1, ""])  # ("gpu" as an id would read as the marker)
def test_offload_accepts_only_none_or_cpu(value):
    with pytest.raises(ValueError, match=r"offload must be one of None, 'cpu'"):
        tq.compress(offload=value)
    with pytest.raises(ValueError, match=r"offload must be one of None, 'cpu'"):
        tq.attach(nn.Linear(2, 2), offload=value)


def test_offload_is_a_no_op_for_cpu_tensors():
    model, x = make_model(), torch.randn(128, 64)
    plain = tq.compress(bits=4, min_bytes=0)
    offloaded = tq.compress(bits=4, min_bytes=0, offload="cpu")
    assert torch.equal(grads_with(model, x, plain), grads_with(model, x, offloaded))
    assert offloaded.stats.packed_tensors == plain.stats.packed_tensors > 0
    assert offloaded.stats.offloaded_bytes == 0  # payloads of CPU tensors already live in host memory


def test_offload_bookkeeping_moves_every_payload_and_prefetches_in_backward_order():
    model, x = make_model(), torch.randn(128, 64)
    plain = tq.compress(bits=4, min_bytes=0)
    offloaded = tq.compress(bits=4, min_bytes=0, offload="cpu")
    expected = grads_with(model, x, plain)
    assert torch.equal(grads_with(model, x, offloaded, copy_cpu=True), expected)
    assert offloaded.stats.offloaded_bytes == offloaded.stats.packed_bytes
    offloader = offloaded._offloader
    # Backward unpacks the last packed tensor first (on demand) and prefetches the earlier ones. The one
    # tensor saved twice (Tanh's output, also the last Linear's input) is fetched and decoded once: its two
    # savers unpack it one after the other, and the second gets the first one's decode.
    assert offloaded.stats.deduplicated == 1
    assert offloader.prefetches == offloaded.stats.packed_tensors - 1
    assert offloader.fetches_on_demand == 1


def test_prefetch_queues_depth_earlier_entries_once_and_keeps_no_copy_after_use():
    # Module docstring: each fetch queues the next `depth` earlier entries, skipping those already used;
    # a prefetched copy is dropped once fetched. A second pass (a retained graph) fetches on demand.
    offloader = Offloader(depth=1, copy_cpu=True)
    entries = [offloader.offload(tq.quantize(torch.randn(256), bits=4)) for _ in range(5)]
    offloader.fetch(entries[4])
    assert [e.prefetched is not None for e in entries] == [False, False, False, True, False]
    for entry in reversed(entries[:4]):
        offloader.fetch(entry)
    assert (offloader.prefetches, offloader.fetches_on_demand) == (4, 1)
    assert all(e.prefetched is None for e in entries)
    for entry in reversed(entries):  # the second pass
        offloader.fetch(entry)
    assert (offloader.prefetches, offloader.fetches_on_demand) == (4, 6)
    assert all(e.prefetched is None for e in entries)


def test_offloaded_copy_holds_its_own_channel_statistics():
    # Module docstring: offloading moves payload, metadata and channel statistics to new host tensors
    # (copy_cpu=True makes that copy for CPU tensors too): none may stay shared with the device copy.
    from tritonquant.codec import quantize_with
    from tritonquant.config import QuantConfig

    packed = quantize_with(torch.randn(4, 6, 5, 5), QuantConfig(bits=2, backend="torch"), standardize="channels")
    host = Offloader(copy_cpu=True).offload(packed).host
    for name in ("payload", "meta", "channels"):
        original, copy = getattr(packed, name), getattr(host, name)
        assert copy.data_ptr() != original.data_ptr() and torch.equal(copy, original), name


def test_offload_refuses_to_run_inside_a_cuda_graph_capture(monkeypatch):
    # Forward captured, or backward captured alone: either way a replay would skip the host bookkeeping.
    # (The CUDA side is faked: the refusal comes before any CUDA call.)
    from tritonquant.offload import OffloadedPacked, Offloader

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    offloader = Offloader()
    packed = tq.quantize(torch.randn(256), bits=4)
    monkeypatch.setattr(type(packed), "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        offloader.offload(packed)
    entry = OffloadedPacked(packed, torch.device("cuda", 0), None, 0, offloader)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        offloader.fetch(entry)


class ConvBatchNormSoftmax(nn.Module):
    """Saves a BatchNorm input and a softmax output: both packed standardized (at 2 and 8 bits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.bn(self.conv(x)).flatten(2), dim=-1)


def test_offload_moves_standardized_packings_with_their_channel_statistics():
    torch.manual_seed(0)
    model, x = ConvBatchNormSoftmax(), torch.randn(4, 3, 8, 8)
    expected = grads_with(model, x, tq.compress(bits=2, min_bytes=0))
    offloaded = tq.compress(bits=2, min_bytes=0, offload="cpu")
    offloaded._offloader = Offloader(copy_cpu=True)
    model.zero_grad()
    with offloaded:
        loss = model(x).square().sum()
    hosts = [h.packed.host for h in offloaded._dedup.values()]
    loss.backward()
    assert torch.equal(torch.cat([p.grad.flatten() for p in model.parameters()]), expected)
    assert sum(p.channels is not None for p in hosts) == 2  # the BatchNorm input and the probabilities
    assert offloaded.stats.offloaded_bytes == offloaded.stats.packed_bytes == sum(p.nbytes for p in hosts)


def test_offloaded_tensors_survive_retain_graph_and_saved_tensor_access():
    lin = nn.Linear(64, 64)
    x = torch.randn(32, 64)
    session = tq.compress(bits=8, min_bytes=0, offload="cpu")
    session._offloader = Offloader(copy_cpu=True)
    with session:
        out = torch.sigmoid(lin(x))
    handles = [h for h in session._dedup.values()]
    assert handles and all(isinstance(h.packed, OffloadedPacked) for h in handles)
    saved = out.grad_fn._saved_result
    assert (saved - out).abs().max() < 0.01
    out.sum().backward(retain_graph=True)
    first = lin.weight.grad.clone()
    assert torch.equal(out.grad_fn._saved_result, saved), "unpacking again gives the same tensor"
    out.sum().backward()  # unpacks again from the kept host copy
    assert torch.equal(lin.weight.grad, 2 * first)


def test_attach_with_offload():
    model, x = make_model(), torch.randn(128, 64)
    handle = tq.attach(model, bits=4, min_bytes=0, offload="cpu")
    model(x).sum().backward()
    assert handle.config.offload == "cpu" and handle.stats.packed_tensors > 0
    handle.detach()


# -- on a GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_offload_gives_identical_gradients_and_frees_device_memory():
    device = torch.device("cuda")
    model, x = make_model().to(device), torch.randn(4096, 64, device=device)
    plain = tq.compress(bits=4, min_bytes=0)
    expected = grads_with(model, x, plain)

    offloaded = tq.compress(bits=4, min_bytes=0, offload="cpu")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    with offloaded:
        loss = model(x).square().sum()
    torch.cuda.synchronize()
    # Payloads freed while their copy was in flight are returned to the allocator once their stream
    # events are processed; empty_cache processes them.
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device) - before
    handles = list(offloaded._dedup.values())
    assert handles and all(h.packed.host.payload.is_pinned() for h in handles)
    assert offloaded.stats.offloaded_bytes == offloaded.stats.packed_bytes
    # What stays on the device: the loss and tensors kept unpacked, not the packed payloads.
    assert held < offloaded.stats.packed_bytes / 4
    model.zero_grad()
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_offload_on_a_side_stream_matches_default_stream():
    device = torch.device("cuda")
    model, x = make_model().to(device), torch.randn(2048, 64, device=device)
    expected = grads_with(model, x, tq.compress(bits=8, min_bytes=0))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        got = grads_with(model, x, tq.compress(bits=8, min_bytes=0, offload="cpu"))
    torch.cuda.current_stream(device).wait_stream(stream)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_offload_moves_channel_statistics_to_the_host():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, x = ConvBatchNormSoftmax().to(device), torch.randn(4, 3, 8, 8, device=device)
    expected = grads_with(model, x, tq.compress(bits=2, min_bytes=0))
    offloaded = tq.compress(bits=2, min_bytes=0, offload="cpu")
    model.zero_grad()
    with offloaded:
        loss = model(x).square().sum()
    hosts = [h.packed.host for h in offloaded._dedup.values()]
    assert sum(p.channels is not None for p in hosts) == 2
    assert all(t.device.type == "cpu" for p in hosts for t in (p.payload, p.meta, p.channels) if t is not None)
    loss.backward()
    assert torch.equal(torch.cat([p.grad.flatten() for p in model.parameters()]), expected)
