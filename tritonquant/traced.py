"""Saved-tensor hooks that torch.compile traces into the graphs it compiles.

A ``compress`` block's hooks are Python: autograd calls them for every tensor it saves. In a region
compiled with torch.compile, AOTAutograd then saves the region's tensors when its forward returns,
through those hooks, one Python call each (docs/integrations/compile.md). When both hooks on top of
autograd's hook stack are ``torch.fx.GraphModule``s, AOTAutograd does something better: it traces them
into the region's graphs, the pack hook after each saved tensor's producer in the forward graph and the
unpack hook before its first use in the backward graph. Inductor then schedules the packing like any
other kernel (a tensor's full-width memory is freed as soon as the forward is done with it) and no
Python hook runs per tensor.

So the hooks a block pushes are GraphModules (``_PackHook``, ``_UnpackHook``), one pair per setting of
what a compiled region packs (``hooks_for``): the same objects for every block with those settings, as
Dynamo's guard on the hooks compares their identity and a new pair would compile the model again.
Called by autograd outside a compiled region, they hand the tensor to the innermost open block
(``Session._pack``, ``Session._unpack``): eager mode is unchanged. Called by AOTAutograd while it
traces, they run their graph: ``trace_pack`` and ``trace_unpack``, which decide from the saved
tensor's dtype, size and layout, and from the graph node that made it, and emit the two custom ops
below.

What a compiled region packs: float and bool tensors of ``min_bytes`` or more in any layout but a
broadcast one (``restored_stride``), except parameters, tensors cast or viewed from the region's inputs
(autocast's weight copies) and per-row statistics (a softmax's max and sum, a normalization's mean and
rstd, attention's log-sum-exp), which eager blocks keep exact too. Probabilities (pieces of a softmax
or log-softmax that are not statistics) get at least ``sensitive_bits``, and what a softmax reads
(logits, which the compiled backward turns into probabilities again) at least
``SOFTMAX_INPUT_BITS``. Everything else is kept as it is. What eager blocks do beyond that needs the
autograd graph or Python at run time, so blocks that ask for it keep Python hooks (``traceable``):
per-module ``overrides``, ``bits="auto"``, ``offload``, and stochastic rounding with a fixed ``seed``.
"""

from __future__ import annotations

import operator
import threading
from typing import Any

import torch
import torch._inductor.config
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import kernels
from .codec import dequantize, quantize_checked
from .config import CompressConfig, QuantConfig
from .packed import PackedTensor

try:  # AOTAutograd's description of the saved tensor a hook is traced for (torch 2.11-2.13; private)
    from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context
    from torch._functorch._aot_autograd.graph_compile import _thread_local as _aot_thread_local
except ImportError:  # other torch versions: compiled regions call the Python hooks at run time, as before
    _get_saved_tensor_hook_context = _aot_thread_local = None

# The dtypes a compiled region packs, in the order their codes travel from pack to unpack.
PACKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool)
# Ops through which a saved tensor still is one of the region's inputs (a parameter, say), cast or viewed.
_CAST_AND_VIEW_OPS = frozenset({
    "convert_element_type", "_to_copy", "view", "_unsafe_view", "reshape", "t", "transpose", "permute",
    "expand", "alias", "slice", "select", "squeeze", "unsqueeze", "as_strided", "clone", "detach",
})


def traceable(config: CompressConfig) -> bool:
    """Whether a block with ``config`` can have its packing traced into compiled regions."""
    quant = config.quant
    return (_aot_thread_local is not None and not config.overrides and config.auto_budget is None
            and config.offload is None and not (quant.stochastic and quant.seed is not None))


# -- the custom ops ------------------------------------------------------------------------------------
# Defined with torch.library.Library rather than the torch.library.custom_op decorator: compiled code
# calls them once per saved tensor, and the decorator's wrappers cost about 21 us a call on this
# project's CPU, against 6 us for a plain registration (a call of an op that does nothing).
# The kernels only read their inputs and make new outputs: no autograd formula is needed, as saved
# tensors in compiled graphs never require grad.

