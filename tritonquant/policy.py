"""What the pack hook packs, and why everything else passes through.

A saved tensor is packed only when packing can free memory and the codec can represent it:
parameters, buffers and views of them are kept alive by their module anyway; tensors saved while
backward runs (double backward, checkpoint recomputation) are short-lived; sparse, subclass (DTensor,
FakeTensor, ...) and meta tensors have no flat storage to read; integer tensors (indices) and float64
must stay exact; small tensors cost more in launches than they save.

Autocast's weight copies (a parameter cast to bf16/fp16, saved by the layer for the gradient of its
input) are not packed either: quantized, they would put error on the weights every input gradient is
computed with. Exact training keeps them from forward to backward, 2 bytes per parameter (49 MB for
ResNet-50, 236 MB for GPT-2 small; MB = 2**20). The pack hook keeps only a reference to the parameter
instead, and backward casts it again, bit for bit the same copy (``weight_cast_source``);
``recast_weights=False`` keeps the copies as exact training does.

A frozen parameter's cast (``requires_grad=False``: a fine-tuned model's base weights) has no autograd
node to tell it by, yet its layer saves it for the input gradient just the same. It is recognised by
looking like one of the saving module's frozen parameters in another dtype (``is_frozen_weight_cast``)
and kept whole, as exact training keeps it; only a cast proven through autograd is cast again.

Max-pooling indices are the one integer tensor that is packed, losslessly: as positions inside their
windows, 1-8 bits each (``tritonquant.pool_indices``, nn.MaxPool1d/2d/3d), else as int16 or int32,
whichever holds every position of the pooled input plane (``narrow_index_dtype``; adaptive pools too).

Normalization statistics (BatchNorm's save_mean/save_invstd, LayerNorm's mean/rstd) and attention's
log-sum-exp hold one value per row or channel. BatchNorm's fall below ``min_bytes``; LayerNorm's and
the log-sum-exp exceed it at tens of thousands of rows (GPT-2 small at batch 32), and are kept exact
(``is_row_statistic``). (They cannot be told apart by ``requires_grad``: inside a compiled region or a
custom autograd.Function every saved intermediate has requires_grad=False.)

Probabilities (outputs of softmax and log_softmax, also after views and dropout: ``producer``) are
packed with at least ``sensitive_bits`` bits (default 4) unless an override says otherwise
(``is_sensitive``), and they get the plain [min, max] grid, with no sign rule (``standardize_kind``):
softmax outputs are standardized per channel to values of 1 or more, log_softmax outputs (all at or
below 0) are shifted to -1 or less. Most probabilities lie near zero, where the sign rule errs the
most: every positive value below half a step comes back as the first level (the group's maximum / 15
at 4 bits), so a row of small probabilities comes back inflated, and backward reads them directly
(softmax's backward, the gradient of V in attention). The plain grid fixes that at every width. The
floor is for widths below 4: log-probabilities span tens of nats in a group while the loss's
backward, exp(log p), needs the values near zero to a few hundredths, and probabilities at 2 bits
cost a measured 2-bit plan on the LM 0.42 nats where 4 bits cost it 0.25. On the character LM of
docs/fidelity.md (3 seeds, held-out nats; exact 2.391 +/- 0.016), 4 bits everywhere ends at 2.968
with the sign rule on the probabilities, 2.403 +/- 0.014 with the probabilities on the plain grid but
their dropped copy (attention dropout) on the sign rule, and 2.392 +/- 0.014 with both on the plain
grid (7.5x); an 8-bit floor ends at 2.388 +/- 0.015 (6.0x).
Log-probabilities need the plain grid too, though all of them are negative or zero. A confident
prediction's log-probability is exactly 0 (p rounds to 1), and a group holding that exact zero counts
away from it: a log-probability just below zero (p = 0.9999) would be moved one step down, to p = 0.26
at 4 bits for a group spanning 20 nats, and backward's exp(log p) - 1 would then give every confident
example the gradient of a wrong one (cross-entropy over 50 classes at margins of 12 to 30 nats:
gradient error per example up to 0.91 at 4 bits and 0.13 at 8 in the rows with p between 0.999 and 1,
against 0.001 shifted). Shifted to x - 1, every group is at most -1: its grid counts down from its
largest value, which decodes exactly, with no sign rule, and each group keeps its own grid.
Per-channel statistics would not do: dimension 1 of a [N, classes] tensor is the class, and
per-class maps reorder a row (at 4 bits, 64 rows of 4096 classes, class 0 ahead by 12 nats
in every other row: largest per-example gradient error 1.5 with them, 0.04 shifted).
What attention saves in its fused (flash) form, q, k, v, the output and the log-sum-exp, needs neither:
with attention dropout off, CPU SDPA takes that path and uniform 4 bits ends at 2.394 +/- 0.020
against exact 2.389 +/- 0.021 (7.5x).
"""

