"""compress() on CUDA: real memory released and returned, kernels launched on the tensor's device."""

import contextlib
import gc

import pytest
import torch

import tritonquant as tq
from tritonquant.models import ResNet50Like, SmallCNN, TinyTransformer, cnn_batch, cnn_loss, lm_batch, lm_loss

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


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_compressed_step_never_waits_for_the_gpu(bits, monkeypatch):
    # The hooks must only enqueue work. One synchronization per saved tensor would put the host's
    # issue time in series with the GPU's, a cost that grows with the number of saved tensors, not
    # with their size. torch's sync debug mode raises at any synchronizing call (copies to the host,
    # .item(), stream and device synchronizations), so the step fails at the first one.
    # (Tuning at first use times kernels, which synchronizes by design: off here.) min_bytes=0: small
    # saves take the packing paths too; at this size the loss's log-softmax output (2 x 10 values, packed
    # with a fixed shift) would otherwise be kept, and its packing once copied a scalar from the host.
    monkeypatch.setenv("TRITONQUANT_AUTOTUNE", "0")
    torch.manual_seed(0)
    model = ResNet50Like(classes=10).cuda()  # packed, reused, recast, kept and max-pool index saves
    batch = cnn_batch(2, size=64, classes=10, device="cuda")

    def step(compressed: bool) -> None:
        model.zero_grad(set_to_none=True)
        with tq.compress(bits=bits, min_bytes=0) if compressed else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cnn_loss(model, batch)
        loss.backward()

    step(True)  # kernels compiled and the allocator settled outside the checked steps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the check can fail: a synchronizing call does raise
            torch.ones(1, device="cuda").item()
        step(False)  # the model's own step does not synchronize...
        step(True)  # ...nor does compressing it
    finally:
        torch.cuda.set_sync_debug_mode("default")


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


def test_autocast_weight_casts_are_not_held_between_forward_and_backward():
    # CUDA autocast caches each weight's bf16 cast for the forward; with recast_weights the saved casts
    # are dropped when the block exits and made again in backward, bit for bit the same.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda()
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    cast_bytes = sum(p.numel() * 2 for p in model.parameters() if p.dim() == 2)
    # A warm-up step: cuBLAS allocates its workspaces (tens of MB, kept) at its first use on a stream,
    # which would count in the first measured step's held memory.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    held, grads = {}, {}
    for recast in (True, False):
        model.zero_grad(set_to_none=True)
        x.grad = None
        baseline = _allocated()
        with tq.compress(bits=4, recast_weights=recast), torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        held[recast] = _allocated() - baseline
        y.float().square().sum().backward()
        grads[recast] = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
        del y
    assert held[False] - held[True] >= cast_bytes, (held, cast_bytes)
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, ceil_mode", [
    ((8, 64, 112, 112), 3, 2, 1, 1, False),  # ResNet's stem pool
    ((4, 16, 33, 31), 3, 2, 1, 2, True),
    ((4, 16, 32, 32), 2, 2, 0, 1, False),
], ids=["resnet-stem", "dilated-ceil", "2x2"])
def test_cuda_max_pool_indices_restore_exactly_from_window_positions(shape, kernel, stride, padding, dilation,
                                                                     ceil_mode, channels_last, backend):
    # pool_indices relies on each index lying inside its window, or being 0: CUDA's channels-last kernel
    # keeps index 0 for a window of -inf only, outside most windows (ties and NaN included).
    from torch import nn

    from tritonquant.codec import decode_pool_indices, encode_pool_indices
    from tritonquant.pool_indices import pool_windows

    torch.manual_seed(0)
    x = torch.randint(0, 3, shape, device="cuda").float()  # many ties
    x[0, 0] = float("-inf")
    x[1, 1, ::5] = float("nan")
    if channels_last:  # (CUDA pools channels_last tensors with another kernel)
        x = x.to(memory_format=torch.channels_last)
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    _, indices = torch.nn.functional.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    windows = pool_windows(pool, x.shape)
    codes = encode_pool_indices(indices, windows, backend)
    restored = decode_pool_indices(codes, windows, indices.shape, indices.stride(), backend)
    assert torch.equal(restored, indices) and restored.stride() == indices.stride()


