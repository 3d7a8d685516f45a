"""compress() and attach(): saved-tensor hooks that pack activations in forward and restore them in backward.

    with tq.compress(bits=4) as session:      # every tensor autograd saves inside the block is packed
        loss = model(batch)
    loss.backward()                           # unpacked here, outside the block
    print(session.report())

    handle = tq.attach(model, bits=4)         # every forward of `model` compressed, until handle.detach()

Nesting: saved-tensor hooks form a stack and the innermost wins. A ``compress`` block entered inside
another, or an attached module running inside a ``compress`` block, decides for the tensors saved
while it is active; the outer one sees none of them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
import threading
import warnings
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from . import traced
from .autobits import NORMALIZATION_TYPES, PLANS, Calibration, Plan, Probe, ProbeTensor, Slot, fallback_bits
from .codec import (RandomStream, activate, decode_pool_indices, dequantize, dequantize_activated, encode_pool_indices,
                    is_dense, quantize_checked)
from .config import CompressConfig, QuantConfig
from .offload import OffloadedPacked, Offloader
from .packed import PackedTensor
from .pool_indices import PoolWindows, pool_windows
from .policy import (MAX_POOL_SPATIAL_DIMS, activation_output, cast_source, is_frozen_weight_cast, is_row_statistic,
                     is_sensitive, narrow_index_dtype, pass_reason, producer, recastable, standardize_kind, standardization,
                     unpacking_for_metadata_only, weight_cast_source)

OUTSIDE_MODULES = "(outside modules)"
# What an override lookup returns when no override pattern matched (None means one matched: keep).
_NO_MATCH = object()
_UNCACHED = object()
# Attention saves the query, key and value, then its output and log-sum-exp, in some order: the query is
# among the last four saves before the log-sum-exp (``policy.is_row_statistic``).
RECENT_SHAPES = 4


@dataclass
class ModuleStats:
    """What one module saved during the forward pass."""

    type_name: str
    packed_tensors: int = 0
    passed_tensors: int = 0
    raw_bytes: int = 0
    packed_bytes: int = 0
    passed_bytes: int = 0
    bits: set = field(default_factory=set)


@dataclass
class Stats:
    """Byte and tensor counts of one ``compress`` block (or of an attached model's latest forward).

    raw_bytes: bytes the packed tensors held before packing (each storage view counted once per
        packing: twice for one packed at two widths, for savers that asked for both; ``overrides``).
    packed_bytes: bytes they hold packed (payload plus metadata).
    passed_bytes: bytes of the storages of saved tensors kept as they were, each counted once;
        parameters and buffers excluded (the model holds them anyway: they cost the step nothing).
        Max-pooling indices, kept exactly in fewer bits, count the bytes they are kept in. Casts of
        trainable parameters cost nothing when cast again in backward (``recast_weights``); kept,
        they are counted with the parameters, not here. Casts of frozen parameters are counted here.
    passed_by_reason: tensor counts per pass-through reason (see ``policy.REASONS``).
    deduplicated: saves that reused a tensor already packed in this block.
    offloaded_bytes: packed bytes moved to host memory (``offload="cpu"``, CUDA tensors only).
    """

    raw_bytes: int = 0
    packed_bytes: int = 0
    packed_tensors: int = 0
    passed_tensors: int = 0
    passed_bytes: int = 0
    deduplicated: int = 0
    offloaded_bytes: int = 0
    passed_by_reason: Counter = field(default_factory=Counter)
    modules: dict[str, ModuleStats] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """raw_bytes / packed_bytes (1.0 when nothing was packed)."""
        return self.raw_bytes / self.packed_bytes if self.packed_bytes else 1.0


class _Packed:
    """What autograd holds instead of a packed tensor: one per storage, however many ops saved it."""

    __slots__ = ("packed", "backend", "source", "log_probabilities", "calibration_record", "saves", "unpacked",
                 "decoded", "__weakref__")

    def __init__(self, packed: PackedTensor | OffloadedPacked, backend: str, source: torch.Tensor,
                 log_probabilities: bool = False) -> None:
        self.packed = packed
        self.backend = backend
        # A log_softmax output, or a cast or view of one: what nll_loss saves, and reads for its shape
        # alone in backward (``_unread``).
        self.log_probabilities = log_probabilities
        self.calibration_record = None  # bits="auto" calibration: which modules saved this tensor
        # Weak: only used to tell whether a cache hit could be a reused address (see Session._pack).
        self.source = weakref.ref(source)
        self.saves = 1  # the ops that saved it (Session._pack's deduplication adds the others)
        self.unpacked = 0  # unpacks in this backward pass (_decode)
        self.decoded: torch.Tensor | None = None  # kept for the next saver's unpack (_decode)

    @property
    def description(self) -> PackedTensor:
        """The packing's settings and layout (bits, shape, strides, standardization), wherever its data
        lives: on the device, or in host memory (offload)."""
        packed = self.packed
        return packed if isinstance(packed, PackedTensor) else packed.host

    def layout(self) -> tuple[torch.Size, tuple[int, ...], torch.dtype, torch.device]:
        """(shape, strides, dtype, device) of what ``_decode`` restores."""
        description = self.description
        return description.shape, description.stride, description.dtype, self.packed.device


class _PackedView:
    """Another view of the memory a ``_Packed`` holds (same start, same elements, other shape or
    strides), saved by another op: attention saves its output as [batch, heads, seq, head_dim] and the
    output projection saves the same memory as [batch, seq, dim]. Restored as that view of the decoded
    tensor, which fills the same run of memory in the same order (dense tensors restore their strides)."""

    __slots__ = ("base", "shape", "stride")

    def __init__(self, base: _Packed, t: torch.Tensor) -> None:
        self.base = base
        self.shape, self.stride = t.shape, t.stride()

    def restore(self) -> torch.Tensor:
        decoded = _decode(self.base)
        return decoded.as_strided(self.shape, self.stride, decoded.storage_offset())


class _Recomputed:
    """The output of a GELU or SiLU (or a view of it), saved by the next layer, computed again in backward
    from the packing of the activation's input (``policy.activation_output``), which the activation saved
    for its own gradient. The two savers' unpacks share one pass: the layer after the activation runs
    its backward first, and its unpack decodes the input and computes the output together
    (``codec.dequantize_activated``); ``_decode`` keeps the decoded input for the activation's."""

    __slots__ = ("base", "activation", "view")

    def __init__(self, base: _Packed, activation: str, t: torch.Tensor, out: torch.Tensor) -> None:
        self.base = base
        self.activation = activation  # ("gelu", "gelu_tanh" or "silu")
        # (The output itself has its input's layout, which the packing restores: no view needed for it.)
        self.view = None if t is out else (t.shape, t.stride(), t.storage_offset())

    def restore(self) -> torch.Tensor:
        out = _decode_activated(self.base, self.activation)
        return out if self.view is None else out.as_strided(*self.view)


class _CastOfPacked:
    """A dtype cast of a packed tensor (``policy.cast_source``), saved by another op: restored as that
    cast of the packed tensor's decoding. A widening cast (bf16 to float32) holds no more than the
    packed tensor did, so its own packing would keep the same information twice. The decoded tensor
    is shared with the packed tensor's own savers (``_decode``)."""

    __slots__ = ("base", "dtype")

    def __init__(self, base: _Packed, dtype: torch.dtype) -> None:
        self.base = base
        self.dtype = dtype

    def restore(self) -> torch.Tensor:
        if self.base.log_probabilities and unpacking_for_metadata_only():
            return _unread(self)  # (nll_loss's float32 copy of CUDA autocast's log-probabilities)
        return _decode(self.base).to(self.dtype)  # (a dense tensor's cast keeps its strides)

    def layout(self) -> tuple[torch.Size, tuple[int, ...], torch.dtype, torch.device]:
        shape, stride, _, device = self.base.layout()
        return shape, stride, self.dtype, device


class _Kept:
    """A tensor passed through unchanged, with its version to detect in-place changes before backward."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        # Detached (same storage, same version counter): a saved output held with its grad_fn closes a
        # cycle (tensor -> grad_fn -> this object -> tensor) through autograd's C++ graph, which
        # Python's collector cannot break, so a graph dropped without backward would never be freed.
        # (Leaves, parameters among them, have no grad_fn to close one.)
        self.tensor = tensor.detach() if tensor.grad_fn is not None else tensor
        self.version = tensor._version


class _NarrowedIndices:
    """Max-pooling indices stored losslessly in a narrower integer type (``policy.narrow_index_dtype``)."""

    __slots__ = ("narrow", "dtype", "__weakref__")

    def __init__(self, t: torch.Tensor, narrow_dtype: torch.dtype) -> None:
        self.narrow = t.detach().to(narrow_dtype)  # (same strides: max-pooling indices are dense)
        self.dtype = t.dtype

    def restore(self) -> torch.Tensor:
        return self.narrow.to(self.dtype)


class _WindowIndices:
    """Max-pooling indices stored exactly as 1-8 bit positions inside their windows (``pool_indices``)."""

    __slots__ = ("codes", "windows", "shape", "stride", "backend", "__weakref__")

    def __init__(self, t: torch.Tensor, windows: PoolWindows, backend: str) -> None:
        self.codes = encode_pool_indices(t.detach(), windows, backend)
        self.windows = windows
        self.shape, self.stride = t.shape, t.stride()
        self.backend = backend

    def restore(self) -> torch.Tensor:
        return decode_pool_indices(self.codes, self.windows, self.shape, self.stride, self.backend)


class _RecastWeight:
    """A dtype cast of a parameter (autocast's weight copy, or a view of it), made again in backward.

    Holds the parameter, which its module keeps alive anyway, instead of the copy
    (``policy.weight_cast_source``); the parameter's version and address tell whether it still holds
    what was cast. One handle serves every save of the same cast in a block (``saves``): a layer run
    several times in one forward (a loop, shared weights) saves autocast's one cached copy each time,
    and backward then casts once, not once per save. That cast is held from the first of those
    unpacks to the last (exact training holds its copy from forward on).
    """

    __slots__ = ("param", "dtype", "view", "version", "address", "saves", "_cast", "_unpacked", "__weakref__")

    def __init__(self, param: torch.Tensor, dtype: torch.dtype, view: tuple | None) -> None:
        self.param = param
        self.dtype = dtype
        self.view = view  # (``view_of`` the saved tensor)
        self.version = param._version
        self.address = param.untyped_storage().data_ptr()
        self.saves = 1
        self._cast: torch.Tensor | None = None
        self._unpacked = 0

    @staticmethod
    def view_of(t: torch.Tensor) -> tuple | None:
        """(sizes, strides, offset) of a saved view of the cast; None when the cast itself was saved."""
        return None if t._base is None else (t.shape, t.stride(), t.storage_offset())

    def restore(self) -> torch.Tensor:
        param = self.param
        if param._version != self.version or param.untyped_storage().data_ptr() != self.address:
            raise RuntimeError(
                f"a parameter [{param.type()} {list(param.shape)}] that autocast cast to {self.dtype} in "
                "forward changed before backward (modified in place, or its storage replaced, as FSDP "
                "does when it gathers parameters again), so tritonquant cannot cast it again for backward. "
                "Modify parameters after backward, or pass recast_weights=False to compress()/attach() to "
                "keep the casts from forward to backward, as exact training does."
            )
        cast = self._cast
        if cast is None:
            cast = param.detach().to(self.dtype)
            if self.view is not None:
                cast = cast.as_strided(*self.view)
        # Kept until the last save is unpacked. (The count starts again for a second backward through a
        # retained graph; casts are deterministic, so a cast made again is the same cast.)
        self._unpacked += 1
        if self._unpacked < self.saves:
            self._cast = cast
        else:
            self._cast, self._unpacked = None, 0
        return cast


# What the pack hook returns for autograd to hold, and the unpack hook restores.
_Handle = (_Packed | _PackedView | _Recomputed | _CastOfPacked | _Kept | _NarrowedIndices | _WindowIndices
           | _RecastWeight | ProbeTensor)


def _view_key(t: torch.Tensor) -> tuple:
    """The deduplication key of ``t`` as a view: storage, offset, shape, strides, dtype and version."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t._version


def _dedup_key(t: torch.Tensor) -> tuple:
    """The key a plain packing of ``t`` is filed and found under. A dense tensor's packing is the run of
    memory it fills, in memory order, so it goes by that run (its first element's address, element
    count, dtype, version) and serves every view of it (``_PackedView``); any other tensor goes by its
    view."""
    if t.is_contiguous() or is_dense(t):
        return t.data_ptr(), t.numel(), t.dtype, t._version
    return _view_key(t)


def _standardized(key: tuple, kind: str) -> tuple:
    """The deduplication key of a packing of the tensor whose view key (``_view_key``) is ``key``,
    standardized as its ``policy.standardize_kind`` ``kind`` may be."""
    return key + ("standardized", kind)


def _serves(packed: PackedTensor, bits: int, kind: str | None) -> bool:
    """Whether ``packed``, made for one saver, may stand for a tensor another saver asks to get at
    ``bits`` and of ``policy.standardize_kind`` ``kind``: as many bits or more (a bool packing is
    lossless), and standardized (zero not exact, signs not kept) only where that saver's tensor may
    be standardized too."""
    if packed.meta is None:
        return True
    return packed.bits >= bits and (packed.channels is None or standardization(kind, packed.bits) is not None)


# The key, in an autograd node's ``metadata``, of {output number: (weak reference to the _Packed of that
# output, the output's version when packed)}: how an activation's output finds its input's packing
# (``Session._recompute``). Kept on the node, not in a table keyed by the node's Python object: that object
# is made afresh whenever no reference holds it, so its id() does not name the node.
_PACKINGS = "tritonquant.packings"


def _file_by_producer(t: torch.Tensor, handle: _Packed) -> None:
    """File ``handle``, a packing of ``t``, on the autograd node that made ``t`` (nothing for a tensor
    without one). Two live packings of one output at different versions (changed in place under no_grad,
    which leaves its node as it was) cannot be told apart from the node: the output is then filed as
    having none."""
    node = t.grad_fn
    if node is None:
        return
    packings = node.metadata.setdefault(_PACKINGS, {})
    filed = packings.get(t.output_nr)
    if filed is not None:
        ref, version = filed
        if ref is None:  # (already two versions)
            return
        if version != t._version and ref() is not None:
            packings[t.output_nr] = (None, None)
            return
    packings[t.output_nr] = (weakref.ref(handle), t._version)


def _filed_by_producer(node, output_nr: int) -> tuple[_Packed, int] | tuple[None, None]:
    """(the live packing filed on ``node`` for its output ``output_nr``, that output's version when it was
    packed) (``_file_by_producer``), else (None, None)."""
    filed = node.metadata.get(_PACKINGS, {}).get(output_nr)
    handle = filed[0]() if filed is not None and filed[0] is not None else None
    return (handle, filed[1]) if handle is not None else (None, None)


class _WeakTable:
    """A dict from keys to objects it does not keep alive: ``weakref.WeakValueDictionary``'s job, at a
    little over half its cost per entry (filed, looked up, dead).

    No callback runs when a value dies (WeakValueDictionary's removes the entry: a Python call per
    packed tensor in backward). A dead entry reads as missing, and the entries are swept whenever the
    table has doubled since the last sweep, so a block left open while many steps save and free
    tensors holds about twice as many entries as it has live values.
    """

    _MIN_SWEEP = 1024

    def __init__(self) -> None:
        self._refs: dict = {}
        self._sweep_at = self._MIN_SWEEP

    def get(self, key):
        ref = self._refs.get(key)
        return ref() if ref is not None else None

    def __setitem__(self, key, value) -> None:
        self._refs[key] = weakref.ref(value)
        if len(self._refs) >= self._sweep_at:
            self._refs = {k: ref for k, ref in self._refs.items() if ref() is not None}
            self._sweep_at = max(self._MIN_SWEEP, 2 * len(self._refs))

    def values(self) -> list:
        """The live values."""
        return [value for value in (ref() for ref in self._refs.values()) if value is not None]

    def __len__(self) -> int:
        """How many values are alive."""
        return len(self.values())


# Per backward thread: the _Packed whose decoded tensor is kept for its next saver (_decode).
_kept_decode = threading.local()


def _decode(handle: _Packed) -> torch.Tensor:
    """The tensor ``handle`` packed, decoded for one of the ops that saved it.

    A storage saved by several ops (a ReLU's output, saved by the ReLU and by the next convolution) is
    packed once and unpacked once per saver, and in backward those savers mostly run one right after
    the other (ResNet-50: 30 of its 36 second unpacks come next to the first). So the decoded tensor is
    kept for the handle's next saver until any other packed tensor is decoded: then it is dropped
    first. One decode instead of two in the common case, and a decoded tensor never outlives the next
    one. Never frees the packed data: retain_graph=True and grad_fn._saved_* may unpack again.
    """
    decoded = handle.decoded
    if decoded is None:
        decoded, _ = _decode_anew(handle, None)
    _count_unpack(handle, decoded)
    return decoded


def _decode_activated(handle: _Packed, activation: str) -> torch.Tensor:
    """``activation`` of the tensor ``handle`` packed, for a ``_Recomputed`` output; the decoded tensor
    itself is kept for the handle's other savers as ``_decode`` keeps it (the activation's own unpack
    among them). Computed in the decoding pass, unless a decoded tensor is kept already."""
    decoded = handle.decoded
    if decoded is None:
        decoded, activated = _decode_anew(handle, activation)
    else:
        activated = activate(decoded, activation)
    _count_unpack(handle, decoded)
    return activated


def _decode_anew(handle: _Packed, activation: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode ``handle`` (with ``activation`` of it, or None), after dropping the decoded tensor kept for
    another handle's next saver: a decoded tensor never outlives the next one (``_decode``)."""
    previous = getattr(_kept_decode, "handle", None)
    previous = previous() if previous is not None else None
    if previous is not None:
        previous.decoded = None
    _kept_decode.handle = None
    packed = handle.packed
    if isinstance(packed, OffloadedPacked):
        packed = packed.offloader.fetch(packed)
    if activation is None:
        return dequantize(packed, backend=handle.backend), None
    return dequantize_activated(packed, activation, backend=handle.backend)


def _unread(handle: _Packed | _CastOfPacked) -> torch.Tensor:
    """An uninitialized tensor of the layout ``handle`` restores, for log-probabilities (or a cast of
    them) unpacked by a backward node that reads them for their shape, dtype and device alone
    (``policy.unpacking_for_metadata_only``: nll_loss, whose other saves, the target and the weights,
    are not log-probabilities). Counted as one of the packing's unpacks (``_decode`` keeps a decoded
    tensor until the last). The allocation stays: nll_loss's CUDA backward makes its input contiguous,
    so a broadcast view of one element would be copied out to full size."""
    shape, stride, dtype, device = handle.layout()
    _count_unpack(handle if isinstance(handle, _Packed) else handle.base, None)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _count_unpack(handle: _Packed, decoded: torch.Tensor | None) -> None:
    """One more of ``handle``'s savers unpacked ``decoded`` (None: a stand-in, ``_unread``): keep it for
    the next one, if any is left."""
    handle.unpacked += 1
    if handle.unpacked < handle.saves:
        if decoded is not None:
            handle.decoded = decoded
            _kept_decode.handle = weakref.ref(handle)
    else:  # its last saver: nothing to keep (a second backward through a retained graph counts afresh)
        handle.decoded = None
        handle.unpacked = 0


class _PerModule:
    """A dict keyed by module identity that keeps no module alive.

    Keyed by ``id()`` alone, an entry would outlive its module and be read as a later module's: CPython
    gives a freed module's address to the next object of its size, such as a module built afresh each
    step, whose buffers would then never be registered (and be packed). Each entry holds a weak
    reference that tells whether its module is still the one it was filed for. Entries of freed modules
    are swept whenever the table has doubled since the last sweep (no weakref callback per module).
    """

    _MIN_SWEEP = 256

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}
        self._sweep_at = self._MIN_SWEEP

    def get(self, module: nn.Module, default: Any = None) -> Any:
        entry = self._entries.get(id(module))
        return entry[1] if entry is not None and entry[0]() is module else default

    def __contains__(self, module: nn.Module) -> bool:
        entry = self._entries.get(id(module))
        return entry is not None and entry[0]() is module

    def __setitem__(self, module: nn.Module, value: Any) -> None:
        self._entries[id(module)] = (weakref.ref(module), value)
        if len(self._entries) >= self._sweep_at:
            self._entries = {key: entry for key, entry in self._entries.items() if entry[0]() is not None}
            self._sweep_at = max(self._MIN_SWEEP, 2 * len(self._entries))

    def __bool__(self) -> bool:
        return bool(self._entries)


class _ModuleStack:
    """The modules running right now, innermost last, with their qualified names."""

    def __init__(self) -> None:
        self.frames: list[nn.Module] = []
        self.names = _PerModule()  # module -> qualified name
        self.all_names: dict[str, None] = {}  # every name given in this block (freed modules' too), in order
        self._root_prefixes: set[str] = set()

    def push(self, module: nn.Module) -> None:
        if not self.frames and module not in self.names:
            # A root module: name its whole tree once ("layer1.0.conv1"); the first root itself is "".
            # A later root of another tree (a block that runs model.encoder, then model.decoder; or G,
            # then D) is named by its class ("Sequential", then "Sequential_2"), and its tree under that
            # prefix ("Sequential_2.0"): its rows and override names must not merge with the first's.
            prefix = self._new_root_prefix(module) if self.names else ""
            if not prefix:  # (the first root is shown by its class name too: name_of)
                self._root_prefixes.add(type(module).__name__)
            for name, sub in module.named_modules():
                if _COMPILE_WRAPPED in name:  # (a submodule compiled on its own: "blocks.0._orig_mod")
                    name = ".".join(part for part in name.split(".") if part != _COMPILE_WRAPPED)
                if sub not in self.names:  # (one already named under an earlier root keeps that name)
                    qualified = f"{prefix}.{name}" if prefix and name else prefix or name
                    self.names[sub] = qualified
                    self.all_names[qualified] = None
        self.frames.append(module)

    def _new_root_prefix(self, module: nn.Module) -> str:
        prefix, n = type(module).__name__, 1
        while prefix in self._root_prefixes:
            n += 1
            prefix = f"{type(module).__name__}_{n}"
        self._root_prefixes.add(prefix)
        return prefix

    def pop(self, module: nn.Module) -> None:
        # Search from the top: a forward that raised may have left frames above it.
        for i in range(len(self.frames) - 1, -1, -1):
            if self.frames[i] is module:
                del self.frames[i:]
                return

    def name_of(self, module: nn.Module) -> str:
        name = self.names.get(module)
        return name if name else type(module).__name__

    def current(self) -> nn.Module | None:
        return self.frames[-1] if self.frames else None


class _ModuleStorages:
    """Storage addresses of the parameters and buffers of modules seen running, for ``pass_reason``.

    An address counts only while the tensor recorded there still owns it: FSDP2 frees each block's
    unsharded parameters after its forward, and the allocator hands those addresses to later
    activations, which would otherwise pass through unpacked as if they were parameters.
    """

    def __init__(self) -> None:
        self._owners: dict[int, list[weakref.ref]] = {}

    def add(self, tensor: torch.Tensor) -> None:
        self._owners.setdefault(tensor.untyped_storage().data_ptr(), []).append(weakref.ref(tensor))

    def __contains__(self, address: object) -> bool:
        for ref in self._owners.get(address, ()):
            owner = ref()
            if owner is not None and owner.untyped_storage().data_ptr() == address:
                return True
        return False


class Session:
    """One compression scope: the hooks, the stats, and the per-block deduplication table."""

    def __init__(self, config: CompressConfig, probe: Probe | None = None) -> None:
        self.config = config
        # autobits.calibrate: tensors that would be packed are kept exact in ``probe`` instead, to be
        # packed one module at a time on later backward passes.
        self._probe = probe
        self.stats = Stats()
        self._stack = _ModuleStack()
        self._module_tensors = _ModuleStorages()
        self._seen_modules = _PerModule()  # module -> True once its parameters and buffers are registered
        self._override_cache = _PerModule()  # module -> QuantConfig, None (keep) or _NO_MATCH
        self._quant_by_bits: dict[int, QuantConfig] = {}
        # Stochastic rounding with a fixed seed: one stream per seed for this block, so each packed
        # tensor draws its own random numbers (the block run again draws the same ones).
        self._seeded_streams: dict[int, RandomStream] = {}
        self._dedup = _WeakTable()
        # (id(param), version, dtype, view) -> the _RecastWeight of that cast, while a graph holds it.
        self._recasts = _WeakTable()
        self._slot_counts: Counter = Counter()
        self._cuda_devices: set[int] = set()
        self._kept_storages: set[int] = set()
        self._pool_inputs: dict[int, torch.Size] = {}  # max-pooling module id -> its input's shape, this forward
        self._recent_shapes: deque = deque(maxlen=RECENT_SHAPES)  # of the last tensors given to the pack hook
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._offloader = Offloader() if config.offload == "cpu" else None
        # recast_weights: once the model has run, autocast's cache is the last holder of its weight copies
        # (backward casts again), so the cache is cleared then (_release_weight_copies_after_model).
        self._release_weight_copies = config.recast_weights

    # -- scope ------------------------------------------------------------------------------------

    def __enter__(self) -> "Session":
        if self._hooks is not None:
            # A second entry would replace the first one's module hooks, and the first exit would leave
            # the saved-tensor hooks on for good.
            raise RuntimeError("this compress() block is already open; nest a new tq.compress(...) instead")
        _BLOCK_MODULE_HOOKS.add(self)
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        _BLOCK_MODULE_HOOKS.remove(self)
        if self.config.overrides and self._stack.all_names:
            _warn_unmatched_overrides(self.config.overrides, self._stack.all_names, stacklevel=3)

    def _open(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # Every device's peak: the block reports the peak of each device it packs on, which need not
            # be the current one. (Host bookkeeping in the allocator: no CUDA call, no context made.)
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
            self._cuda_devices.add(torch.cuda.current_device())
        # Hooks that torch.compile can trace into compiled regions where the settings allow (traced.py);
        # outside compiled regions they call this block's _pack and _unpack, as the plain ones do.
        traceable = self._probe is None and traced.traceable(self.config)
        pack, unpack = traced.hooks_for(self.config) if traceable else (self._pack, self._unpack)
        traced.push_session(self, traced=traceable)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._hooks.__enter__()

    def _close(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
            traced.pop_session(self)
        self._stack.frames.clear()

    def _on_module_enter(self, module: nn.Module, args: object) -> None:
        # Inside a region torch.compile is tracing, skip: Dynamo would otherwise trace this bookkeeping
        # (and fails on it). Saves of a compiled region are packed at run time, attributed to the
        # innermost module still running eagerly (docs/integrations/compile.md).
        if _compiling() or isinstance(module, fx.GraphModule):  # (GraphModule: what torch.compile runs)
            return
        module = _compiled_module_target(module)
        if not self._stack.frames and module in self._seen_modules:
            # The outermost module run again in this block (a model called twice, a cell in a loop): its
            # weight copies are needed again, and autocast's cache saves a cast per call from here on.
            self._release_weight_copies = False
        self._stack.push(module)
        if type(module) in MAX_POOL_SPATIAL_DIMS and args and isinstance(args[0], torch.Tensor):
            self._pool_inputs[id(module)] = args[0].shape
        if self.config.auto_budget is not None:
            calibration = self._auto_state()
            if isinstance(calibration, Calibration):
                calibration.enter(self._stack.name_of(module), module)
        if module not in self._seen_modules:
            self._seen_modules[module] = True
            # The module's own registries, as parameters(recurse=False) and buffers(recurse=False) would
            # list them, without their generator machinery: this runs for every module of every step.
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None:
                    self._module_tensors.add(tensor)

    def _on_module_exit(self, module: nn.Module, args: object, output: object) -> None:
        if _compiling() or isinstance(module, fx.GraphModule):
            return
        self._stack.pop(_compiled_module_target(module))
        self._release_weight_copies_after_model()

    def _release_weight_copies_after_model(self) -> None:
        """Clear autocast's cache once no module runs in this block, nor in an outer one.

        Autocast keeps its low-precision copy of each weight until the autocast region ends, which
        usually comes after the loss: GPT-2 small's 236 MB of copies are live at its loss, where a
        compressed step peaks. Backward casts again (recast_weights), so once the model has returned,
        the cache holds the only reference to them. (No device work; an empty cache costs a C call.)
        """
        if (self._release_weight_copies and not self._stack.frames
                and not any(block._stack.frames for block in _BLOCK_MODULE_HOOKS.blocks)):
            torch.clear_autocast_cache()

    # -- hooks ------------------------------------------------------------------------------------

    def _pack(self, t: torch.Tensor) -> _Handle:
        """The pack hook: what autograd holds instead of ``t`` until backward (``_Handle``)."""
        module = self._stack.current()
        reason = pass_reason(t, self._module_tensors, self.config.min_bytes)
        recent = self._recent_shapes
        if reason is None and t.grad_fn is None:
            if is_frozen_weight_cast(t, module):
                reason = "frozen"
            elif not t.is_contiguous() and not is_dense(t):
                # Saved by a compiled region run with these Python hooks (no autograd node; traced.py
                # packs inside the graph otherwise). Its backward asserts the strides of what it saved,
                # and a view with gaps is restored dense (q, k and v as views of one projection).
                reason = "compiled view"
            elif is_row_statistic(t, recent):
                reason = "statistics"
        recent.append(t.shape)
        override = self._override_for() if reason is None else _NO_MATCH
        if override is None:
            reason = "excluded"
        row = self._module_row(module)
        # (Integer tensors pass by dtype before any override is looked up; an override excluding the
        # pooling module keeps its indices whole too.)
        if reason == "dtype" and type(module) in MAX_POOL_SPATIAL_DIMS and self._override_for() is not None:
            narrowed = self._pack_pool_indices(t, module, row)
            if narrowed is not None:
                return narrowed
        if reason == "parameter" and self.config.recast_weights:
            recast = self._recast_weight(t, row)
            if recast is not None:
                return recast
        if reason is not None:
            return self._keep(t, row, reason)

        # A plain packing serves every saver of the same memory that asks for no more bits.
        key = _dedup_key(t)
        hit = self._dedup.get(key)
        if hit is not None and self._wide_enough(hit, override, t, None):  # (plain: no kind needed)
            reused = self._reuse(hit, module, t)
            if reused is not None:
                return reused
        made_by = producer(t)
        kind = standardize_kind(t, module, made_by)
        # A standardized packing (zero not exact, signs not kept) serves only savers that may standardize
        # too, and of the same view (the statistics are per index of dimension 1).
        if kind is not None:
            standardized_key = _standardized(_view_key(t), kind)
            hit = self._dedup.get(standardized_key)
            if hit is not None and self._wide_enough(hit, override, t, kind):
                reused = self._reuse(hit, module, t)
                if reused is not None:
                    return reused

        # (Slots name tensors for bits="auto" plans and calibration only: not counted otherwise.)
        slot = self._next_slot(module) if self.config.auto_budget is not None or self._probe is not None else None
        floor = self.config.sensitive_bits if is_sensitive(t, made_by) else 1
        quant, calibration = self._quant_config_for(slot, override, floor)
        if self._probe is not None and slot is not None and t.dtype != torch.bool and override is _NO_MATCH:
            probed = self._probe.add(t, self._stack.frames[0], slot, quant, floor, standardize_kind=kind)
            # (Filed as standardized when it may be: the probe's width, and so whether it standardizes,
            # is decided later, one module at a time.)
            self._dedup[standardized_key if kind is not None else key] = probed
            return probed
        if self.config.recompute_activations and kind is None and calibration is None:
            recomputed = self._recompute(t, quant, row)
            if recomputed is not None:
                return recomputed
        if calibration is None:
            cast = self._cast_of_packed(t, quant, kind)
            if cast is not None:
                return cast
        standardize = standardization(kind, quant.bits)
        packed = quantize_checked(t, quant, standardize=standardize, stream=self._seeded_stream(quant))
        handle = _Packed(packed, quant.backend, t, log_probabilities=kind == "log-probability")
        if calibration is not None:
            handle.calibration_record = calibration.record_tensor(
                slot, t, quant, isinstance(module, NORMALIZATION_TYPES), min_bits=floor, standardize_kind=kind)
        if self._offloader is not None and self._offloader.wants(packed):
            handle.packed = self._offloader.offload(packed)
            self.stats.offloaded_bytes += packed.nbytes
        self._dedup[standardized_key if standardize else key] = handle
        _file_by_producer(t, handle)  # (found by GELU and SiLU outputs, and by casts: _recompute, _cast_of_packed)
        if t.is_cuda:
            self._cuda_devices.add(t.get_device())  # (the index, without building a torch.device)
        self._count_packed(row, packed)
        return handle

    def _recompute(self, t: torch.Tensor, quant: QuantConfig, row: ModuleStats) -> _Recomputed | None:
        """A handle that computes ``t``, an activation's output, again in backward from the packing of the
        activation's input; None when ``t`` is no GELU or SiLU output, that output changed since the
        activation made it, or its input was not packed here as a whole, in ``t``'s layout and dtype, at
        ``quant.bits`` or wider, and not standardized (``t`` itself may not be: called for those only)."""
        found = activation_output(t)
        if found is None:
            return None
        input_node, output_nr, activation, out = found
        if out._version != 0:  # changed in place since (under no_grad, which leaves its node as it was)
            return None
        base, _ = _filed_by_producer(input_node, output_nr)
        if base is None:
            return None
        packed = base.description
        if (not _serves(packed, quant.bits, None) or packed.dtype != out.dtype
                or packed.shape != out.shape or packed.stride != out.stride() or packed.stored_stride != packed.stride
                or packed.stored_shape != packed.shape):
            return None
        base.saves += 1  # (so that _decode keeps the decoded input for the activation's own unpack)
        self._count_passed(row, "recomputed", 0)
        return _Recomputed(base, activation, t, out)

    def _cast_of_packed(self, t: torch.Tensor, quant: QuantConfig, kind: str | None) -> _CastOfPacked | None:
        """A handle that restores ``t``, a dtype cast of a tensor packed in this block, from that packing;
        None when ``t`` is no such cast, or the packing cannot stand for it: another device, shape or
        layout, fewer bits than ``t`` would get, standardized where ``t`` (of ``standardize_kind``
        ``kind``) may not be (its saver may read the signs and zeros a standardized packing does not
        keep), or the tensor or its cast changed since (in place under no_grad, which leaves their nodes
        as they were)."""
        found = cast_source(t)
        if found is None or t._version != 0:
            return None
        node, output_nr = found
        base, packed_version = _filed_by_producer(node, output_nr)
        if base is None or not isinstance(base.packed, PackedTensor):  # (an offloaded packing: not shared)
            return None
        source = base.source()
        packed = base.packed
        if (source is None or source._version != packed_version or not _serves(packed, quant.bits, kind)
                or packed.device != t.device or packed.shape != t.shape or packed.stride != t.stride()
                or packed.stored_shape != packed.shape or packed.stored_stride != packed.stride):
            return None
        base.saves += 1  # (so that _decode keeps the decoded tensor for the packed tensor's own savers)
        self.stats.deduplicated += 1
        return _CastOfPacked(base, t.dtype)

    def _recast_weight(self, t: torch.Tensor, row: ModuleStats) -> _RecastWeight | None:
        """A handle that casts the parameter ``t`` was cast from again in backward; None when ``t`` is not
        such a cast, is small, or its parameter may change before backward (``policy.recastable``)."""
        param = weight_cast_source(t)  # (None at once for parameters themselves: no grad_fn)
        if (param is None or t.untyped_storage().nbytes() < self.config.min_bytes
                or not recastable(param, self._stack.frames)):
            return None
        self._count_passed(row, "recast", 0)  # (held by its module anyway)
        # Saves of the same parameter, version, dtype and view are one cast: one handle.
        view = _RecastWeight.view_of(t)
        key = (id(param), param._version, t.dtype, view)
        handle = self._recasts.get(key)
        if handle is None:
            handle = self._recasts[key] = _RecastWeight(param, t.dtype, view)
        else:
            handle.saves += 1
        return handle

    def _keep(self, t: torch.Tensor, row: ModuleStats, reason: str) -> _Kept:
        """``t`` as it is, counted under ``reason`` (``policy.REASONS``)."""
        storage = t.untyped_storage()
        held = 0
        if reason != "parameter" and storage.data_ptr() not in self._kept_storages:
            # Count each kept storage once, however many ops save it. (An address can only be reused
            # after its tensor died; undercounting such a rare reuse is acceptable here.)
            self._kept_storages.add(storage.data_ptr())
            held = storage.nbytes()
        self._count_passed(row, reason, held)
        return _Kept(t)

    def _wide_enough(self, hit: _Packed | ProbeTensor, override, t: torch.Tensor, kind: str | None) -> bool:
        """Whether ``hit``, an earlier saver's packing of ``t``'s memory, has as many bits as this saver
        asks for (``_serves``; ``kind``: ``t``'s ``standardize_kind``). Only per-module ``overrides``
        make savers of one tensor ask for different widths (the floor for probabilities follows the
        tensor, not its saver); reusing a narrower packing would quietly weaken the wider request, so
        such a saver packs the tensor anew, and the savers after it find that packing. (bits="auto"
        decides widths per tensor already.)"""
        if not self.config.overrides or not isinstance(hit, _Packed) or self.config.auto_budget is not None:
            return True
        packed = hit.description
        if override is not _NO_MATCH:
            return _serves(packed, override.bits, kind)
        floor = self.config.sensitive_bits if is_sensitive(t, producer(t)) else 1
        return _serves(packed, max(self.config.quant.bits, floor), kind)

    def _reuse(self, hit: _Packed | ProbeTensor, module: nn.Module | None,
               t: torch.Tensor) -> _Packed | _PackedView | ProbeTensor | None:
        """An earlier saver's packing of the same memory, for one more saver, of ``t``: the packing itself
        for the same view, a ``_PackedView`` of it for another view. None when it cannot serve: its source
        is dead (its address may since have been reused), or it is a probe (bits="auto") of another view."""
        source = hit.source()
        if source is None:
            return None
        same_view = source is t or (source.shape == t.shape and source.stride() == t.stride())
        if not same_view and not isinstance(hit, _Packed):
            return None
        self.stats.deduplicated += 1
        if isinstance(hit, _Packed):
            hit.saves += 1
        calibration = self._auto_state() if hit.calibration_record is not None and module is not None else None
        if isinstance(calibration, Calibration):  # a second saver: its use of the tensor counts too
            calibration.add_saver(hit.calibration_record, self._stack.name_of(module))
        return hit if same_view else _PackedView(hit, t)

    def _pack_pool_indices(self, t: torch.Tensor, module: nn.Module,
                           row: ModuleStats) -> _WindowIndices | _NarrowedIndices | None:
        """Max-pooling indices, stored without loss as window positions (nn.MaxPool1d/2d/3d) or in
        int16/int32 (also adaptive pools); None for any other integer tensor."""
        input_shape = self._pool_inputs.get(id(module))
        narrow_dtype = narrow_index_dtype(t, module, input_shape)
        if narrow_dtype is None or t.untyped_storage().nbytes() < self.config.min_bytes or not is_dense(t):
            return None
        windows = pool_windows(module, input_shape)
        if windows is not None:
            handle = _WindowIndices(t, windows, self.config.quant.backend)
            held = handle.codes.nbytes
        else:
            handle = _NarrowedIndices(t, narrow_dtype)
            held = handle.narrow.nbytes
        # Counted as kept (exact), at the bytes held: the ratio stays a measure of quantization.
        self._count_passed(row, "narrowed", held)
        return handle

    def _count_packed(self, row: ModuleStats, packed: PackedTensor) -> None:
        """Count one packed tensor: its bytes before and after."""
        raw_nbytes, packed_nbytes = packed.raw_nbytes, packed.nbytes
        self.stats.packed_tensors += 1
        self.stats.raw_bytes += raw_nbytes
        self.stats.packed_bytes += packed_nbytes
        row.packed_tensors += 1
        row.raw_bytes += raw_nbytes
        row.packed_bytes += packed_nbytes
        row.bits.add(packed.bits)

    def _count_passed(self, row: ModuleStats, reason: str, held_bytes: int) -> None:
        """Count one saved tensor that was not quantized (``policy.REASONS``), and the bytes it holds."""
        self.stats.passed_by_reason[reason] += 1
        self.stats.passed_tensors += 1
        self.stats.passed_bytes += held_bytes
        row.passed_tensors += 1
        row.passed_bytes += held_bytes

    @staticmethod
    def _unpack(handle: _Handle) -> torch.Tensor:
        if isinstance(handle, (_PackedView, _Recomputed, _CastOfPacked, _WindowIndices, _NarrowedIndices,
                               _RecastWeight)):
            return handle.restore()
        if isinstance(handle, (_Kept, ProbeTensor)):
            t = handle.tensor
            if t._version != handle.version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: [{t.type()} {list(t.shape)}] is at version {t._version}; expected version "
                    f"{handle.version} instead. Hint: the tensor was saved inside a tritonquant compression "
                    "scope; modify a copy instead, or modify it after backward."
                )
            return t if isinstance(handle, _Kept) else handle.restore()
        if handle.log_probabilities and unpacking_for_metadata_only():
            return _unread(handle)
        return _decode(handle)

    # -- helpers ----------------------------------------------------------------------------------

    def _next_slot(self, module: nn.Module | None) -> Slot | None:
        """(module name, n) for the n-th new tensor (not a reuse) ``module`` saves in this block: how
        bits="auto" plans name a tensor. None outside modules."""
        if module is None:
            return None
        name = self._stack.name_of(module)
        n = self._slot_counts[name]
        self._slot_counts[name] = n + 1
        return name, n

    def _quant_config_for(self, slot: Slot | None, override,
                          floor: int) -> tuple[QuantConfig | None, Calibration | None]:
        """(settings for the tensor saved now in ``slot``, or None to keep it; the calibration to record
        it into).

        ``override`` decides if it matched; otherwise the block's width (or bits="auto"'s plan for the
        slot), raised to ``floor`` (``sensitive_bits`` for probabilities, ``policy.is_sensitive``).
        """
        if override is not _NO_MATCH:
            return override, None
        if self.config.auto_budget is None:
            bits = self.config.quant.bits
            return (self.config.quant if bits >= floor else self._quant_with_bits(floor)), None
        state = self._auto_state()
        if isinstance(state, Calibration):
            return self.config.quant, (state if slot is not None else None)
        bits = fallback_bits(self.config.auto_budget)
        if state is not None and slot is not None:
            bits = state.get(slot[0], {}).get(slot[1], bits)
        return self._quant_with_bits(max(bits, floor)), None

    def _override_for(self):
        """The override deciding for tensors saved now (a QuantConfig, or None: keep), else _NO_MATCH."""
        for frame in reversed(self._stack.frames) if self.config.overrides else ():
            decision = self._override_cache.get(frame, _UNCACHED)
            if decision is _UNCACHED:
                decision = self._match_override(frame)
                self._override_cache[frame] = decision
            if decision is not _NO_MATCH:
                return decision
        return _NO_MATCH

    def _auto_state(self) -> Calibration | Plan | None:
        """bits="auto": the plan (or calibration) of the outermost module running, None outside modules."""
        return PLANS.state(self._stack.frames[0], self.config.auto_budget) if self._stack.frames else None

    def _seeded_stream(self, quant: QuantConfig) -> RandomStream | None:
        """This block's stream for ``quant``'s seed; None without stochastic rounding or a seed."""
        if not quant.stochastic or quant.seed is None:
            return None
        stream = self._seeded_streams.get(quant.seed)
        if stream is None:
            stream = self._seeded_streams[quant.seed] = RandomStream(quant.seed)
        return stream

    def _quant_with_bits(self, bits: int) -> QuantConfig:
        quant = self._quant_by_bits.get(bits)
        if quant is None:
            quant = self._quant_by_bits[bits] = dataclasses.replace(self.config.quant, bits=bits)
        return quant

    def _match_override(self, module: nn.Module):
        name = self._stack.names.get(module, "")
        for key, quant in self.config.overrides:
            if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
                return quant
        for key, quant in self.config.overrides:
            if isinstance(key, type) and isinstance(module, key):
                return quant
        return _NO_MATCH

    def _module_row(self, module: nn.Module | None) -> ModuleStats:
        if module is None:
            name, type_name = OUTSIDE_MODULES, ""
        else:
            name, type_name = self._stack.name_of(module), type(module).__name__
        row = self.stats.modules.get(name)
        if row is None:
            row = self.stats.modules[name] = ModuleStats(type_name)
        return row

    def peak_memory_bytes(self) -> dict[int, int]:
        """Peak CUDA memory allocated per device since the block opened (empty on CPU)."""
        return {device: torch.cuda.max_memory_allocated(device) for device in sorted(self._cuda_devices)}

    def report(self) -> str:
        """A table: one row per module that saved tensors, with raw/packed MB, ratio and bits, plus totals."""
        from .report import format_report

        return format_report(self.stats, self.config, self.peak_memory_bytes())



class _BlockModuleHooks:
    """The global module hooks of the open ``compress`` blocks: one forward pre-hook and one forward
    hook, which call every open block in the order they opened, installed while any block is open and
    always under the same keys of torch's global hook dicts.

    torch.compile guards on those keys. With hooks registered anew per block, a model compiled inside
    one block was compiled again in every later block, and after Dynamo's ``recompile_limit`` (8) ran
    eagerly for good.
    """

    def __init__(self) -> None:
        self.blocks: tuple[Session, ...] = ()
        self.keys: tuple[int, int] | None = None  # (pre-hook key, hook key), from the first registration
        self.hooks = (self._enter, self._exit)  # (bound once: the same objects under the same keys)

    def add(self, block: Session) -> None:
        if not self.blocks:
            hooks = nn.modules.module
            if self.keys is None:
                pre = hooks.register_module_forward_pre_hook(self.hooks[0])
                post = hooks.register_module_forward_hook(self.hooks[1], always_call=True)
                self.keys = (pre.id, post.id)
            else:
                pre_key, post_key = self.keys
                hooks._global_forward_pre_hooks[pre_key], hooks._global_forward_hooks[post_key] = self.hooks
                hooks._global_forward_hooks_always_called[post_key] = True
        self.blocks += (block,)

    def remove(self, block: Session) -> None:
        self.blocks = tuple(b for b in self.blocks if b is not block)
        if not self.blocks and self.keys is not None:
            hooks = nn.modules.module
            pre_key, post_key = self.keys
            hooks._global_forward_pre_hooks.pop(pre_key, None)
            hooks._global_forward_hooks.pop(post_key, None)
            hooks._global_forward_hooks_always_called.pop(post_key, None)

    def _enter(self, module: nn.Module, args: object) -> None:
        for block in self.blocks:
            block._on_module_enter(module, args)

    def _exit(self, module: nn.Module, args: object, output: object) -> None:
        for block in self.blocks:
            block._on_module_exit(module, args, output)


_BLOCK_MODULE_HOOKS = _BlockModuleHooks()


def _warn_unmatched_overrides(overrides: tuple, names, stacklevel: int) -> None:
    """Warn about each name pattern of ``overrides`` that matches none of ``names`` (a typo would
    otherwise leave its modules at the block's settings without a word)."""
    names = [name for name in names if name]
    for key, _ in overrides:
        if isinstance(key, str) and not any(fnmatch.fnmatchcase(name, key) for name in names):
            examples = ", ".join(repr(name) for name in names[:3])
            warnings.warn(f"overrides pattern {key!r} matches no module name (names look like {examples}); "
                          f"it changes nothing", UserWarning, stacklevel=stacklevel)


# The attribute under which torch.compile(module)'s wrapper (OptimizedModule) holds the module it runs.
_COMPILE_WRAPPED = "_orig_mod"


def _compiled_module_target(module: nn.Module) -> nn.Module:
    """The module that ``torch.compile(module)``'s wrapper runs, else ``module``: the wrapper's call is
    the one module call of a compiled model that reaches the module hooks at run time, and its rows and
    names should read as for the model run eagerly (the model's class and "layer1.0", not
    "OptimizedModule" and "_orig_mod.layer1.0")."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (no wrapper exists before it is imported)
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return getattr(module, _COMPILE_WRAPPED)
    return module


def _compiling() -> bool:
    """True while torch.compile traces (always False at run time, so eager behaviour is unchanged)."""
    return torch.compiler.is_compiling()


# Models with an attached handle (held weakly on both sides: the handle holds its model, so a strong
# value would keep the entry alive for good): a second handle would sit inside the first one's block
# and take every tensor from it, silently.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class AttachHandle:
    """Compresses every forward of one model until ``detach()``.

    ``stats`` and ``report()`` cover the latest forward run with gradients enabled; forwards under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (evaluation) save nothing for backward, so they
    run without the hooks and leave both as they were. ``forwards`` counts the compressed forwards.
    """

    def __init__(self, model: nn.Module, config: CompressConfig) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        attached = _ATTACHED.get(model)
        if attached is not None and attached() is not None:
            raise RuntimeError("this model already has a tritonquant handle attached; call its detach() first")
        _warn_unmatched_overrides(config.overrides, (name for name, _ in model.named_modules()), stacklevel=4)
        _ATTACHED[model] = weakref.ref(self)
        self.model = model
        self.config = config
        self.forwards = 0
        self._session = Session(config)
        self._depth = 0
        self._compressing = False  # whether the current forward is compressed
        self._handles = [
            model.register_forward_pre_hook(self._enter_model),
            model.register_forward_hook(self._exit_model, always_call=True),
        ]
        for module in model.modules():
            self._handles.append(module.register_forward_pre_hook(self._track_enter))
            self._handles.append(module.register_forward_hook(self._track_exit, always_call=True))

    @property
    def session(self) -> Session:
        return self._session

    @property
    def stats(self) -> Stats:
        return self._session.stats

    # Opening and closing the hooks must happen at run time, not be traced: torch.compile breaks the
    # graph here and runs these two eagerly around the compiled forward.
    @torch.compiler.disable
    def _enter_model(self, module: nn.Module, args: object) -> None:
        self._depth += 1
        if self._depth == 1:
            self._compressing = torch.is_grad_enabled()
            if self._compressing:
                self.forwards += 1
                self._session = Session(self.config)
                self._session._open()

    @torch.compiler.disable
    def _exit_model(self, module: nn.Module, args: object, output: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._compressing:
            self._compressing = False
            self._session._close()
            self._session._release_weight_copies_after_model()

    def _track_enter(self, module: nn.Module, args: object) -> None:
        if self._compressing:
            self._session._on_module_enter(module, args)

    def _track_exit(self, module: nn.Module, args: object, output: object) -> None:
        if self._compressing:
            self._session._on_module_exit(module, args, output)

    def report(self) -> str:
        return self._session.report()

    def detach(self) -> None:
        """Remove every hook; later forwards run uncompressed. Tensors already packed still unpack."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._session._close()
        self._compressing = False
        attached = _ATTACHED.get(self.model)
        if attached is not None and attached() is self:
            del _ATTACHED[self.model]


def compress(**config) -> Session:
    """Context manager packing every tensor autograd saves inside the block.

    Keywords: ``bits``, ``scheme``, ``stochastic``, ``group_size``, ``seed``, ``backend`` (see
    ``QuantConfig``; ``bits="auto"`` with ``budget``), ``min_bytes``, ``overrides``, ``offload``,
    ``sensitive_bits``, ``recast_weights`` and ``recompute_activations`` (see ``CompressConfig``).
    """
    return Session(CompressConfig.from_kwargs(**config))


def attach(model: nn.Module, **config) -> AttachHandle:
    """Compress every forward of ``model`` (for trainers that own the loop). Same keywords as ``compress``."""
    return AttachHandle(model, CompressConfig.from_kwargs(**config))


traced.session_class = Session