from __future__ import annotations

import functools
from collections.abc import Container, Iterable

import torch
from torch import nn

from .codec import SUPPORTED_DTYPES, is_dense

REASONS = {
    "parameter": "parameters, buffers, and views and dtype casts of them",
    "recast": "dtype casts of parameters (autocast's weight copies), cast again in backward",
    "frozen": "dtype casts of frozen parameters (autocast's weight copies), kept",
    "recomputed": "GELU and SiLU outputs, computed again in backward from their packed input",
    "backward": "saved while backward runs",
    "layout": "sparse or non-strided",
    "compiled view": "views with gaps saved by compiled regions (whose backward checks strides)",
    "statistics": "per-row statistics of normalization and attention (mean, rstd, log-sum-exp)",
    "subclass": "tensor subclass",
    "device": "device without a backend",
    "dtype": "integer, float64 or other unsupported dtype",
    "narrowed": "max-pooling indices, kept exactly in fewer bits",
    "small": "storage below min_bytes",
    "excluded": "excluded by an override",
}


# Autograd nodes whose output is a probability (softmax, including SDPA's math path) or its log.
_SOFTMAX_GRAD_FNS = ("SoftmaxBackward0", "SafeSoftmaxBackward0")
_PROBABILITY_GRAD_FNS = _SOFTMAX_GRAD_FNS + ("LogSoftmaxBackward0",)
# Nodes that change only the layout of their input (views, copies).
_LAYOUT_GRAD_FNS = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "TransposeBackward0",
    "PermuteBackward0", "TBackward0", "CloneBackward0",
})
# Nodes that pass a probability on as a probability: layout changes, dtype casts (autocast runs softmax
# in float32, and the matmul after it saves its bf16 copy), and dropout (native, or a product with a mask).
_PROBABILITY_PRESERVING_GRAD_FNS = _LAYOUT_GRAD_FNS | {"ToCopyBackward0", "NativeDropoutBackward0", "MulBackward0"}
# Nodes between a parameter and its dtype cast, or a view of that cast.
_CAST_GRAD_FNS = _LAYOUT_GRAD_FNS | {"ToCopyBackward0"}
# The most such nodes _source_node looks back through. SDPA's math path has the longest chain: softmax ->
# dropout mask -> expand -> view before the matmul saves it.
_MAX_HOPS = 6


def _source_node(t: torch.Tensor, passes: frozenset[str]):
    """The autograd node that made ``t``, looking back through single-input nodes named in ``passes``
    (at most _MAX_HOPS of them); None for a tensor without one."""
    node = t.grad_fn
    for _ in range(_MAX_HOPS):
        if node is None or type(node).__name__ not in passes:  # (the name first: next_functions costs more)
            return node
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        if len(inputs) != 1:
            return node
        node = inputs[0]
    return node


def producer(t: torch.Tensor) -> str | None:
    """Name of the autograd node that computed ``t``'s values, looking through views, layout changes,
    dtype casts and dropout; None for a tensor without one (a leaf, or a tensor saved inside a compiled region).

    Dropout is ``NativeDropoutBackward0``, or a ``MulBackward0`` with one operand that does not require
    grad (SDPA's math path multiplies the probabilities by a 0 or 1/(1-p) mask): the dropped
    probabilities that attention's second matmul saves, for the gradient of V, are still mostly
    small non-negative values, and the sign rule inflates them as it would the probabilities.
    """
    node = _source_node(t, _PROBABILITY_PRESERVING_GRAD_FNS)
    return type(node).__name__ if node is not None else None


