"""Public quantize/dequantize: layouts, dtypes, sizes, backends and input validation."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import tritonquant as tq
from tritonquant import codec, kernels
from tritonquant.codec import RandomStream, quantize_with
from tritonquant.config import QuantConfig
from tests.activations import ACTIVATION_TOLERANCES, activation_like, confident_logits
from tests.conftest import BACKENDS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _layouts():
    """name -> function(dtype, device) building a tensor with that memory layout."""

    def base(shape, dtype, device, seed=0):
        return activation_like(torch.Size(shape).numel(), dtype, 16, seed, device).reshape(shape)

    return {
        "contiguous": lambda d, dev: base((4, 33), d, dev),
        "channels_last": lambda d, dev: base((2, 8, 5, 7), d, dev).to(memory_format=torch.channels_last),
        "transposed": lambda d, dev: base((24, 9), d, dev).t(),
        "storage_offset": lambda d, dev: base((300,), d, dev)[37:],
        "gaps": lambda d, dev: base((6, 40), d, dev)[:, ::3],
        # k of attention, [batch, heads, seq, head_dim]: runs of 2 groups, 96 elements apart (no copy on Triton)
        "attention_runs": lambda d, dev: base((3, 5, 96), d, dev).view(3, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)[1],
        "broadcast": lambda d, dev: base((1, 50), d, dev).expand(7, 50),
        "broadcast_middle": lambda d, dev: base((3, 1, 20), d, dev).expand(3, 4, 20),
        "scalar": lambda d, dev: torch.tensor(-2.5, dtype=d, device=dev),
        "empty": lambda d, dev: torch.empty(0, 5, dtype=d, device=dev),
        "size_one_dims": lambda d, dev: base((1, 65, 1), d, dev),
        # dense, with a size-1 dimension whose stride is arbitrary (it is never stepped over)
        "size_one_dim_any_stride": lambda d, dev: base((24, 9), d, dev).t().as_strided((9, 1, 24), (1, 1000, 9)),
        "broadcast_pair": lambda d, dev: base((1, 50), d, dev).expand(2, 50),
    }


LAYOUTS = _layouts()


def _in_memory_order(x: torch.Tensor):
    """(a contiguous tensor of ``x``'s elements in the order its memory holds them, a function that takes
    a tensor of that shape to ``x``'s): a broadcast tensor's memory holds each value once; a tensor with
    gaps between its elements is copied in index order."""
    broadcast = [d for d in range(x.dim()) if x.stride(d) == 0 and x.size(d) > 1]
    if broadcast:
        base = x
        for d in broadcast:
            base = base.narrow(d, 0, 1)
        dense, back = _in_memory_order(base)
        return dense, lambda t: back(t).expand(x.shape)
    steps = sorted((x.stride(d), x.size(d)) for d in range(x.dim()) if x.size(d) > 1)
    if any(stride != math.prod(size for _, size in steps[:i]) for i, (stride, _) in enumerate(steps)):
        return x.contiguous(), lambda t: t
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d) if x.size(d) > 1 else -math.inf)
    inverse = sorted(range(x.dim()), key=order.__getitem__)
    return x.permute(order).contiguous(), lambda t: t.permute(inverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS.keys())
def test_roundtrip_keeps_shape_dtype_device_and_strides(layout, dtype, backend, device):
    x = LAYOUTS[layout](dtype, device)
    p = tq.quantize(x, bits=8, group_size=16, backend=backend)
    y = tq.dequantize(p, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if layout in ("gaps", "attention_runs"):  # packed densely, same dimension order
        assert y.stride() == torch.empty_like(x).stride()
    else:
        assert y.stride() == x.stride()
    # Values: groups are runs of memory, so a layout decodes as its elements packed in memory order do,
    # bit for bit; and those lie within two steps of their group's grid (255 steps over its range) and the
    # dtype's rounding.
    dense, back = _in_memory_order(x)
    decoded = tq.dequantize(tq.quantize(dense, bits=8, group_size=16, backend=backend), backend=backend)
    assert torch.equal(y, back(decoded))
    groups = zip(dense.float().reshape(-1).split(16), decoded.float().reshape(-1).split(16)) if x.numel() else ()
    for group, restored in groups:
        bound = 2 * (group.max() - group.min()) / 255 + group.abs() * torch.finfo(dtype).eps + 1e-30
        assert ((restored - group).abs() <= bound).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "storage_offset", "broadcast",
                                    "broadcast_middle", "size_one_dims", "size_one_dim_any_stride", "attention_runs",
                                    "gaps"])
def test_dense_layouts_and_strided_runs_are_read_where_they_lie(layout):
    # The kernels read a tensor's memory directly when its elements fill one run of it (broadcast
    # dimensions taken once), or fall in equal runs of whole groups; only other gaps make a dense copy.
    x = LAYOUTS[layout](torch.float32, "cpu")
    stored, _ = codec._packing_layout(x, 16, read_runs=True)
    assert (stored.data_ptr() == x.data_ptr()) is (layout != "gaps")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # (the interpreter's exp)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "attention_runs", "size_one_dims"])
def test_dequantize_activated_gives_the_decode_and_its_activation_in_its_layout(layout, activation, backend, device):
    x = LAYOUTS[layout](torch.bfloat16, device)
    packed = tq.quantize(x, bits=4, group_size=16, backend=backend)
    decoded, activated = codec.dequantize_activated(packed, activation, backend=backend)
    expected = tq.dequantize(packed, backend=backend)
    assert torch.equal(decoded, expected) and decoded.stride() == expected.stride()
    assert activated.dtype == decoded.dtype and activated.stride() == decoded.stride()
    reference = kernels.torch_activation(decoded, activation)
    if backend == "torch":
        assert torch.equal(activated, reference)
    else:
        atol, rtol = ACTIVATION_TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(activated, reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_the_torch_backends_activation_is_codec_activate_of_the_decoded_tensor_bit_for_bit(memory_format, activation):
    # The session computes an activation output again either in the decoding pass (dequantize_activated)
    # or from a decoded tensor it kept (codec.activate). Both must give the same bits. torch's CPU kernels
    # can round a few elements differently when the same memory is walked as one flat run rather than in
    # the tensor's shape (GELU of bf16 values near -5 under torch 2.11 and 2.13, on some thread counts).
    x = torch.linspace(-8, 8, 3 * 64 * 9 * 11).reshape(3, 64, 9, 11).to(torch.bfloat16)
    x = x.to(memory_format=memory_format)
    packed = tq.quantize(x, bits=8, group_size=64, backend="torch")
    decoded, activated = codec.dequantize_activated(packed, activation, backend="torch")
    assert torch.equal(activated, codec.activate(decoded, activation))


def test_dequantize_activated_names_what_it_cannot_do():
    packed = tq.quantize(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'gelu_tanh', 'silu'\), got 'tanh'"):
        codec.dequantize_activated(packed, "tanh")
    for unsuited in (tq.quantize(torch.randn(4, 8) > 0), tq.quantize(torch.randn(1, 8).expand(4, 8))):
        with pytest.raises(ValueError, match="needs the packing of a float tensor stored at its own shape"):
            codec.dequantize_activated(unsuited, "gelu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_with_gaps_comes_back_dense_in_its_dimension_order(backend, device):
    # docs/format.md, Layout: a tensor with gaps is copied densely keeping its dimension order, and comes
    # back with torch.empty_like's strides (channels_last here, not the contiguous ones).
    x = torch.randn(2, 3, 8, 5, device=device).to(memory_format=torch.channels_last)[..., ::2]
    assert torch.empty_like(x).stride() != x.contiguous().stride()
    y = tq.dequantize(tq.quantize(x, bits=8, group_size=16, backend=backend), backend=backend)
    assert y.stride() == torch.empty_like(x).stride()
    assert (y - x).abs().max() <= (x.abs().max() + 1) * 2**-5


@pytest.mark.parametrize("make", [lambda t: t[:, ::3], lambda t: t[:1, ::3].expand(6, 14)],
                         ids=["gaps", "broadcast_with_gaps"])
def test_packed_tensor_records_the_original_strides(make, device):
    # PackedTensor.stride (and shape) are the original tensor's; stored_stride is the dense copy's.
    x = make(torch.randn(6, 40, device=device))
    packed = tq.quantize(x, bits=4, group_size=16)
    assert packed.stored_stride != x.stride()
    assert packed.stride == x.stride() and packed.shape == x.shape


@pytest.mark.parametrize("layout", LAYOUTS.keys())
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"{b}bit")
def test_backends_agree_bit_for_bit_through_the_codec(layout, bits, device):
    x = LAYOUTS[layout](torch.bfloat16, device)
    a = tq.quantize(x, bits=bits, group_size=16, backend="triton")
    b = tq.quantize(x, bits=bits, group_size=16, backend="torch")
    assert torch.equal(a.payload, b.payload) and torch.equal(a.meta, b.meta)
    assert torch.equal(tq.dequantize(a, backend="triton"), tq.dequantize(b, backend="torch"))


class _OpNames(TorchDispatchMode):
    """The names of the aten ops run inside it, but for those of the codec's Triton quantize calls
    (under the interpreter, those copy their arguments), which it records instead: (input, runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.quantized: list[tuple[torch.Tensor, tuple | None]] = []

    def quantize_unseen(self, x, *args):
        self.quantized.append((x, args[-1]))
        with _disable_current_modes():
            return kernels.triton_quantize(x, *args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_attention_views_are_read_in_place_by_triton_and_restore_like_a_dense_copy(device, monkeypatch):
    # q, k and v are strided views of one projection's output; the quantize kernel reads their runs where
    # they lie (kernels/launch.py, strided_runs), where any other tensor with gaps is copied first.
    ops = _OpNames()
    monkeypatch.setitem(codec._QUANTIZE, "triton", ops.quantize_unseen)
    qkv = torch.randn(2, 6, 3 * 4 * 16, device=device, dtype=torch.bfloat16)
    for view in qkv.view(2, 6, 3, 4, 16).permute(2, 0, 3, 1, 4):
        with ops:
            packed = tq.quantize(view, bits=4, group_size=16, backend="triton")
        assert "copy_" not in ops.names and "clone" not in ops.names, ops.names
        (read, runs), = ops.quantized
        assert read.data_ptr() == view.data_ptr() and runs == (64, 192)
        dense = torch.empty_like(view).copy_(view)
        restored = tq.dequantize(packed)
        assert restored.stride() == dense.stride()
        assert torch.equal(restored, tq.dequantize(tq.quantize(dense, bits=4, group_size=16, backend="torch")))
        ops.names.clear(), ops.quantized.clear()
    with ops:  # gaps without one stride between equal runs: copied
        tq.quantize(qkv[:, :4, :64], bits=4, group_size=16, backend="triton")
    assert "copy_" in ops.names and ops.quantized[0][1] is None


def test_broadcast_is_not_materialized(device):
    row = torch.randn(1, 1000, device=device)
    x = row.expand(64, 1000)
    p = tq.quantize(x, bits=4)
    assert p.stored_numel == 1000
    assert p.nbytes == tq.quantize(row, bits=4).nbytes
    assert torch.equal(tq.dequantize(p), tq.dequantize(tq.quantize(row, bits=4)).expand(64, 1000))


def test_channels_last_is_packed_in_memory_order(device):
    x = torch.randn(2, 16, 4, 4, device=device).to(memory_format=torch.channels_last)
    physical = x.permute(0, 2, 3, 1).contiguous().reshape(-1)
    p = tq.quantize(x, bits=4, group_size=16)
    q = tq.quantize(physical, bits=4, group_size=16)
    assert torch.equal(p.payload, q.payload) and torch.equal(p.meta, q.meta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_is_lossless_at_one_bit(backend, device):
    x = torch.randn(3, 1001, device=device) > 0.2
    p = tq.quantize(x, bits=8, backend=backend)  # bits is irrelevant for bool
    assert p.bits == 1 and p.meta is None and p.nbytes == (x.numel() + 7) // 8
    assert torch.equal(tq.dequantize(p, backend=backend), x)
    y = x.t()
    assert torch.equal(tq.dequantize(tq.quantize(y, backend=backend), backend=backend), y)
    z = (torch.randn(4, 1024, device=device) > 0.2)[:, :512]  # gaps between runs of whole groups
    assert torch.equal(tq.dequantize(tq.quantize(z, backend=backend), backend=backend), z)


@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"{b}bit")
def test_nbytes_counts_payload_and_metadata(bits, device):
    x = torch.randn(10_000, device=device, dtype=torch.bfloat16)
    p = tq.quantize(x, bits=bits)
    n_groups = -(-10_000 // 256)
    assert p.nbytes == n_groups * 256 * bits // 8 + n_groups * 8
    assert p.raw_nbytes == 20_000
    assert p.nbytes <= 1.03 * (10_000 * bits / 8 + n_groups * 8)


def test_dequantize_preserves_requires_grad_free_result(device):
    x = torch.randn(100, device=device, requires_grad=True)
    y = tq.dequantize(tq.quantize(x))
    assert not y.requires_grad


def test_unseeded_stochastic_calls_advance_the_library_stream(device):
    x = torch.randn(4096, device=device)
    tq.manual_seed(5)
    first = tq.quantize(x, bits=2, stochastic=True)
    second = tq.quantize(x, bits=2, stochastic=True)
    assert not torch.equal(first.payload, second.payload)
    tq.manual_seed(5)
    assert torch.equal(tq.quantize(x, bits=2, stochastic=True).payload, first.payload)


def test_a_seeded_stream_gives_each_call_its_own_numbers_and_checks_its_seed(device):
    x = torch.randn(4096, device=device)
    config = QuantConfig(bits=2, stochastic=True, seed=11, backend="torch")
    alone = quantize_with(x, config)
    assert torch.equal(alone.payload, quantize_with(x, config).payload), "a seeded call repeats itself"
    stream = RandomStream(11)
    first, second = quantize_with(x, config, stream=stream), quantize_with(x, config, stream=stream)
    assert torch.equal(first.payload, alone.payload)  # the stream's first counters are the call's own
    assert not torch.equal(second.payload, first.payload)
    again = RandomStream(11)
    assert [quantize_with(x, config, stream=again).payload.tolist() for _ in range(2)] == [
        first.payload.tolist(), second.payload.tolist()]
    with pytest.raises(ValueError, match="stream has seed 12, the config 11"):
        quantize_with(x, config, stream=RandomStream(12))


BAD_ARGUMENTS = [
    ({"bits": 3}, ValueError, r"bits must be one of \(1, 2, 4, 8\), got 3"),
    ({"bits": True}, ValueError, r"bits must be one of"),
    ({"group_size": 0}, ValueError, r"group_size must be a power of two from 8 to 4096, got 0"),
    ({"group_size": 100}, ValueError, r"group_size must be a power of two"),
    ({"group_size": 8192}, ValueError, r"group_size must be a power of two"),
    ({"scheme": "foo"}, ValueError, r"scheme must be one of \('minmax', 'sigma'\), got 'foo'"),
    ({"backend": "cuda"}, ValueError, r"backend must be one of \('auto', 'triton', 'torch'\)"),
    ({"stochastic": "yes"}, TypeError, r"stochastic must be a bool"),
    ({"seed": -1}, ValueError, r"seed must be None or an int in \[0, 2\*\*63 - 1\]"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS, ids=[str(b[0]) for b in BAD_ARGUMENTS])
def test_bad_arguments_name_the_argument_and_allowed_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        tq.quantize(torch.randn(10), **kwargs)


@pytest.mark.parametrize(
    "x",
    [
        torch.arange(10),
        torch.arange(10, dtype=torch.uint8),
        torch.randn(10, dtype=torch.complex64),
        torch.randn(10, dtype=torch.float64),
    ],
    ids=["int64", "uint8", "complex64", "float64"],
)
def test_unsupported_dtypes_are_rejected_with_the_allowed_list(x):
    with pytest.raises(TypeError, match=r"x.dtype must be one of float32, float16, bfloat16, bool"):
        tq.quantize(x)


@pytest.mark.parametrize("backend", ["cuda", "TORCH", None], ids=["cuda", "upper-case", "None"])
def test_dequantize_names_the_allowed_backends(backend):
    packed = tq.quantize(torch.randn(10))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got "):
        tq.dequantize(packed, backend=backend)


def test_numpy_integers_are_taken_as_ints():
    np = pytest.importorskip("numpy")
    x = torch.randn(1000)
    packed = tq.quantize(x, bits=np.int64(2), group_size=np.int32(64), stochastic=True, seed=np.uint64(7))
    reference = tq.quantize(x, bits=2, group_size=64, stochastic=True, seed=7)
    assert type(packed.bits) is int and type(packed.group_size) is int
    assert torch.equal(packed.payload, reference.payload) and torch.equal(packed.meta, reference.meta)


def test_non_tensor_sparse_and_meta_inputs_are_rejected():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tq.quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="dense"):
        tq.quantize(torch.eye(4).to_sparse())
    with pytest.raises(ValueError, match="meta device"):
        tq.quantize(torch.empty(4, device="meta"))
    with pytest.raises(TypeError, match="PackedTensor"):
        tq.dequantize(torch.randn(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_triton_backend_on_cpu_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setattr(codec, "is_interpreted", lambda: False)  # as if the kernels were compiled ones
    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA tensor"):
        tq.quantize(torch.randn(10), backend="triton")


def test_manual_seed_validates():
    with pytest.raises(ValueError, match="seed must be an int"):
        tq.manual_seed(-3)


# -- per-channel standardization (the pack hook's path for BatchNorm inputs at 1-2 bits) ----------


def channels_apart(dtype=torch.float32, device="cpu", memory_format=torch.contiguous_format) -> torch.Tensor:
    """[4, 6, 5, 5]: channels with offsets and spreads four orders of magnitude apart (as conv outputs
    before BatchNorm can be); channel 5 is constant."""
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.01, 1.0, 10.0, 100.0, 3.0, 0.0]).view(1, -1, 1, 1)
    offset = torch.tensor([5.0, -3.0, 0.0, 1.0, 2.0, 7.0]).view(1, -1, 1, 1)
    x = torch.randn(4, 6, 5, 5, generator=g) * spread + offset
    return x.to(dtype).to(device).contiguous(memory_format=memory_format)


def per_channel_relative_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.float(), y.float()
    return (y - x).square().mean(dim=(0, 2, 3)) / x.var(dim=(0, 2, 3), correction=0).clamp(min=1e-30)


def test_standardized_channels_match_the_reference_bit_for_bit(device):
    x = channels_apart(device=device)
    config = QuantConfig(bits=2, group_size=64, backend="torch")
    packed = quantize_with(x, config, standardize="channels")
    # Reference: the statistics, the standardization and the restore written out with plain torch.
    var = x.var(dim=(0, 2, 3), correction=0)
    scale = torch.where(var > 0, var.sqrt(), 1.0)
    minimum = x.amin(dim=(0, 2, 3))
    reciprocal = 1.0 / scale  # rounded to fp32 once per channel (docs/format.md)
    inner = tq.quantize((x - minimum.view(1, -1, 1, 1)) * reciprocal.view(1, -1, 1, 1) + 1, bits=2, group_size=64,
                        backend="torch")
    expected = (tq.dequantize(inner) - 1) * scale.view(1, -1, 1, 1) + minimum.view(1, -1, 1, 1)
    assert torch.equal(packed.channels, torch.stack([minimum, scale], dim=1))
    assert torch.equal(packed.payload, inner.payload) and torch.equal(packed.meta, inner.meta)
    assert torch.equal(tq.dequantize(packed), expected)


@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"{b}bit")
def test_standardizing_gives_every_channel_its_own_resolution(bits, device):
    x = channels_apart(device=device)
    config = QuantConfig(bits=bits, group_size=64, backend="torch")
    plain = per_channel_relative_error(x, tq.dequantize(quantize_with(x, config)))[:5]
    standardized = per_channel_relative_error(x, tq.dequantize(quantize_with(x, config, standardize="channels")))[:5]
    # Every channel ends with an error a fixed fraction of its own variance (measured 0.25-0.29 at
    # 2 bits, 0.010-0.011 at 4); sharing groups, the narrow channels get errors many times theirs.
    assert standardized.max() < {2: 0.35, 4: 0.015}[bits]
    assert plain.max() > 100 * standardized.max()


def test_standardized_minimums_and_constant_channel_are_exact_and_nonfinite_propagates(device):
    x = channels_apart(device=device)
    y = tq.dequantize(quantize_with(x, QuantConfig(bits=2, backend="torch"), standardize="channels"))
    assert torch.equal(y[:, 5], x[:, 5])
    assert torch.equal(y.amin(dim=(0, 2, 3)), x.amin(dim=(0, 2, 3)))
    x[0, 2, 1, 1] = float("inf")
    x[3, 4, 0, 0] = float("nan")
    y = tq.dequantize(quantize_with(x, QuantConfig(bits=2, backend="torch"), standardize="channels"))
    assert not y[:, 2].isfinite().all() and not y[:, 4].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_standardized_roundtrip_keeps_layout_dtype_and_counts_its_statistics(memory_format, dtype, device):
    x = channels_apart(dtype, device, memory_format)
    packed = quantize_with(x, QuantConfig(bits=2, group_size=64, backend="torch"), standardize="channels")
    y = tq.dequantize(packed)
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()
    assert packed.channels.shape == (6, 2) and packed.channels.dtype == torch.float32
    plain = quantize_with(x, QuantConfig(bits=2, group_size=64, backend="torch"))
    assert packed.nbytes == plain.nbytes + 6 * 2 * 4
    assert per_channel_relative_error(x, y)[:5].max() < 0.4


def test_standardized_backends_agree_bit_for_bit(device):
    x = channels_apart(torch.bfloat16, device, torch.channels_last)
    a = quantize_with(x, QuantConfig(bits=2, group_size=64, backend="triton"), standardize="channels")
    b = quantize_with(x, QuantConfig(bits=2, group_size=64, backend="torch"), standardize="channels")
    assert torch.equal(a.payload, b.payload) and torch.equal(a.meta, b.meta) and torch.equal(a.channels, b.channels)
    assert torch.equal(tq.dequantize(a, backend="triton"), tq.dequantize(b, backend="torch"))


@pytest.mark.parametrize("x", [torch.randn(40), torch.rand(4, 6, 3) > 0.5], ids=["one_dim", "bool"])
def test_standardize_is_ignored_without_channels(x):
    packed = quantize_with(x, QuantConfig(bits=2, backend="torch"), standardize="channels")
    assert packed.channels is None


def test_standardize_treats_the_columns_of_a_matrix_as_its_channels():
    # BatchNorm1d's input, [batch, features]: dimension 1 is the channel from two dimensions up.
    x = channels_apart()[:, :, 0, 0]  # [4, 6]
    packed = quantize_with(x, QuantConfig(bits=2, group_size=8, backend="torch"), standardize="channels")
    assert packed.channels.shape == (6, 2)
    assert torch.equal(packed.channels[:, 0], x.amin(dim=0))


# ---------------------------------------------------------------------------------------------
# standardize="shift": one fixed shift for the whole tensor, x - 1 (log-probabilities)
# ---------------------------------------------------------------------------------------------


def confident_log_probs(dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """log_softmax of ``confident_logits``: log p exactly 0 in some rows, just below 0 in others."""
    return torch.log_softmax(confident_logits(), dim=1).to(dtype).to(device)


def test_shift_matches_the_reference_bit_for_bit(device):
    x = confident_log_probs(device=device)
    packed = quantize_with(x, QuantConfig(bits=4, group_size=64, backend="torch"), standardize="shift")
    # Reference: the map and the restore written out with plain torch (each operation rounded to fp32).
    inner = tq.quantize((x - 2.0) * 1.0 + 1.0, bits=4, group_size=64, backend="torch")
    assert packed.channels.tolist() == [[2.0, 1.0]] and packed.channels.device == x.device
    assert torch.equal(packed.payload, inner.payload) and torch.equal(packed.meta, inner.meta)
    assert torch.equal(tq.dequantize(packed), (tq.dequantize(inner) - 1.0) * 1.0 + 2.0)
    # Every group is at most -1: its base is its largest value, and its step counts down.
    assert (packed.meta[:, 0] <= -1).all() and (packed.meta[:, 1] <= 0).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "one-dim"])
def test_shift_backends_agree_bit_for_bit(layout, dtype, device):
    x = confident_log_probs(dtype, device)
    x = {"contiguous": x, "transposed": x.t(), "one-dim": x.reshape(-1)}[layout]
    a = quantize_with(x, QuantConfig(bits=4, group_size=64, backend="triton"), standardize="shift")
    b = quantize_with(x, QuantConfig(bits=4, group_size=64, backend="torch"), standardize="shift")
    assert a.channels.shape == (1, 2)
    assert torch.equal(a.payload, b.payload) and torch.equal(a.meta, b.meta) and torch.equal(a.channels, b.channels)
    ya, yb = tq.dequantize(a, backend="triton"), tq.dequantize(b, backend="torch")
    assert torch.equal(ya, yb) and ya.stride() == x.stride()


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"{b}bit")
def test_shift_keeps_near_certain_log_probs_near_zero(bits):
    # Plainly packed, a group holding an exact 0 counts away from it, and the sign rule moves every
    # log-probability just below 0 one step down: exp of it is far from 1. Shifted, each group counts
    # down from its largest value, and values near it stay near it.
    x = confident_log_probs()
    config = QuantConfig(bits=bits, backend="torch")
    near_certain = x[:, 0] > -1e-3  # p above 0.999
    winners = x[near_certain, 0]
    assert (winners == 0).any() and (winners < 0).any()
    shifted = tq.dequantize(quantize_with(x, config, standardize="shift"))[near_certain, 0]
    plain = tq.dequantize(quantize_with(x, config))[near_certain, 0]
    # Measured: p off by at most 0.001 shifted; by 0.91 (4 bits) and 0.13 (8 bits) plainly packed.
    assert (shifted.exp() - winners.exp()).abs().max() < 2e-3
    assert (plain.exp() - winners.exp()).abs().max() > 0.1


def test_shift_keeps_non_finite_values_to_their_groups_and_packs_empty_tensors(device):
    x = confident_log_probs(device=device).reshape(-1)
    x[7] = float("-inf")  # a masked class: its group restores as NaN, as plainly packed, and no other
    y = tq.dequantize(quantize_with(x, QuantConfig(bits=4, group_size=64, backend="torch"), standardize="shift"))
    assert y[:64].isnan().all() and y[64:].isfinite().all()
    empty = quantize_with(torch.empty(0, 5, device=device), QuantConfig(bits=4, backend="torch"), standardize="shift")
    assert tq.dequantize(empty).shape == (0, 5)


def test_unknown_standardization_is_refused():
    with pytest.raises(ValueError, match=r"standardize must be one of \(None, 'channels', 'shift'\), got 'rows'"):
        quantize_with(torch.randn(8), QuantConfig(bits=4, backend="torch"), standardize="rows")


# Layouts whose packing is one launch on the tensor's own memory: the launch a repeated packing prepares
# (an empty tensor's too, which kernels.prepare_quantize then turns down: nothing to launch).
PREPARED_LAYOUTS = ("contiguous", "channels_last", "transposed", "storage_offset", "size_one_dims",
                    "size_one_dim_any_stride", "scalar", "empty")


@pytest.mark.parametrize("layout", LAYOUTS.keys())
def test_a_repeated_quantize_is_prepared_for_one_run_of_memory_only(layout, monkeypatch):
    # The kernels' part (kernels.prepare_quantize) stands in: under the interpreter it prepares nothing.
    monkeypatch.setattr(codec.kernels, "prepare_quantize", lambda x, bits, group_size, sigma: (bits, group_size, sigma))
    x = LAYOUTS[layout](torch.bfloat16, "cpu")
    prepared = codec.prepare_repeated_quantize(x, QuantConfig(bits=2, scheme="sigma", backend="triton"))
    assert prepared == ((2, 256, True) if layout in PREPARED_LAYOUTS else None)


@pytest.mark.parametrize("config, dtype", [
    (QuantConfig(stochastic=True, backend="triton"), torch.bfloat16),
    (QuantConfig(backend="torch"), torch.bfloat16),
    (QuantConfig(backend="auto"), torch.bfloat16),  # (torch on the CPU)
    (QuantConfig(backend="triton"), torch.bool),
], ids=["stochastic", "torch-backend", "auto-on-cpu", "bool"])
def test_a_repeated_quantize_is_not_prepared_where_each_call_differs_or_torch_packs(config, dtype, monkeypatch):
    monkeypatch.setattr(codec.kernels, "prepare_quantize", lambda *args: "prepared")
    x = torch.ones(4, 256, dtype=dtype)
    assert codec.prepare_repeated_quantize(x, config) is None
    assert codec.prepare_repeated_quantize(x.float() if dtype == torch.bool else x,
                                           QuantConfig(backend="triton")) == "prepared"


def test_a_repeated_dequantize_is_prepared_for_plain_float_packings_only(monkeypatch):
    monkeypatch.setattr(codec.kernels, "prepare_dequantize", lambda out, n_groups, bits, group_size: (n_groups, bits))
    x = torch.randn(4, 256)

    def prepared(packed, backend="triton", shape=None):
        # ``out``: the tensor a decode writes, at the stored shape (before any broadcast)
        out = torch.empty_strided(shape or packed.stored_shape, packed.stored_stride, dtype=packed.dtype)
        return codec.prepare_repeated_dequantize(packed, out, backend)

    config = QuantConfig(bits=2, backend="triton")
    packed = codec.quantize_with(x, config)
    assert prepared(packed) == (4, 2)
    assert prepared(packed, backend="torch") is None
    assert prepared(codec.quantize_with(x[:1].expand(4, 256), config)) == (1, 2), "decoded once, then expanded"
    assert prepared(codec.quantize_with(x[:1].expand(4, 256), config), shape=(4, 256)) is None
    assert prepared(codec.quantize_with(x > 0, config)) is None
    assert prepared(codec.quantize_with(x.view(4, 256, 1), config, standardize="channels")) is None


def test_a_kind_is_prepared_when_new_or_stale_and_never_while_a_tile_is_forced():
    from tritonquant.kernels import autotune

    current = kernels.PreparedQuantize(256, 1, 128, (), autotune.config_generation())
    stale = current._replace(generation=current.generation - 1)
    assert codec._needs_preparing(codec._NOT_SEEN) and codec._needs_preparing(stale)
    assert not codec._needs_preparing(current), "refused for one call (alignment, no plan yet): kept"
    with autotune.use_config((4, 2)):
        assert not codec._needs_preparing(codec._NOT_SEEN), "a forced tile must not be remembered"
