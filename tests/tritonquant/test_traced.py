"""Packing traced into compiled regions (tritonquant/traced.py).

The checks: inside a compress block, a region compiled with torch.compile packs its saved tensors with
the ``tritonquant::pack_saved`` op in its own graph, and no Python hook runs per tensor; the gradients
are eager compression's; each full-width tensor is freed before the region packs the next ones; the
ops' fake implementations agree with the real ones; blocks with the same settings share one pair of
hooks (no recompilation), and settings that need Python at run time keep the Python hooks.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import tritonquant as tq
from tritonquant import codec, traced
from tritonquant.codec import quantize_checked
from tritonquant.config import QuantConfig
from tritonquant.models import TinyTransformer, lm_batch, lm_loss
from tritonquant.session import Session


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def deep_mlp(layers: int = 6, width: int = 128) -> nn.Sequential:
    torch.manual_seed(0)
    modules = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*modules, nn.Linear(width, 4))


def grads(model: nn.Module, run, ctx) -> torch.Tensor:
    model.zero_grad()
    with ctx:
        loss = run()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


class PackSpy:
    """Records, for each run of the pack op, the tensor it packs; and every Python pack hook call."""

    def __init__(self, monkeypatch) -> None:
        self.packed: list[weakref.ref] = []
        self.kinds: list[tuple] = []  # (shape, dtype) of each
        self.widths: list[tuple] = []  # (shape, bits) of each
        self.alive_at_pack: list[int] = []  # earlier packed tensors still alive when each one is packed
        self.python_packs = 0
        self.hooked: list[weakref.ref] = []  # the tensors given to the Python pack hook
        self.alive_at_hook: list[int] = []  # earlier ones still alive at each call
        quantize_checked = traced.quantize_checked

        def spy_quantize(x, config, **kwargs):
            self.alive_at_pack.append(sum(ref() is not None for ref in self.packed))
            self.packed.append(weakref.ref(x))
            self.kinds.append((tuple(x.shape), x.dtype))
            self.widths.append((tuple(x.shape), config.bits))
            return quantize_checked(x, config, **kwargs)

        session_pack = Session._pack

        def spy_pack(session, t):
            self.python_packs += 1
            self.alive_at_hook.append(sum(ref() is not None for ref in self.hooked))
            self.hooked.append(weakref.ref(t))
            return session_pack(session, t)

        monkeypatch.setattr(traced, "quantize_checked", spy_quantize)
        monkeypatch.setattr(Session, "_pack", spy_pack)

    def clear(self) -> None:
        self.packed.clear()
        self.kinds.clear()
        self.widths.clear()
        self.alive_at_pack.clear()
        self.python_packs = 0
        self.hooked.clear()
        self.alive_at_hook.clear()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_region_packs_in_its_graph_and_frees_each_tensor_early(backend, monkeypatch):
    model, x = deep_mlp(), torch.randn(64, 128)
    compiled = torch.compile(model, backend=backend)
    spy = PackSpy(monkeypatch)
    run = lambda: compiled(x).sum()  # noqa: E731 (sum saves nothing: every save is the region's)
    grads(model, run, tq.compress(bits=4, min_bytes=0))  # compiles
    spy.clear()
    session = tq.compress(bits=4, min_bytes=0)
    grads(model, run, session)

    # The region saves the input and, per layer, the Linear's output: 7 tensors, each packed by the op
    # in the compiled graph, none through a Python hook. The GELU's output, which the next Linear reads
    # for its weight's gradient, is computed again in backward from the GELU's packed input, as eager
    # blocks do (recompute_activations).
    assert len(spy.packed) == session.stats.packed_tensors == 7
    assert spy.python_packs == 0
    # A tensor's full-width memory is freed once the layers that read it in forward are done: when
    # each one is packed, at most two earlier ones are alive (the input, which the test holds, and
    # the last layer's output), not the six before it.
    assert max(spy.alive_at_pack) <= 2, spy.alive_at_pack
    assert sum(ref() is not None for ref in spy.packed) == 1  # the input


def test_a_compiled_backward_restores_each_tensor_at_its_first_use(monkeypatch):
    """AOTAutograd puts the unpack ops at the top of the backward graph; restored there, every packed
    tensor of the region would be alive at full width at once (``traced.RestoreAtFirstUse``)."""
    model, x = deep_mlp(), torch.randn(64, 128)
    compiled = torch.compile(model)
    restored: list[weakref.ref] = []
    alive_at_restore: list[int] = []  # earlier restored tensors still alive when each one is restored
    dequantize = traced.dequantize

    def spy_dequantize(packed, **kwargs):
        alive_at_restore.append(sum(ref() is not None for ref in restored))
        out = dequantize(packed, **kwargs)
        restored.append(weakref.ref(out))
        return out

    monkeypatch.setattr(traced, "dequantize", spy_dequantize)
    # The backward is compiled when it first runs, after the block closed, as in most training loops.
    session = tq.compress(bits=4, min_bytes=0)
    grads(model, lambda: compiled(x).sum(), session)
    assert len(restored) == session.stats.packed_tensors == 7
    # Each layer's backward reads one restored tensor (the Linear's output, from which it computes the
    # GELU's output again for the next layer's weight gradient, and the GELU's gradient): when one
    # is restored, the one before it is dead. At the top of the graph, the last would see six.
    assert max(alive_at_restore) <= 1, alive_at_restore


def test_the_restore_pass_chains_the_one_it_finds_and_is_installed_once():
    seen = []

    class Theirs(CustomGraphPass):
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return "theirs"

    # (config.patch, not monkeypatch: monkeypatch's undo deletes a config module's entry, hiding it.)
    with torch._inductor.config.patch(post_grad_custom_post_pass=Theirs()):
        with tq.compress(bits=4):
            installed = torch._inductor.config.post_grad_custom_post_pass
        with tq.compress(bits=4):
            assert torch._inductor.config.post_grad_custom_post_pass is installed  # (not wrapped again)
    assert isinstance(installed, traced.RestoreAtFirstUse) and isinstance(installed.then, Theirs)
    assert installed.uuid() == (traced.RestoreAtFirstUse.VERSION, "theirs")
    assert traced.RestoreAtFirstUse(lambda graph: None).uuid() is None  # (Inductor caches nothing then)
    assert traced.RestoreAtFirstUse().uuid() == (traced.RestoreAtFirstUse.VERSION,)
    graph = fx.Graph()
    graph.output(graph.placeholder("x"))
    installed(graph)
    assert seen == [graph]


def test_python_hooks_pack_a_region_only_once_its_forward_returns(monkeypatch):
    """What the traced hooks improve on: blocks that keep Python hooks (here, per-module overrides)
    pack a compiled region's tensors after its forward, all of them alive at once."""
    model, x = deep_mlp(), torch.randn(64, 128)
    compiled = torch.compile(model, backend="aot_eager")
    spy = PackSpy(monkeypatch)
    session = tq.compress(bits=4, min_bytes=0, overrides={"nothing.matches": {"bits": 8}})
    with pytest.warns(UserWarning, match="matches no module"):
        grads(model, lambda: compiled(x).sum(), session)
    assert spy.python_packs == session.stats.packed_tensors + session.stats.passed_tensors >= 13
    assert len(spy.packed) == 0  # (no traced packing)
    # The region's 13 activations reach the hook when its forward returns: all alive at the last call.
    assert spy.alive_at_hook[-1] >= 12, spy.alive_at_hook


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "no-recompute"])
@pytest.mark.parametrize("bits", [2, 8], ids=["2bit", "8bit"])
def test_gradients_are_eager_compressions(bits, recompute):
    model, x = deep_mlp(layers=3, width=64), torch.randn(32, 64)
    run_eager = lambda: model(x).square().sum()  # noqa: E731
    compiled = torch.compile(model, backend="aot_eager")
    exact = grads(model, run_eager, contextlib.nullcontext())
    # The region saves what eager layers save: with recompute_activations (the default) the GELUs'
    # inputs, their outputs computed again in backward; without, both.
    settings = dict(bits=bits, min_bytes=0, recompute_activations=recompute)
    eager = grads(model, run_eager, tq.compress(**settings))
    session = tq.compress(**settings)
    got = grads(model, lambda: compiled(x).square().sum(), session)
    assert session.stats.packed_tensors == 1 + (4 if recompute else 7)  # (1: square's input, outside)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    cosine = F.cosine_similarity(got, exact, dim=0).item()
    assert cosine < 0.99 if bits == 2 else cosine > 0.9999  # measured 0.83 and 0.999998