def is_row_statistic(t: torch.Tensor, recent_shapes: Iterable[torch.Size]) -> bool:
    """For a float tensor with no autograd node: whether it holds one value per row of an activation
    that a normalization or attention keeps for its backward. LayerNorm's and RMSNorm's mean and rstd
    have a last dimension of 1; attention's log-sum-exp ([batch, heads, queries]) has the shape of the
    query ([batch, heads, queries, head dim]) without its last dimension, and the query is among the
    tensors saved just before it (``recent_shapes``: the shapes of the last few). Such outputs are not
    differentiable, hence no node of their own.

    They are small (a row's worth of the activation), and backward needs them exact: the flash and
    memory-efficient attention backward recomputes the probabilities as exp(scores - log-sum-exp), so
    an error e in one scales that row's probabilities by exp(-e). At 4 bits in groups of 256 rows the
    log-sum-exp of a causal attention (range -3.3 to 7.9 nats over the first rows) came back up to 0.45
    off: probabilities 1.57 times too large.
    """
    if t.dim() == 0:
        return False
    shape = t.shape
    return shape[-1] == 1 or any(len(saved) == len(shape) + 1 and saved[:-1] == shape for saved in recent_shapes)


def is_sensitive(t: torch.Tensor, made_by: str | None = None) -> bool:
    """True for probabilities: outputs of softmax and log_softmax, told by the node that made them
    (``producer``: also after views and dropout). ``made_by``: ``producer(t)`` if already known."""
    return (made_by or producer(t)) in _PROBABILITY_GRAD_FNS


# BatchNorm inputs packed at this width or below are standardized per channel first
# (``codec.quantize_with(standardize="channels")``). Measured on docs/fidelity.md's digits CNN
# (3 seeds, BatchNorm inputs and conv inputs at 2 bits, mask-only ReLU outputs at 1 bit, a 1.67-bit
# average): held-out accuracy 0.980 +/- 0.016 standardized, 0.298 +/- 0.038 without, exact 0.990.
# Above 2 bits the grid has levels enough for channels that share a group, and the extra pass over
# the tensor is not spent.
STANDARDIZE_MAX_BITS = 2