# (The namespace is the package's name: "tritonquant", but benchmarks/host_ab.py loads a second copy of
# the package under another name, and one namespace can be defined once per process.)
_NAMESPACE = __name__.split(".")[0]
_LIBRARY = torch.library.Library(_NAMESPACE, "DEF")
_LIBRARY.define("pack_saved(Tensor x, int bits, int group_size, str scheme, bool stochastic, str backend) "
                "-> (Tensor, Tensor)")
_LIBRARY.define("unpack_saved(Tensor payload, Tensor meta, SymInt[] shape, SymInt[] stride, int dtype_code, "
                "int bits, int group_size, str scheme, str backend) -> Tensor")


_CONFIGS: dict[tuple, QuantConfig] = {}  # (bits, group_size, scheme, stochastic, backend) -> its QuantConfig


def pack_saved(x: torch.Tensor, bits: int, group_size: int, scheme: str, stochastic: bool,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``tritonquant::pack_saved``: (payload, meta) of ``x`` (dense; float32/float16/bfloat16 or bool), as
    ``tq.quantize`` packs it: uint8 [payload_nbytes] and float32 [n_groups, 2]; for bool, 1-bit codes
    and an empty [0, 2] meta. Counted in the innermost open block's stats."""
    config = _CONFIGS.get((bits, group_size, scheme, stochastic, backend))
    if config is None:
        config = _CONFIGS[bits, group_size, scheme, stochastic, backend] = QuantConfig(
            bits, scheme, stochastic, group_size, None, backend)
    packed = quantize_checked(x, config)
    session = _innermost_session()
    if session is not None:
        session._count_packed(session._module_row(session._stack.current()), packed)
    meta = packed.meta if packed.meta is not None else x.new_empty((0, 2), dtype=torch.float32)
    return packed.payload, meta


def _pack_saved_fake(x, bits, group_size, scheme, stochastic, backend):
    n = x.numel()
    if x.dtype == torch.bool:
        return x.new_empty(-(-n // 8), dtype=torch.uint8), x.new_empty((0, 2), dtype=torch.float32)
    return (x.new_empty(kernels.payload_nbytes(n, bits, group_size), dtype=torch.uint8),
            x.new_empty((-(-n // group_size), 2), dtype=torch.float32))


def unpack_saved(payload: torch.Tensor, meta: torch.Tensor, shape: list[int], stride: list[int], dtype_code: int,
                 bits: int, group_size: int, scheme: str, backend: str) -> torch.Tensor:
    """``tritonquant::unpack_saved``: the tensor ``pack_saved`` packed, at ``shape`` and ``stride``
    (dense), of ``PACKED_DTYPES[dtype_code]``."""
    dtype = PACKED_DTYPES[dtype_code]
    size, strides = torch.Size(shape), tuple(stride)
    if dtype == torch.bool:
        packed = PackedTensor(payload, None, size, strides, size, strides, dtype, 1, group_size, "bool", False)
    else:
        packed = PackedTensor(payload, meta, size, strides, size, strides, dtype, bits, group_size, scheme, False)
    return dequantize(packed, backend=backend)


def _unpack_saved_fake(payload, meta, shape, stride, dtype_code, bits, group_size, scheme, backend):
    return torch.empty_strided(shape, stride, dtype=PACKED_DTYPES[dtype_code], device=payload.device)


_LIBRARY.impl("pack_saved", pack_saved, "CompositeExplicitAutograd")
_LIBRARY.impl("unpack_saved", unpack_saved, "CompositeExplicitAutograd")
torch.library.register_fake(f"{_NAMESPACE}::pack_saved", _pack_saved_fake, lib=_LIBRARY)
torch.library.register_fake(f"{_NAMESPACE}::unpack_saved", _unpack_saved_fake, lib=_LIBRARY)
_OPS = getattr(torch.ops, _NAMESPACE)


# -- what the hooks' graphs call ------------------------------------------------------------------------

def trace_pack(x: torch.Tensor, bits: int, group_size: int, scheme: str, stochastic: bool, backend: str,
               min_bytes: int, sensitive_bits: int) -> Any:
    """The pack hook as traced for one saved tensor ``x`` (a fake tensor): ``x`` itself to keep it, else
    (payload, meta, shape, stride, dtype code, bits), which ``trace_unpack`` restores. Probabilities
    (what a softmax or log-softmax made) get at least ``sensitive_bits``, as in eager blocks."""
    context = _get_saved_tensor_hook_context()
    node = context.get("_node") if context else None
    if not _packable(x, min_bytes, node):
        return x
    stride = restored_stride(x)
    if stride is None:
        return x
    if _op_name(node.meta.get("original_aten")) in _PROBABILITY_OPS:
        bits = max(bits, sensitive_bits)
    elif _feeds_softmax(node):
        bits = max(bits, SOFTMAX_INPUT_BITS)
    payload, meta = _OPS.pack_saved(x, bits, group_size, scheme, stochastic, backend)
    return payload, meta, tuple(x.shape), stride, PACKED_DTYPES.index(x.dtype), bits


def trace_unpack(packed: Any, group_size: int, scheme: str, backend: str) -> torch.Tensor:
    """The unpack hook as traced: what ``trace_pack`` returned, restored."""
    if isinstance(packed, torch.Tensor):
        return packed
    payload, meta, shape, stride, dtype_code, bits = packed
    return _OPS.unpack_saved(payload, meta, list(shape), list(stride), dtype_code, bits, group_size, scheme, backend)


# Ops made of several in the compiled graph (Inductor's decompositions), whose saved pieces with a last
# dimension of 1 are per-row statistics: a softmax's max and sum, a normalization's mean and rstd.
_STATISTIC_OPS = frozenset({"_softmax", "_log_softmax", "native_layer_norm", "native_batch_norm",
                            "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                            "native_group_norm", "_fused_rms_norm"})
_PROBABILITY_OPS = frozenset({"_softmax", "_log_softmax"})
# The width of what a softmax or log-softmax reads (logits, attention scores), where a compiled region
# saves it: its backward then computes the probabilities again from it and the rows' saved max and sum
# (Inductor's cross-entropy does), so an error e in a logit scales its probability by exp(e). A loss
# compiled with a 2-layer LM (vocabulary 2048, 512 rows, no autocast): gradient cosine to exact 0.908
# with the logits packed at the block's 4 bits, 0.9967 at 8 bits, as eager compression's 0.9967 (which
# packs the log-softmax's output); at 2 bits 0.114, 0.494 and 0.505 (docs/fidelity.md).
SOFTMAX_INPUT_BITS = 8


def _packable(x: torch.Tensor, min_bytes: int, node: fx.Node | None) -> bool:
    if x.dtype not in PACKED_DTYPES or x.dim() == 0 or not isinstance(node, fx.Node):
        return False
    if _known(x.numel() * x.element_size() < max(min_bytes, 1)):  # (and never an empty tensor)
        return False
    return not _row_statistic(x, node) and not _from_region_input(node)


def restored_stride(x: torch.Tensor) -> tuple | None:
    """The strides ``x`` is restored with, as ``quantize_checked`` lays out its packing: ``x``'s own when
    its elements fill one gap-free run of memory (contiguous, channels-last, or any other order: an
    attention output as [batch, heads, seq, dim] over [batch, seq, heads, dim] memory); for a view with
    gaps (attention's q, k and v, each a slice of one projection's output), dense strides in ``x``'s
    order of dimensions, as a dense copy of it would have, where the quantize kernel reads the view in
    place. None (``x`` is kept as it is) for a broadcast view, or where the order of the strides is not
    known for every size that symbolic shapes may take.

    The compiled backward reads the restored tensor in place of ``x``: a view with gaps comes back
    without them (and in the same order of dimensions, which ops with a fixed stride order, such as
    attention's backward, require)."""
    sizes, strides = x.shape, x.stride()
    # Dimensions of size 1 do not move through memory: only the others are ordered, innermost first.
    order = [d for d in range(x.dim()) if not _known(sizes[d] == 1)]
    if not all(_known(strides[d] > 0) for d in order):
        return None  # (a broadcast dimension: stride 0)
    for i in range(1, len(order)):  # (insertion sort: a handful of dimensions, with symbolic strides)
        j = i
        while j > 0 and _known(strides[order[j]] < strides[order[j - 1]]):
            order[j - 1], order[j] = order[j], order[j - 1]
            j -= 1
    if not all(_known(strides[inner] < strides[outer]) for inner, outer in zip(order, order[1:])):
        return None  # (overlapping dimensions, or an order that depends on the sizes)
    dense, expected = list(strides), 1
    for d in order:
        dense[d] = expected
        expected = expected * sizes[d]
    if all(_known(strides[d] == dense[d]) for d in order):
        return tuple(strides)  # (dense already: x's strides, size-1 dimensions' included)
    return tuple(dense)


def _known(condition: Any) -> bool:
    """``condition``, when it holds whatever sizes symbolic shapes take (a plain bool as it is)."""
    if isinstance(condition, bool):
        return condition
    return torch.fx.experimental.symbolic_shapes.statically_known_true(condition)


def _row_statistic(x: torch.Tensor, node: fx.Node) -> bool:
    """Whether the saved ``x`` holds one value per row of a larger tensor: a later output of a
    multi-output op with fewer dimensions than its first (attention's log-sum-exp), any tensor with a
    last dimension of 1 (a softmax's max and sum, a normalization's mean and rstd, whether from
    LayerNorm's decomposition, an RMSNorm written as ``x * rsqrt(mean(x * x))``, or what the
    partitioner saves for LayerNorm's backward), or a one-dimensional piece of a decomposed softmax or
    normalization. Kept exact, as eager blocks keep them (``policy.is_row_statistic``): such a value
    scales a whole row of the gradient, and costs 1/row-length of the memory its rows take."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        outputs = node.args[0].meta.get("val")
        if (isinstance(outputs, (tuple, list)) and node.args[1] != 0 and isinstance(outputs[0], torch.Tensor)
                and x.dim() < outputs[0].dim()):
            return True
    if x.dim() >= 2:
        return _known(x.shape[-1] == 1)
    return _op_name(node.meta.get("original_aten")) in _STATISTIC_OPS


def _feeds_softmax(node: fx.Node, depth: int = 3) -> bool:
    """Whether a softmax or log-softmax reads ``node``'s tensor, directly or through up to ``depth``
    casts and views (``.float()``, a reshape to [rows, vocabulary])."""
    for user in node.users:
        if _op_name(user.meta.get("original_aten")) in _PROBABILITY_OPS:
            return True
        if (depth and user.op == "call_function" and _op_name(user.target) in _CAST_AND_VIEW_OPS
                and _feeds_softmax(user, depth - 1)):
            return True
    return False


def _from_region_input(node: fx.Node) -> bool:
    """Whether the saved tensor ``node`` made is a cast or view of one of the region's inputs (autocast's
    copy of a parameter, say). The inputs themselves reach the hook only when they are not parameters
    or buffers (``push_session``) and are packed."""
    if node.op == "placeholder":
        return False
    while node.op == "call_function" and _op_name(node.target) in _CAST_AND_VIEW_OPS and node.args:
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
        if node.op == "placeholder":
            return True
    return False


def _op_name(target: Any) -> str:
    """"view" for aten.view.default, "convert_element_type" for prims.convert_element_type.default."""
    name = getattr(target, "__name__", "")
    return name.split(".")[0]


# -- the hooks ------------------------------------------------------------------------------------------

class _SessionStack(threading.local):
    """The open blocks of this thread, innermost last (autograd's hook stack is per thread too), each
    with the AOTAutograd settings to restore when it closes."""

    def __init__(self) -> None:
        self.sessions: list = []
        self.restore: list = []


_OPEN = _SessionStack()
# Every thread's open blocks, in the order they opened. Autograd hands a thread's saved-tensor hooks to
# the threads that run its backward (on CUDA, one per device), so a block open while backward runs
# (a backward inside the block, with checkpointed layers computing their forward again) sees its hooks
# called from a thread that opened no block: they go to the latest block opened anywhere.
_ALL_OPEN: list = []


def _innermost_session():
    """This thread's innermost open block, else the latest opened in any thread, else None."""
    sessions = _OPEN.sessions or _ALL_OPEN
    return sessions[-1] if sessions else None


def recomputes(config: CompressConfig) -> bool:
    """Whether compiled regions of blocks with ``config`` compute again in backward what they can
    rather than save it: with ``recompute_activations`` and ``recast_weights`` (both default), as
    eager blocks compute GELU and SiLU outputs and autocast's weight copies again."""
    return config.recompute_activations and config.recast_weights


def push_session(session, traced: bool) -> None:
    """``session`` opens (innermost), with traced hooks or not. While a block with traced hooks is
    open, two of AOTAutograd's settings change (restored when it closes); a region compiled in it is
    compiled with them (Dynamo compiles again when the hooks change).

    - AOTAutograd traces hooks by default only for the tensors a region makes and frees itself
      ("donated"), not for its inputs. Eager blocks pack those too: the input of a block compiled on
      its own is the previous block's output, saved by the block's first layer. So every saved tensor
      but the static ones (parameters and buffers) is offered to the hooks.
    - The partitioner, which decides what a region saves for backward, by default saves rather than
      computes again any tensor that backward must materialize (the operand of a matrix product):
      an MLP then saves both its activation's input and output, and autocast's bf16 copies of the
      weights. With ``recomputes(config)`` it may compute those again, as eager blocks do: it then
      saves the activation's input alone (packed) and casts the weights again.
    """
    _OPEN.sessions.append(session)
    _ALL_OPEN.append(session)
    if traced:
        install_restore_pass()
    config = torch._functorch.config
    _OPEN.restore.append({name: getattr(config, name) for name in _AOT_SETTINGS if hasattr(config, name)})
    if traced:
        config.saved_tensors_hooks_filtering_mode = "no_static"
        if hasattr(config, "ban_recompute_materialized_backward"):
            # (The innermost block decides; one that does not recompute gets what the outermost found.)
            found = _OPEN.restore[0]["ban_recompute_materialized_backward"]
            config.ban_recompute_materialized_backward = False if recomputes(session.config) else found


# The AOTAutograd settings a block changes while it is open (push_session), restored when it closes.
_AOT_SETTINGS = ("saved_tensors_hooks_filtering_mode", "ban_recompute_materialized_backward")


class RestoreAtFirstUse(CustomGraphPass):
    """Inductor's post-grad pass while compiled regions trace our hooks: it moves each ``unpack_saved``
    of a graph to just before the first node that reads its tensor.

    AOTAutograd puts the traced unpack hooks at the top of the backward graph, and Inductor kept them
    there (torch 2.13), so every packed tensor of a region was restored at once when the region's
    backward started, and the backward held them all at full width. Restored at first use, each lives
    from its first use to its last (Inductor frees it there). Inductor's peak-memory reordering starts
    from this order and keeps it unless its estimate of the peak is lower another way: it can move
    the unpacks back up where the parameter gradients, not the activations, set that estimate.

    ``then``: the pass or passes that were installed before, run first (a plain callable among them
    turns Inductor's FX graph cache off, as it does without us).
    ``uuid`` keys Inductor's FX graph cache: ours and those of ``then``, or None (no caching) where
    one of them has none.
    """

    VERSION = "tritonquant-restore-at-first-use-1"

    def __init__(self, then: Any = None) -> None:
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        for then in self._chained():
            then(graph)
        unpacks = [node for node in graph.find_nodes(op="call_function", target=_OPS.unpack_saved.default)
                   if node.users]
        if not unpacks:
            return
        # (Users of an unpack are never unpacks, so moving unpacks keeps this order of their users.)
        position = {node: i for i, node in enumerate(graph.nodes)}
        for node in unpacks:
            min(node.users, key=position.__getitem__).prepend(node)

    def uuid(self) -> Any:
        chained = [then.uuid() if hasattr(then, "uuid") else None for then in self._chained()]
        return None if None in chained else (self.VERSION, *chained)

    def _chained(self) -> list:
        """The passes ``then`` names: none, one, or a list of them (which newer torch accepts)."""
        if not self.then:
            return []
        return list(self.then) if isinstance(self.then, (list, tuple)) else [self.then]


def install_restore_pass() -> None:
    """Make ``RestoreAtFirstUse`` Inductor's post-grad pass, chaining the one there; done when a block
    with traced hooks opens, and left in place when it closes: a region's backward is compiled when it
    first runs, which is often after the block closed. Graphs without our ops pass through it as
    they are."""
    config = torch._inductor.config
    if not isinstance(config.post_grad_custom_post_pass, RestoreAtFirstUse):
        config.post_grad_custom_post_pass = RestoreAtFirstUse(config.post_grad_custom_post_pass)


def pop_session(session) -> None:
    """``session`` closes: it leaves the stack, and the setting it found is restored."""
    for i in range(len(_ALL_OPEN) - 1, -1, -1):
        if _ALL_OPEN[i] is session:
            del _ALL_OPEN[i]
            break
    sessions = _OPEN.sessions
    for i in range(len(sessions) - 1, -1, -1):
        if sessions[i] is session:
            del sessions[i]
            for name, value in _OPEN.restore.pop(i).items():
                setattr(torch._functorch.config, name, value)
            return


class _PackHook(fx.GraphModule):
    """A compress block's pack hook: its graph for AOTAutograd, the innermost block's ``_pack`` for autograd."""

    def __call__(self, t: torch.Tensor) -> Any:
        # (AOTAutograd sets "state" while it traces this hook into a graph. Read from the thread's dict:
        # getattr of a missing attribute of a threading.local takes 0.7 us, this 0.1.)
        if _aot_thread_local.__dict__.get("state") is not None:
            return self.forward(t)
        session = _innermost_session()
        if session is None:
            raise RuntimeError("a tensor was saved under a tritonquant compress block's hooks after every block "
                               "closed (the hooks were carried into a thread that outlived them)")
        return session._pack(t)


class _UnpackHook(fx.GraphModule):
    """A compress block's unpack hook: its graph for AOTAutograd, ``Session._unpack`` for autograd."""

    def __call__(self, handle: Any) -> torch.Tensor:
        if _aot_thread_local.__dict__.get("state") is not None:
            return self.forward(handle)
        return session_class._unpack(handle)


def _made(hook_class: type, graph: fx.Graph) -> fx.GraphModule:
    """An instance of ``hook_class`` (_PackHook or _UnpackHook) running ``graph``, called straight.

    A GraphModule's class is made per instance, and ``recompile`` sets that class's ``__call__`` to a
    wrapper that formats errors around the call: 1.7 us of autograd's every save on this project's
    CPU, against 0.3 called straight. Nothing compiles these modules again (Dynamo copies their graph).
    """
    hook = hook_class(torch.nn.Module(), graph)
    type(hook).__call__ = hook_class.__call__
    return hook


session_class = None  # session.Session, set by session.py (which imports this module)
_HOOKS: dict[tuple, tuple[_PackHook, _UnpackHook]] = {}


def hooks_for(config: CompressConfig) -> tuple[_PackHook, _UnpackHook]:
    """The (pack, unpack) hooks of blocks with ``config`` (``traceable``): one pair per setting of what
    a compiled region packs, kept for the process, so that Dynamo does not compile again per block."""
    quant = config.quant
    # (recomputes: not used by the hooks, but a setting the region is compiled with: push_session)
    key = (quant.bits, quant.group_size, quant.scheme, quant.stochastic, quant.backend, config.min_bytes,
           config.sensitive_bits, recomputes(config))
    hooks = _HOOKS.get(key)
    if hooks is None:
        bits, group_size, scheme, stochastic, backend, min_bytes, sensitive_bits, _ = key
        pack_graph = fx.Graph()
        saved = pack_graph.placeholder("saved")
        pack_graph.output(pack_graph.call_function(
            trace_pack, (saved, bits, group_size, scheme, stochastic, backend, min_bytes, sensitive_bits)))
        unpack_graph = fx.Graph()
        packed = unpack_graph.placeholder("packed")
        unpack_graph.output(unpack_graph.call_function(trace_unpack, (packed, group_size, scheme, backend)))
        hooks = _HOOKS[key] = (_made(_PackHook, pack_graph), _made(_UnpackHook, unpack_graph))
    return hooks