def test_a_model_compiled_whole_holds_its_activations_packed_after_forward():
    """With the packing traced into the compiled graphs (tritonquant/traced.py), a model compiled whole
    holds packed activations between forward and backward, as eager blocks do; with Python hooks it
    held them unpacked until its forward returned, so its forward's peak was at least exact's held
    memory. Its backward restores them one by one, so the step's peak stays well below exact's."""
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).cuda()
    x = torch.randn(8192, 1024, device="cuda")  # 32 MiB per activation
    compiled = torch.compile(model)
    model(x).sum().backward()  # gradients allocated once
    for _ in range(2):  # the compilations, exact and compressed
        compiled(x).sum().backward()
        with tq.compress(bits=4):
            loss = compiled(x).sum()
        loss.backward()
    baseline = _allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = compiled(x).sum()
    exact_held = _allocated() - baseline  # at least one 32 MiB activation per layer: 512 MiB or more
    loss.backward()
    del loss
    exact_step_peak = torch.cuda.max_memory_allocated() - baseline
    start = _allocated()
    torch.cuda.reset_peak_memory_stats()
    with tq.compress(bits=4) as session:
        loss = compiled(x).sum()
    packed_held = _allocated() - baseline
    forward_peak = torch.cuda.max_memory_allocated() - start
    assert session.stats.packed_tensors >= 16
    assert exact_held >= 16 * 32 * 2**20, exact_held
    assert packed_held < 0.35 * exact_held, (packed_held, exact_held)
    # Each activation is packed as soon as it is made: the forward holds a few at full width, plus the
    # packed ones (about 0.13x each at 4 bits), never all of them.
    assert forward_peak < 0.6 * exact_held, (forward_peak, exact_held)
    loss.backward()
    del loss
    # And each is restored where the backward first reads it (traced.RestoreAtFirstUse): the backward
    # holds a few 32 MiB tensors at full width beside the packed ones, about 0.45x of exact's peak by
    # count. Restored all at once at its start, as AOTAutograd places the unpack ops, they would take
    # it to about exact training's peak or above.
    step_peak = torch.cuda.max_memory_allocated() - start
    assert step_peak < 0.6 * exact_step_peak, (step_peak, exact_step_peak)


def test_a_transformer_compiled_whole_packs_attention_in_its_graph_and_trains(monkeypatch):
    """Inductor on CUDA, bf16 autocast: attention's q, k and v (views with gaps of one projection) and its
    output are packed by the traced op and restored dense, in the order of dimensions the fused
    attention's backward requires; the gradients stay those of exact training at 8 bits."""
    from tritonquant import traced

    torch.manual_seed(0)
    batch, seq, heads, dim = 8, 128, 4, 128
    model = TinyTransformer(vocab=256, dim=dim, heads=heads, layers=2, seq=seq, dropout=0.0).cuda()
    data = lm_batch(batch, seq=seq, vocab=256, device="cuda")
    compiled = torch.compile(model)

    def flat_grads(block) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with block, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(compiled, data)
        loss.backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters()])

    exact = flat_grads(contextlib.nullcontext())
    shapes = []
    quantize_checked = traced.quantize_checked
    monkeypatch.setattr(traced, "quantize_checked",
                        lambda x, config, **kw: shapes.append(tuple(x.shape)) or quantize_checked(x, config, **kw))
    got = flat_grads(tq.compress(bits=8, min_bytes=0))
    assert shapes.count((batch, heads, seq, dim // heads)) == 2 * 4, shapes  # q, k, v, output; 2 layers
    assert torch.nn.functional.cosine_similarity(got, exact, dim=0).item() > 0.999


def test_cuda_autocasts_cross_entropy_backward_reads_no_restored_float32_copy(monkeypatch):
    """Under CUDA autocast a bf16 model's cross-entropy saves a float32 copy of its log-probabilities for
    nll_loss, whose CUDA backward reads it for its shape alone: it is not restored (no widening of a
    decode), and the gradients are those of a full restore, bit for bit, with uninitialized memory
    NaN-filled."""
    from tritonquant import policy
    from tritonquant import session as session_module

    restores = []
    decode = session_module._decode
    monkeypatch.setattr(session_module, "_decode", lambda handle: restores.append(handle) or decode(handle))

    def grads() -> tuple[torch.Tensor, int]:
        restores.clear()
        torch.manual_seed(0)
        logits = torch.randn(512, 4096, device="cuda", requires_grad=True)
        targets = torch.randint(0, 4096, (512,), device="cuda")
        with tq.compress(bits=4) as session, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(logits.to(torch.bfloat16), targets)
        assert session.stats.packed_tensors == session.stats.deduplicated == 1  # (the copy: served)
        loss.backward()
        return logits.grad, len(restores)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # (fills uninitialized memory with NaN)
    try:
        unread, unread_restores = grads()
        monkeypatch.setattr(policy, "_METADATA_READER_GRAD_FNS", frozenset())
        restored, restored_restores = grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert (unread_restores, restored_restores) == (1, 2)  # (log_softmax's; and the copy's widening)
    assert torch.isfinite(unread).all()
    torch.testing.assert_close(unread, restored, rtol=0, atol=0)