def standardize_kind(t: torch.Tensor, module: nn.Module | None, made_by: str | None = None) -> str | None:
    """Why ``t`` may be standardized before packing: "batchnorm" for an [N, C, ...] float tensor saved
    inside a BatchNorm module (its input), "probability" for a softmax output, "log-probability" for a
    log_softmax output (``producer``: also after views and dropout), else None.

    Standardized values have one sign (at least 1; log-probabilities, shifted, at most -1), so they get
    the plain [min, max] grid without the sign rule. Probabilities and log-probabilities need that at
    every width (the module docstring says why,
    with the figures).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if t.is_floating_point() and t.dim() >= 2 and t.shape[1] == module.num_features:
            return "batchnorm"
    made_by = made_by or producer(t)
    if made_by in _SOFTMAX_GRAD_FNS:
        return "probability"
    if made_by == "LogSoftmaxBackward0":
        return "log-probability"
    return None


def standardization(kind: str | None, bits: int) -> str | None:
    """How a tensor of ``standardize_kind`` ``kind`` is standardized before packing at ``bits``
    (``codec.quantize_with``'s ``standardize``): "channels" (per index of dimension 1), "shift" (one
    fixed shift for the whole tensor, x - 1), or None (not standardized)."""
    if kind == "probability" or (kind == "batchnorm" and bits <= STANDARDIZE_MAX_BITS):
        return "channels"
    if kind == "log-probability":
        return "shift"
    return None


# Max-pooling modules whose int64 indices can be stored narrower without loss: each index is a flat
# position inside one (n, c) plane of the module's input, so it is below the product of the input's
# last ``dims`` sizes, known from shapes alone (no look at the values, so no host synchronization).
# Exact types only: a subclass may save other integers.
MAX_POOL_SPATIAL_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}


def narrow_index_dtype(
    t: torch.Tensor, module: nn.Module | None, input_shape: torch.Size | None
) -> torch.dtype | None:
    """int16 or int32 when ``t`` is the int64 index tensor a max-pooling module saves and every index
    it can hold fits that type; None otherwise.

    ``input_shape``: the shape of the module's input in this forward (None when unknown).
    """
    dims = MAX_POOL_SPATIAL_DIMS.get(type(module))
    if dims is None or input_shape is None or t.dtype != torch.int64 or len(input_shape) < dims:
        return None
    bound = 1
    for size in input_shape[-dims:]:
        bound *= size
    if bound <= torch.iinfo(torch.int16).max + 1:
        return torch.int16
    if bound <= torch.iinfo(torch.int32).max + 1:
        return torch.int32
    return None


def activation_output(t: torch.Tensor) -> tuple[object, int, str, torch.Tensor] | None:
    """When ``t`` is the output of a GELU or SiLU, or a view of it: (the autograd node that made the
    activation's input, the input's output number at that node, the activation as
    ``codec.dequantize_activated`` names it, the output tensor), else None.

    Both activations save their input for their own gradient, and the layer after them saves their
    output for its weight gradient: in a transformer's MLP, two [tokens, 4 * dim] tensors. The output
    can be computed again in backward from the input's packing (``recompute_activations``), which the
    session finds through the input's node.
    """
    out = t if t._base is None else t._base
    node = out.grad_fn
    if node is None:
        return None
    name = type(node).__name__  # (a name test first: most saved tensors are no activation's output)
    if name == "GeluBackward0":
        activation = "gelu_tanh" if node._saved_approximate == "tanh" else "gelu"
    elif name == "SiluBackward0":
        activation = "silu"
    else:
        return None
    (input_node, output_nr), = node.next_functions
    if input_node is None:
        return None
    return input_node, output_nr, activation, out


def cast_source(t: torch.Tensor) -> tuple[object, int] | None:
    """When ``t`` is a dtype cast of another float tensor (``.float()``, ``.to(dtype)``, autocast's
    casts): (the autograd node that made that tensor, its output number at that node), else None.

    Under CUDA autocast, a bf16 model's cross-entropy saves its bf16 log-probabilities (log_softmax)
    and, for nll_loss, which autocast runs in float32, a float32 copy of them: the same values twice,
    each the size of batch x sequence x vocabulary. The session serves the copy from the
    log-probabilities' packing (``Session._cast_of_packed``). (A device move is a ``ToCopyBackward0``
    too; the session checks the device.)
    """
    node = t.grad_fn
    if node is None or t._base is not None or not t.is_floating_point():
        return None
    if type(node).__name__ != "ToCopyBackward0":  # (a name test first: few saved tensors are casts)
        return None
    (source_node, output_nr), = node.next_functions
    return None if source_node is None else (source_node, output_nr)


# Backward nodes that read their input, log-probabilities, for its shape, dtype and device alone:
# nll_loss's. ATen's nll_loss backward (CPU and CUDA, 1-d to n-d targets) allocates the gradient from
# the input's sizes and writes the targets' entries; its other saves, the integer target, the class
# weight and the scalar total weight, it reads. Its own derivative (double backward) does not read the
# input either.
_METADATA_READER_GRAD_FNS = frozenset({"NllLossBackward0", "NllLoss2DBackward0"})
# (A private function of torch's: where it is missing, every packing is restored, as before.)
_current_autograd_node = getattr(torch._C, "_current_autograd_node", lambda: None)


def unpacking_for_metadata_only() -> bool:
    """Whether the backward node unpacking saved tensors right now reads saved log-probabilities for
    their shape, dtype and device alone (nll_loss's). Under CUDA autocast its input is a float32 copy
    of bf16 log-probabilities (``cast_source``): restored, it is decoded and widened, 6 bytes written
    an element, batch x sequence x vocabulary of them, for nothing. False outside backward
    (``grad_fn._saved_self`` read by hand). The session asks only for packings of log-probabilities
    (``standardize_kind``), so the node's other saves are never in question."""
    node = _current_autograd_node()
    return node is not None and type(node).__name__ in _METADATA_READER_GRAD_FNS


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def _derived_from_module_tensor(t: torch.Tensor, module_tensors: Container[int]) -> bool:
    """True for a copy of a trainable parameter in another dtype, or a view of one: autocast's cached
    weight casts, which a linear layer saves for the gradient of its input. Exact training keeps them
    anyway, and packing them would put quantization error on the weights of every input gradient.

    Told through autograd (cast -> AccumulateGrad of the parameter), so the cast of a frozen weight,
    which has no autograd node, is not recognised.
    """
    node = _source_node(t, _CAST_GRAD_FNS)
    if node is None or type(node).__name__ != "AccumulateGrad":  # (a name test costs less than a failed getattr)
        return False
    return node.variable.untyped_storage().data_ptr() in module_tensors  # the leaf it accumulates into


def weight_cast_source(t: torch.Tensor) -> torch.Tensor | None:
    """The parameter ``t`` is a dtype cast of, or a view of such a cast, when ``param.to(t.dtype)``
    remakes that cast bit for bit; None otherwise.

    Remade exactly when the cast (``t`` or its view base) is the output of a ``ToCopy`` node straight
    from the parameter's ``AccumulateGrad``, on the parameter's device, in another dtype, with the
    parameter's shape and strides and a storage of its own; and the parameter is dense, so that
    ``to()`` preserves its strides. Casts are deterministic (round to nearest even).
    """
    cast = t._base if t._base is not None else t
    node = cast.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return None
    sources = node.next_functions
    param = getattr(sources[0][0], "variable", None) if len(sources) == 1 else None
    if (param is None or param.device != cast.device or param.dtype == cast.dtype or param.shape != cast.shape
            or param.stride() != cast.stride() or cast.storage_offset() != 0
            or not (param.is_contiguous() or is_dense(param))):  # (the cheap test first: most weights pass it)
        return None
    return param


def is_frozen_weight_cast(t: torch.Tensor, module: nn.Module | None) -> bool:
    """True when ``t``, or the tensor it views, looks like a dtype cast of a frozen parameter of
    ``module`` (the module saving it): no autograd node and no gradient, a storage of its own, and
    the parameter's device, shape and strides in another dtype.

    Such casts have no autograd node that would prove what they are (``weight_cast_source``), so they
    are kept rather than cast again; an activation that merely looks like one is kept too, which
    costs memory but never changes a gradient.
    """
    if module is None or t.requires_grad or t.grad_fn is not None:
        return False
    cast = t._base if t._base is not None else t
    if cast.requires_grad or cast.storage_offset() != 0:
        return False
    for param in module._parameters.values():
        if (param is not None and not param.requires_grad and param.dtype != cast.dtype
                and param.shape == cast.shape and param.stride() == cast.stride() and param.device == cast.device):
            return True
    return False


@functools.cache
def sharding_module_types() -> tuple[type, ...]:
    """Module types that free their parameters' storage after forward and gather it again for backward
    (FSDP and FSDP2): a cast of such a parameter cannot be made again in backward (``weight_cast_source``).
    Empty where torch.distributed is not built."""
    types = []
    try:
        from torch.distributed import fsdp
    except ImportError:
        return ()
    for name in ("FullyShardedDataParallel", "FSDPModule"):
        if hasattr(fsdp, name):
            types.append(getattr(fsdp, name))
    if not hasattr(fsdp, "FSDPModule"):
        try:  # before torch 2.6 FSDP2 lived under _composable
            from torch.distributed._composable.fsdp import FSDPModule
            types.append(FSDPModule)
        except ImportError:
            pass
    return tuple(types)


def recastable(param: torch.Tensor, running: list[nn.Module]) -> bool:
    """Whether ``param`` will still hold the same values, in the same storage, in backward: not while a
    sharding module (FSDP, FSDP2) is among the ``running`` modules, nor for a DeepSpeed ZeRO-3
    partitioned parameter (marked by its ``ds_id``). Anything else that changes a parameter between
    forward and backward is caught at backward by its version and address."""
    if getattr(param, "ds_id", None) is not None:
        return False
    sharding = sharding_module_types()
    return not any(isinstance(module, sharding) for module in running) if sharding else True


def pass_reason(t: torch.Tensor, module_tensors: Container[int], min_bytes: int) -> str | None:
    """Why ``t`` must not be packed (a key of REASONS), or None to pack it.

    ``module_tensors`` contains the storage addresses of the parameters and buffers of modules seen
    running in this block, so views and aliases of them are recognised too.
    """
    # (type checks first: isinstance against Parameter goes through a Python-level metaclass hook)
    if type(t) is not torch.Tensor:
        return "parameter" if isinstance(t, torch.nn.Parameter) else "subclass"
    base = t._base
    if base is not None and isinstance(base, torch.nn.Parameter):
        return "parameter"
    if in_backward():
        return "backward"
    if t.layout != torch.strided:
        return "layout"
    if not (t.is_cuda or t.is_cpu):  # (the devices with a backend; no torch.device built per call)
        return "device"
    if t.dtype not in SUPPORTED_DTYPES:
        return "dtype"
    storage = t.untyped_storage()
    if storage.data_ptr() in module_tensors or _derived_from_module_tensor(t, module_tensors):
        return "parameter"
    if storage.nbytes() < min_bytes:
        return "small"
    return None
