"""quantize / dequantize: layout handling around the kernels, and the one place that picks a backend.

A tensor is packed in physical memory order: its storage is read as one flat run of elements, so
channels_last and other permuted layouts cost no copy and come back with their strides. Broadcast
(stride-0) dimensions are collapsed before packing and re-expanded after. A tensor with gaps between
its elements is packed as a dense copy that keeps its dimension order would be, and comes back dense
in that order; the quantize kernels read equal runs at one stride (attention's q, k and v) where they
lie, and any other such tensor is copied first.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch

from . import kernels
from .config import BACKENDS, MAX_SEED, QuantConfig
from .kernels import pool_indices as pool_kernels
from .kernels.autotune import config_generation
from .kernels.launch import is_interpreted
from .kernels.quantize import readable_runs
from .packed import PackedTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = FLOAT_DTYPES + (torch.bool,)

_QUANTIZE = {"triton": kernels.triton_quantize, "torch": kernels.torch_quantize}
_DEQUANTIZE = {"triton": kernels.triton_dequantize, "torch": kernels.torch_dequantize}
_PACK_BOOL = {"triton": kernels.triton_pack_bool, "torch": kernels.torch_pack_bool}
_UNPACK_BOOL = {"triton": kernels.triton_unpack_bool, "torch": kernels.torch_unpack_bool}
_ENCODE_POOL = {"triton": kernels.triton_encode_pool_indices, "torch": kernels.torch_encode_pool_indices}
_DECODE_POOL = {"triton": kernels.triton_decode_pool_indices, "torch": kernels.torch_decode_pool_indices}


class RandomStream:
    """A Philox stream: a seed and a counter that each call it serves advances past the counters it
    uses. The library's own stream serves every unseeded call; a compression block with a fixed seed
    keeps one of that seed for its packed tensors (``quantize_with``'s ``stream``)."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self.seed = seed
        self.offset = 0

    def reserve(self, count: int) -> tuple[int, int]:
        with self._lock:
            offset = self.offset
            self.offset = (self.offset + count) % 2**62
            return self.seed, offset


_stream = RandomStream()


def manual_seed(seed: int) -> None:
    """Seed the library's stochastic-rounding stream (never torch's global generator)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
    global _stream
    _stream = RandomStream(seed)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to "triton" on CUDA and "torch" elsewhere; check that "triton" can run on ``device``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 to interpret kernels on the CPU); "
            f"got a tensor on {device.type}. Use backend='auto' or 'torch'."
        )
    return backend


def quantize(
    x: torch.Tensor,
    *,
    bits: int = 4,
    scheme: str = "minmax",
    stochastic: bool = False,
    group_size: int = QuantConfig.group_size,
    seed: int | None = None,
    backend: str = "auto",
) -> PackedTensor:
    """Quantize and bit-pack ``x`` (float32/float16/bfloat16 of any shape and strides, or bool).

    See ``QuantConfig`` for the keywords. bool tensors are packed losslessly at 1 bit whatever ``bits`` is.
    Returns a ``PackedTensor``; ``dequantize`` restores shape, dtype, device and strides.
    """
    config = QuantConfig(bits, scheme, stochastic, group_size, seed, backend)
    return quantize_with(x, config)


STANDARDIZATIONS = (None, "channels", "shift")
# standardize="shift": one (minimum, scale) pair for the whole tensor, mapping x to (x - 2) * 1 + 1 = x - 1.
SHIFT_STATISTICS = (2.0, 1.0)


def quantize_with(x: torch.Tensor, config: QuantConfig, *, standardize: str | None = None,
                  stream: RandomStream | None = None) -> PackedTensor:
    """``quantize`` with an already validated config (the pack hook calls ``quantize_checked``, below).

    ``standardize``: quantize ``(x - minimum) * (1 / scale) + 1`` instead of ``x``, with the statistics
    kept in ``PackedTensor.channels``; the kernels apply the map as they load and ``dequantize`` undoes
    it as it stores. "channels": per index of dimension 1 (``_channel_statistics``; ignored for tensors
    of fewer than two dimensions). "shift": one fixed pair for the whole tensor, ``SHIFT_STATISTICS``,
    for values at or below zero (log-probabilities): x - 1, at most -1, so every group is one-signed
    without touching zero, and its grid counts down from its largest value, which decodes exactly. No
    reduction, and each group's grid stays its own. Zero is then not kept exact and signs are not kept,
    so the pack hook uses it only where no backward reads them (``policy.standardization``: BatchNorm
    inputs at 1-2 bits, probabilities, log-probabilities). Ignored for bool tensors.

    ``stream``: for stochastic rounding with a seed, the stream of that seed to draw counters from, so
    that the tensors of one block do not share their random numbers; None: a seeded call starts at
    counter 0, and the same input gives the same packing every time.
    """
    if standardize not in STANDARDIZATIONS:
        raise ValueError(f"standardize must be one of {STANDARDIZATIONS}, got {standardize!r}")
    _check_input(x)
    return quantize_checked(x, config, standardize=standardize, stream=stream)


def quantize_checked(x: torch.Tensor, config: QuantConfig, *, standardize: str | None = None,
                     stream: RandomStream | None = None) -> PackedTensor:
    """``quantize_with`` without checking ``x`` and ``standardize``, for callers that already have: the
    pack hook (``policy.pass_reason`` admits only plain strided float and bool tensors on CPU or CUDA,
    ``policy.standardization`` names a valid ``standardize``). It runs once per saved tensor.

    A packing of the same kind as an earlier one (``x``'s shape, strides, dtype and device, and
    ``config``'s bits, group size, scheme and backend), plain and with nearest rounding, launches what
    the first of its kind worked out (``prepare_repeated_quantize``): every layer packs the same kinds
    every step."""
    kind = None
    if standardize is None and not config.stochastic:
        # (The settings a nearest-rounding launch depends on, not ``config`` itself: hashing a dataclass
        # runs Python, hashing its fields does not.)
        kind = (x.shape, x.stride(), x.dtype, x.device, config.bits, config.group_size, config.scheme, config.backend)
        prepared = _PREPARED_QUANTIZE.get(kind, _NOT_SEEN)
        if prepared is not None and prepared is not _NOT_SEEN:
            launched = quantize_repeated(x, prepared)
            if launched is not None:
                shape, stride = kind[0], kind[1]
                return PackedTensor(launched[0], launched[1], shape, stride, shape, stride, kind[2], config.bits,
                                    config.group_size, config.scheme, False)
        elif prepared is None:
            kind = None  # (a kind that always takes the path below)
    device, dtype = x.device, x.dtype
    backend = resolve_backend(config.backend, device)
    standardize = standardize if dtype != torch.bool else None
    if backend == "torch" or standardize == "channels":
        # The torch backend's arithmetic, and the channel statistics, must not be recorded by autograd
        # (nor saved again). The Triton kernels only read ``x``'s memory.
        x = x.detach()
    stored, runs = _packing_layout(x, config.group_size, read_runs=dtype != torch.bool and standardize is None)
    channels, channel_stride = None, 1
    if standardize == "channels" and stored.dim() >= 2:
        channels, channel_stride = _channel_statistics(stored), _channel_stride(stored)
    elif standardize == "shift":
        # Filled on the device by fill_, whose value travels as a kernel argument. A tensor made from host
        # data (torch.tensor, or ``channels[0, 0] = 2.0``) would be a copy from pageable host memory:
        # a synchronization on CUDA, and an error inside CUDA graph capture.
        channels = torch.empty((1, 2), dtype=torch.float32, device=device)
        for column, value in enumerate(SHIFT_STATISTICS):
            channels[:, column].fill_(value)
    # The launchers read ``stored`` as its run of memory (kernels.launch.flat_view); no flat view needed.
    with _on_device(device):
        if dtype == torch.bool:
            payload, meta = _PACK_BOOL[backend](stored), None
            bits, scheme, stochastic = 1, "bool", False
        else:
            seed, offset = _rng_for(config, stored.numel(), device, stream)
            payload, meta = _QUANTIZE[backend](
                stored, config.bits, config.group_size, config.scheme == "sigma", config.stochastic, seed, offset,
                channels, channel_stride, runs,
            )
            bits, scheme, stochastic = config.bits, config.scheme, config.stochastic
    shape, stride = x.shape, x.stride()
    if runs is not None:  # packed as a dense copy would have been: restored into that layout
        stored_shape, stored_stride = stored.shape, torch.empty_like(stored, device="meta").stride()
    else:
        stored_shape, stored_stride = (shape, stride) if stored is x else (stored.shape, stored.stride())
    if kind is not None and _needs_preparing(prepared):
        _remember(_PREPARED_QUANTIZE, kind, prepare_repeated_quantize(x, config))
    return PackedTensor(payload, meta, shape, stride, stored_shape, stored_stride, dtype, bits, config.group_size,
                        scheme, stochastic, channels)


def _channel_statistics(x: torch.Tensor) -> torch.Tensor:
    """float32 [C, 2]: (minimum, scale) of each index of dim 1, for ``quantize_with(standardize="channels")``.

    The kernels pack ``(x - minimum) * (1 / scale) + 1``, with ``scale`` the channel's standard deviation:
    every value is at least 1, so each group is one-signed and gets the plain [min, max] grid, with
    none of the levels the sign rule would spend on a zero that is not special here. A channel's
    minimum maps to exactly 1, which decodes exactly in any group holding it, so minimums (and constant
    channels, scale 1) restore exactly. A channel holding NaN or Inf gets non-finite statistics and
    restores as non-finite.
    """
    reduce_dims = [d for d in range(x.dim()) if d != 1]
    # torch accumulates a variance in float32 and rounds it to the input's dtype. fp16 squares overflow, so
    # an fp16 tensor is widened first (a transient float32 copy). bf16 has float32's range and is read as
    # it is: rounding its variance to bf16 moves the map by a fraction of a percent, where a float32 copy
    # would write and read again twice the tensor's bytes.
    var = torch.var(x.float() if x.dtype == torch.float16 else x, dim=reduce_dims, correction=0).float()
    scale = torch.where(var == 0, 1.0, var.sqrt())  # (NaN stays NaN: a NaN compares unequal to 0)
    return torch.stack([torch.amin(x, dim=reduce_dims).float(), scale], dim=1)


def _channel_stride(x: torch.Tensor) -> int:
    """Elements between consecutive channels in the flat run of dense ``x``: element i of the run is
    in channel ``(i // stride) % C``."""
    return x.stride(1) if x.shape[1] > 1 else 1


def dequantize(packed: PackedTensor, *, backend: str = "auto") -> torch.Tensor:
    """Restore a ``PackedTensor``: same shape, dtype and device; the same strides for dense and
    broadcast inputs, dense strides in the same dimension order for inputs that had gaps."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"dequantize expects a tritonquant.PackedTensor, got {type(packed).__name__}")
    kind = None
    if packed.meta is not None and packed.channels is None:
        # (As in quantize_checked: a kind restored before launches what the first of its kind worked out.)
        device = packed.payload.device
        kind = (packed.stored_shape, packed.stored_stride, packed.dtype, device, packed.bits, packed.group_size,
                backend)
        prepared = _PREPARED_DEQUANTIZE.get(kind, _NOT_SEEN)
        if prepared is not None and prepared is not _NOT_SEEN:
            out = torch.empty_strided(kind[0], kind[1], dtype=kind[2], device=device)
            if dequantize_repeated(packed.payload, packed.meta, out, prepared):
                return out if kind[0] == packed.shape else out.expand(packed.shape)
        elif prepared is None:
            kind = None
    out, _ = _decode_stored(packed, resolve_backend(backend, packed.device), None)
    if kind is not None and _needs_preparing(prepared):
        _remember(_PREPARED_DEQUANTIZE, kind, prepare_repeated_dequantize(packed, out, backend))
    if out.shape != packed.shape:
        out = out.expand(packed.shape)
    return out


def dequantize_activated(packed: PackedTensor, activation: str, *,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(``dequantize(packed)``, ``activation`` of it): "gelu", "gelu_tanh" or "silu", as ``F.gelu`` and
    ``F.silu`` compute it, in the decoded tensor's layout. The Triton backend writes both in one pass,
    its activation within a few float32 ulps of torch's (kernels/dequantize.py); the torch backend
    applies torch's. ``packed``: a float tensor's packing, stored at its own shape (not broadcast)."""
    if activation not in kernels.ACTIVATIONS:
        raise ValueError(f"activation must be one of {kernels.ACTIVATIONS}, got {activation!r}")
    if packed.meta is None or packed.stored_shape != packed.shape:
        raise ValueError("dequantize_activated needs the packing of a float tensor stored at its own shape")
    return _decode_stored(packed, resolve_backend(backend, packed.device), activation)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation`` of a decoded tensor, as torch computes it (what ``dequantize_activated`` gives)."""
    return kernels.torch_activation(x, activation)


def _decode_stored(packed: PackedTensor, backend: str,
                   activation: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the stored tensor, at ``packed.stored_shape``; with ``activation``, that activation of it, else None)."""
    device = packed.device
    out = torch.empty_strided(packed.stored_shape, packed.stored_stride, dtype=packed.dtype, device=device)
    activated = torch.empty_like(out) if activation is not None else None  # (``out`` is dense: same strides)
    # (One pair of statistics, "shift" or a dimension 1 of size 1, is every element's: stride 1.)
    channels = packed.channels
    channel_stride = _channel_stride(out) if channels is not None and channels.shape[0] > 1 else 1
    with _on_device(device):  # (``out`` is dense: the launchers write it as its run of memory)
        if packed.meta is None:
            _UNPACK_BOOL[backend](packed.payload, out)
        elif activation is None:
            _DEQUANTIZE[backend](packed.payload, packed.meta, out, packed.bits, packed.group_size,
                                 packed.channels, channel_stride)
        else:
            _DEQUANTIZE[backend](packed.payload, packed.meta, out, packed.bits, packed.group_size,
                                 packed.channels, channel_stride, activation, activated)
    return out, activated


# -- packings repeated call after call ------------------------------------------------------------------
# Every layer packs and restores tensors of the same kinds in every step, eagerly (the pack and unpack
# hooks) as in compiled graphs (traced.pack_saved, unpack_saved). Through the full path, each call works
# out again what the last step's call of its kind did: backend, layout, tuned tile, launch plan. So the
# first call of a kind also works its launch out for the calls after it (these functions), which launch
# that (quantize_checked, dequantize). docs/benchmarks.md has the host time they take off.

# kind -> what prepare_repeated_quantize / prepare_repeated_dequantize returned (None: never repeated)
_PREPARED_QUANTIZE: dict[tuple, kernels.PreparedQuantize | None] = {}
_PREPARED_DEQUANTIZE: dict[tuple, kernels.PreparedDequantize | None] = {}
_NOT_SEEN = object()
# Kinds remembered at most, per table: shapes that change every step start the table again.
MAX_PREPARED = 4096


def _needs_preparing(prepared: object) -> bool:
    """Whether a kind whose call just took the full path should have its launch worked out (again):
    when it was not seen before, or was prepared before the tuned configs changed. A prepared launch
    refused for this call alone (an input not 16-byte aligned, no plan yet) is kept. Nothing is
    remembered while ``use_config`` forces a tile: the forced tile would outlive the block."""
    generation = config_generation()
    return generation is not None and (prepared is _NOT_SEEN or prepared.generation != generation)


def _remember(table: dict, kind: tuple, prepared: object) -> None:
    if len(table) >= MAX_PREPARED:
        table.clear()
    table[kind] = prepared


def prepare_repeated_quantize(x: torch.Tensor, config: QuantConfig) -> kernels.PreparedQuantize | None:
    """``quantize_checked(x, config)``'s launch, worked out for a caller that packs tensors of ``x``'s
    dtype, shape, strides and device with ``config`` again and again (``quantize_repeated``). None where
    there is nothing to prepare: the torch backend, stochastic rounding (new numbers every call), a bool
    tensor, a layout that is not one gap-free run of memory (read as runs, or copied, each call), or
    the kernels' own reasons (``kernels.prepare_quantize``)."""
    if (config.stochastic or x.dtype not in FLOAT_DTYPES or not is_dense(x)
            or resolve_backend(config.backend, x.device) != "triton"):
        return None
    return kernels.prepare_quantize(x, config.bits, config.group_size, config.scheme == "sigma")


def quantize_repeated(x: torch.Tensor,
                      prepared: kernels.PreparedQuantize) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(payload, meta) of ``x`` as ``quantize_checked`` packs them, launched from ``prepared``
    (``prepare_repeated_quantize`` for a tensor like ``x``). None, packing nothing, where the full path
    must run: ``x`` on a CUDA device other than the current one, or ``kernels.quantize_prepared``'s
    reasons (alignment, a tuning since, no plan yet)."""
    device = x.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return None
    return kernels.quantize_prepared(x, prepared)


def prepare_repeated_dequantize(packed: PackedTensor, out: torch.Tensor,
                                backend: str) -> kernels.PreparedDequantize | None:
    """``dequantize(packed, backend=backend)``'s launch, worked out for a caller that restores packings
    like ``packed`` again and again (``dequantize_repeated``); ``out``: the tensor it decoded into (at
    ``packed.stored_shape``, before any broadcast). None for bool and standardized packings, the torch
    backend, and the kernels' own reasons (``kernels.prepare_dequantize``)."""
    if (packed.meta is None or packed.channels is not None or out.shape != packed.stored_shape
            or resolve_backend(backend, out.device) != "triton"):
        return None
    return kernels.prepare_dequantize(out, packed.meta.shape[0], packed.bits, packed.group_size)


def dequantize_repeated(payload: torch.Tensor, meta: torch.Tensor, out: torch.Tensor,
                        prepared: kernels.PreparedDequantize) -> bool:
    """Decode ``payload`` and ``meta`` into ``out`` (dense, of the dtype, shape and strides ``prepared``
    was made for) as ``dequantize`` does, launched from ``prepared``. False, launching nothing, where the
    full path must run (as for ``quantize_repeated``)."""
    device = out.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return False
    return kernels.dequantize_prepared(payload, meta, out, prepared)


def encode_pool_indices(indices: torch.Tensor, windows: kernels.PoolWindows, backend: str = "auto") -> torch.Tensor:
    """int64 max-pooling indices (dense, any dimension order) -> uint8 window positions, in memory order
    (docs/format.md; ``tritonquant.pool_indices.pool_windows`` gives ``windows``). Lossless."""
    backend = resolve_backend(backend, indices.device)
    if backend == "triton" and not pool_kernels.fits_kernels(indices):
        backend = "torch"  # (2**31 indices and more: 16 GB of them, beyond the kernels' 32-bit arithmetic)
    with _on_device(indices.device):
        return _ENCODE_POOL[backend](indices, windows)


def decode_pool_indices(codes: torch.Tensor, windows: kernels.PoolWindows, shape: torch.Size,
                        stride: tuple[int, ...], backend: str = "auto") -> torch.Tensor:
    """Inverse of ``encode_pool_indices``: the int64 indices, of ``shape`` and ``stride`` (dense)."""
    out = torch.empty_strided(shape, stride, dtype=torch.int64, device=codes.device)
    backend = resolve_backend(backend, codes.device)
    if backend == "triton" and not pool_kernels.fits_kernels(out):
        backend = "torch"
    with _on_device(codes.device):
        _DECODE_POOL[backend](codes, windows, out)
    return out


def _check_input(x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"x.dtype must be one of {allowed}; got {str(x.dtype).replace('torch.', '')}")
    if x.device.type == "meta":
        raise ValueError("x is on the meta device and holds no data to quantize")


def _rng_for(config: QuantConfig, n_elements: int, device: torch.device,
             stream: RandomStream | None = None) -> tuple[int, int]:
    """(seed, first counter) for one quantize call of ``n_elements``."""
    if not config.stochastic:
        return 0, 0
    if config.seed is not None:
        if stream is None:
            return config.seed, 0
        if stream.seed != config.seed:
            raise ValueError(f"stream has seed {stream.seed}, the config {config.seed}")
        return stream.reserve(kernels.philox_counters(n_elements, config.group_size))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _warn_stochastic_capture()
    return _stream.reserve(kernels.philox_counters(n_elements, config.group_size))


def _warn_stochastic_capture() -> None:
    # The seed and counter are kernel arguments, fixed when the graph is captured.
    warnings.warn(
        "stochastic rounding inside a CUDA graph capture: the random stream's seed and counter are fixed at "
        "capture, so every replay rounds with the same random numbers, which are then no longer independent "
        "from step to step. Use nearest rounding (stochastic=False, the default) in captured steps.",
        RuntimeWarning, stacklevel=4,
    )


def _packing_layout(x: torch.Tensor, group_size: int, read_runs: bool) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """(what gets packed, its runs): ``x`` itself when it is contiguous or channels_last (the common
    case, two cheap checks); otherwise broadcast dimensions collapsed and, if gaps remain, either the
    same view with the runs the quantize kernels read where they lie (``read_runs``, and
    ``launch.strided_runs`` finds runs of whole groups), or a dense copy that keeps the dimension order."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x, None
    stored = _collapse_broadcast(x.detach())  # (autograd has no business with these views and copies)
    if is_dense(stored):
        return stored, None
    runs = readable_runs(stored, group_size) if read_runs else None
    if runs is not None:
        return stored, runs
    return torch.empty_like(stored).copy_(stored), None


def _collapse_broadcast(x: torch.Tensor) -> torch.Tensor:
    """View of ``x`` with every stride-0 dimension of size > 1 narrowed to size 1."""
    for dim, (size, stride) in enumerate(zip(x.shape, x.stride())):
        if stride == 0 and size > 1:
            x = x.narrow(dim, 0, 1)
    return x


def is_dense(x: torch.Tensor) -> bool:
    """True when the elements of ``x`` fill one gap-free, non-overlapping run of its storage."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


_ALREADY_CURRENT = contextlib.nullcontext()


def _on_device(device: torch.device):
    """Make ``device`` current while launching: autograd's thread may sit on another GPU.

    A no-op when it already is (the common case, checked without building a device guard)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _ALREADY_CURRENT
    return torch.cuda.device(device)