def test_blocks_with_the_same_settings_share_hooks_and_do_not_recompile():
    """One compilation however many blocks run the model: Dynamo guards on the saved-tensor hooks and
    on the global module hooks, and both stay the same objects under the same keys. (Blocks used to
    register new module hooks each: every block compiled again, and after Dynamo's recompile_limit of 8
    the model ran eagerly.)"""
    model, x = deep_mlp(layers=2, width=32), torch.randn(16, 32)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_backend)
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        session = tq.compress(bits=4, min_bytes=0)
        grads(model, lambda: compiled(x).sum(), session)
        assert session.stats.packed_tensors == 5
    assert len(compiles) == 1
    assert traced.hooks_for(tq.compress(bits=4, min_bytes=0).config) is traced.hooks_for(
        tq.compress(bits=4, min_bytes=0).config)
    grads(model, lambda: compiled(x).sum(), tq.compress(bits=2, min_bytes=0))  # another width: another graph
    assert len(compiles) == 2


@pytest.mark.parametrize("settings", [
    dict(overrides={"0": {"bits": 8}}), dict(bits="auto", budget=4), dict(offload="cpu"), dict(stochastic=True, seed=3),
], ids=["overrides", "auto", "offload", "seeded-stochastic"])
def test_settings_that_need_python_at_run_time_keep_python_hooks(settings):
    session = tq.compress(min_bytes=0, **settings)
    assert not traced.traceable(session.config)
    with session:
        pack, _ = torch._C._autograd._top_saved_tensors_default_hooks(True)
    assert pack == session._pack


def aot_settings() -> tuple:
    config = torch._functorch.config
    return config.saved_tensors_hooks_filtering_mode, config.ban_recompute_materialized_backward


def test_default_blocks_push_the_traced_hooks_and_set_aot_autograd_while_open():
    before = aot_settings()
    assert before == ("donated", True)  # (torch's defaults)
    with tq.compress(bits=4) as outer:
        pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(True)
        assert (pack, unpack) == traced.hooks_for(outer.config)
        assert aot_settings() == ("no_static", False)
        with tq.compress(bits=4, overrides={"x": {"bits": 8}}) as inner:  # (Python hooks: changes nothing)
            assert traced._innermost_session() is inner
            assert aot_settings() == ("no_static", False)
        assert traced._innermost_session() is outer
        with tq.compress(bits=4, recompute_activations=False) as no_recompute:
            assert aot_settings() == ("no_static", True)
            assert traced.hooks_for(no_recompute.config) != traced.hooks_for(outer.config)  # (compiled apart)
        assert aot_settings() == ("no_static", False)
    assert aot_settings() == before
    assert traced._innermost_session() is None


def test_blocks_with_python_hooks_leave_aot_autograd_as_it_is():
    before = aot_settings()
    with tq.compress(bits=4, overrides={"x": {"bits": 8}}):
        assert aot_settings() == before
    assert aot_settings() == before


def test_eager_saves_under_traced_hooks_go_to_the_innermost_block():
    x = torch.randn(64, 64, requires_grad=True)
    with tq.compress(bits=8, min_bytes=0) as outer:
        a = x.tanh()
        with tq.compress(bits=8, min_bytes=0) as inner:
            b = a.tanh()
    (a.sum() + b.sum()).backward()
    assert outer.stats.packed_tensors == 1 and inner.stats.packed_tensors == 1


def test_weight_casts_under_autocast_are_not_packed(monkeypatch):
    """autocast's bf16 copies of parameters are casts of the region's inputs: kept exact, as eager
    blocks keep them (there, cast again in backward)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(32, 64)
    compiled = torch.compile(model, backend="aot_eager")
    spy = PackSpy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with tq.compress(bits=4, min_bytes=0):
            loss = compiled(x).float().sum()
    loss.backward()
    # The region saves the input's bf16 cast (kept: a cast of one of its inputs), the weights' casts
    # (kept) and the ReLU's output, which serves both the ReLU's gradient and the second Linear's.
    assert spy.python_packs == 0
    assert spy.kinds == [((32, 64), torch.bfloat16)]


def test_dynamic_shapes_pack_every_batch_size():
    model = deep_mlp(layers=2, width=32)
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    for batch in (8, 24, 40):
        x = torch.randn(batch, 32)
        eager = grads(model, lambda: model(x).sum(), tq.compress(bits=4, min_bytes=0))
        session = tq.compress(bits=4, min_bytes=0)
        got = grads(model, lambda: compiled(x).sum(), session)
        assert session.stats.packed_tensors == 3  # the input, the two GELUs' inputs
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,shape,channels_last", [
    (torch.float32, (3, 700), False), (torch.bfloat16, (2, 8, 5, 7), True), (torch.float16, (513,), False),
    (torch.bool, (3, 100), False),
], ids=["fp32", "bf16-channels-last", "fp16-partial-group", "bool"])
def test_the_ops_fake_implementations_agree_with_the_real_ones(dtype, shape, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape) > 0 if dtype == torch.bool else torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    pack_args = (x, 4, 64, "minmax", False, "auto")
    torch.library.opcheck(torch.ops.tritonquant.pack_saved, pack_args)
    payload, meta = torch.ops.tritonquant.pack_saved(*pack_args)
    unpack_args = (payload, meta, list(x.shape), list(x.stride()), traced.PACKED_DTYPES.index(dtype), 4, 64,
                   "minmax", "auto")
    torch.library.opcheck(torch.ops.tritonquant.unpack_saved, unpack_args)
    restored = torch.ops.tritonquant.unpack_saved(*unpack_args)
    expected = tq.dequantize(tq.quantize(x, bits=4, group_size=64))
    assert restored.stride() == x.stride()
    assert torch.equal(restored, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape,channels_last,bits,scheme", [
    (torch.bfloat16, (4, 1024, 768), False, 4, "minmax"), (torch.float32, (8, 64, 14, 14), True, 2, "sigma"),
    (torch.float16, (1000, 513), False, 8, "minmax"),
], ids=["bf16-4bit", "fp32-channels-last-2bit-sigma", "fp16-8bit-partial-group"])
def test_the_ops_repeated_calls_give_the_bytes_of_their_first_on_the_gpu(dtype, shape, channels_last, bits, scheme,
                                                                        monkeypatch):
    # After the first packing of a kind the codec launches what it prepared (codec.quantize_repeated,
    # dequantize_repeated); every call must pack and restore as the first did.
    repeated = []
    for name in ("quantize_repeated", "dequantize_repeated"):
        function = getattr(codec, name)
        monkeypatch.setattr(codec, name, lambda *args, _f=function: repeated.append(_f(*args)) or repeated[-1])
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    expected = tq.quantize(x, bits=bits, group_size=256, scheme=scheme)
    restored_expected = tq.dequantize(expected)
    for call in range(4):
        payload, meta = torch.ops.tritonquant.pack_saved(x, bits, 256, scheme, False, "auto")
        restored = torch.ops.tritonquant.unpack_saved(payload, meta, list(x.shape), list(x.stride()),
                                                      traced.PACKED_DTYPES.index(dtype), bits, 256, scheme, "auto")
        assert torch.equal(payload, expected.payload) and torch.equal(meta, expected.meta), f"call {call + 1}"
        assert restored.stride() == x.stride() and torch.equal(restored, restored_expected), f"call {call + 1}"
    launched = [r is not None and r is not False for r in repeated]
    assert launched[-2:] == [True, True], f"the fourth pack and unpack must launch what was prepared: {launched}"


def q_of_attention() -> torch.Tensor:
    """A view with gaps, as attention's q is: [batch 2, heads 4, seq 8, head dim 16] of [2, 8, 3, 4, 16]."""
    return torch.randn(2, 8, 3, 4, 16).permute(2, 0, 3, 1, 4)[0]


def test_an_empty_tensor_is_never_packed_in_a_compiled_region():
    # min_bytes=0 packs every saved tensor, but one without elements has nothing to pack.
    graph = torch.fx.Graph()
    node = graph.call_function(torch.relu, (graph.placeholder("x"),))
    assert traced._packable(torch.randn(4, 8), 0, node)
    assert not traced._packable(torch.empty(0, 8), 0, node)


@pytest.mark.parametrize("make, restored", [
    (lambda: torch.randn(4, 8, 16), (128, 16, 1)),
    (lambda: torch.randn(2, 16, 4, 4).to(memory_format=torch.channels_last), (256, 1, 64, 16)),
    (lambda: torch.randn(2, 8, 4, 16).transpose(1, 2), (512, 16, 64, 1)),  # dense: kept as it lies
    (q_of_attention, (512, 16, 64, 1)),  # gaps: dense, same order of dimensions
    (lambda: torch.randn(8, 64)[:, ::2], (32, 1)),
    (lambda: torch.randn(4, 1, 16).transpose(0, 1), (16, 16, 1)),
    (lambda: torch.randn(1, 16).expand(8, 16), None),  # broadcast: kept
    (lambda: torch.randn(16).as_strided((4, 4), (1, 1)), None),  # elements sharing memory: kept
], ids=["contiguous", "channels-last", "permuted-dense", "attention-q", "every-other", "size-1-dims", "broadcast",
        "overlapping"])
def test_the_restored_strides_are_the_packings_layout(make, restored):
    torch.manual_seed(0)
    x = make()
    assert traced.restored_stride(x) == restored
    if restored is None:
        return
    # The layout the pack op packs in is the one the unpack op restores into (the graph fixes both when
    # it is traced; the op's packing must not disagree at run time).
    assert quantize_checked(x, QuantConfig(bits=4, group_size=32)).stored_stride == restored
    payload, meta = torch.ops.tritonquant.pack_saved(x, 4, 32, "minmax", False, "auto")
    back = torch.ops.tritonquant.unpack_saved(payload, meta, list(x.shape), list(restored), 0, 4, 32, "minmax", "auto")
    assert back.stride() == restored
    assert torch.equal(back, tq.dequantize(tq.quantize(x, bits=4, group_size=32)))


def test_attention_under_inductor_packs_q_k_v_and_its_output_and_keeps_row_statistics(monkeypatch):
    """A transformer compiled whole: attention saves q, k and v (views with gaps of one projection) and
    its output (dense, heads before positions): all four are packed, restored dense in their order of
    dimensions, which attention's backward requires. Its log-sum-exp, the LayerNorms' and the hand-written
    RMSNorm's per-row values ([rows, 1]) are kept."""
    torch.manual_seed(0)
    batch, seq, heads, dim = 4, 32, 2, 64
    model = TinyTransformer(vocab=128, dim=dim, heads=heads, layers=2, seq=seq, dropout=0.0)
    data = lm_batch(batch, seq=seq, vocab=128)
    compiled = torch.compile(model, backend="inductor")
    exact = grads(model, lambda: lm_loss(model, data), contextlib.nullcontext())
    spy = PackSpy(monkeypatch)
    session = tq.compress(bits=8, min_bytes=0)
    got = grads(model, lambda: lm_loss(compiled, data), session)
    attention_shape = (batch, heads, seq, dim // heads)
    assert [shape for shape, _ in spy.kinds].count(attention_shape) == 2 * 4  # q, k, v, output; 2 layers
    assert all(shape[-1] != 1 for shape, _ in spy.kinds), spy.kinds
    assert F.cosine_similarity(got, exact, dim=0).item() > 0.9999


def test_a_compiled_loss_packs_its_logits_at_8_bits(monkeypatch):
    """With the loss in the compiled region, Inductor's cross-entropy saves the logits and the rows' max
    and log-sum, and its backward computes the probabilities again from them: the logits get
    ``SOFTMAX_INPUT_BITS`` (8), and the gradients stay as close to exact as eager compression's (which
    packs the log-softmax's output instead)."""
    torch.manual_seed(0)
    vocab = 1024
    model = TinyTransformer(vocab=vocab, dim=32, heads=2, layers=1, seq=32, dropout=0.0, tied=True)
    tokens, targets = lm_batch(8, seq=32, vocab=vocab)

    def step(m):
        return F.cross_entropy(m(tokens).float().reshape(-1, vocab), targets.reshape(-1))

    compiled_step = torch.compile(step, backend="inductor")
    exact = grads(model, lambda: step(model), contextlib.nullcontext())
    eager = grads(model, lambda: step(model), tq.compress(bits=4, min_bytes=0))
    spy = PackSpy(monkeypatch)
    got = grads(model, lambda: compiled_step(model), tq.compress(bits=4, min_bytes=0))
    assert ((8 * 32, vocab), 8) in spy.widths, spy.widths  # the logits, as [rows, vocabulary]
    cosine = lambda a: F.cosine_similarity(a, exact, dim=0).item()  # noqa: E731
    # measured 0.9977 (eager compression: 0.9971); with the logits at the block's 4 bits, 0.9785
    assert cosine(got) > cosine(eager) - 0.002, (cosine(got), cosine(eager))


def test_hooks_called_from_another_thread_go_to_the_open_block():
    """On CUDA, backward runs on the device's own thread, with the hooks of the thread that called it:
    a block open then (checkpointed layers computing their forward again) sees its hooks called from a
    thread that opened no block."""
    x = torch.randn(64, 64, requires_grad=True)
    results = []
    with tq.compress(bits=8, min_bytes=0) as session:
        pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(True)
        worker = threading.Thread(target=lambda: results.append(unpack(pack(x.tanh()))))
        worker.start()
        worker.join()
    assert session.stats.packed_tensors == 1
    assert len(results) == 1 and results[0].shape == (64, 64)
    with pytest.raises(RuntimeError, match="after every block closed"):
        pack(x)


def test_row_statistics_are_kept_and_probabilities_get_the_floor(monkeypatch):
    """What eager blocks keep exact or widen, a compiled region does too: the per-row max and sum of a
    softmax and the mean and rstd of a LayerNorm ([rows, 1]) are kept; a softmax output backward reads
    is packed at ``sensitive_bits`` (4) when the block asks for 2."""
    torch.manual_seed(0)
    norm, head = nn.LayerNorm(64), nn.Linear(64, 512)
    values = nn.Parameter(torch.randn(512, 16))

    def step(x, y):
        logits = head(norm(x))
        attended = logits.softmax(-1) @ values  # backward reads the probabilities (for values' gradient)
        return F.cross_entropy(logits, y) + attended.square().mean()

    compiled = torch.compile(step, backend="aot_eager")
    x, y = torch.randn(128, 64), torch.randint(0, 512, (128,))
    spy = PackSpy(monkeypatch)
    with tq.compress(bits=2, min_bytes=0) as session:
        loss = compiled(x, y)
    loss.backward()
    widths = spy.widths
    assert spy.python_packs == 0 and session.stats.packed_tensors == len(widths) > 0
    assert all(shape[-1] != 1 for shape, _ in widths), widths  # no [rows, 1] statistic
    assert ((128, 512), 4) in widths  # the probabilities, at the floor
    assert {bits for shape, bits in widths if shape != (128, 512)} == {2}, widths
