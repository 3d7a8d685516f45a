"""What the pack hook packs, and why everything else passes through.

A saved tensor is packed only when packing can free memory and the codec can represent it:
parameters, buffers and views of them are kept alive by their module anyway; tensors saved while
backward runs (double backward, checkpoint recomputation) are short-lived; sparse, subclass (DTensor,
FakeTensor, ...) and meta tensors have no flat storage to read; integer tensors (indices) and float64
must stay exact; small tensors cost more in launches than they save.

Normalization statistics (BatchNorm's save_mean/save_invstd, LayerNorm's mean/rstd) and attention's
log-sum-exp hold one value per row or channel and usually fall below ``min_bytes``. (They cannot be
told apart by ``requires_grad``: inside a compiled region or a custom autograd.Function every saved
intermediate has requires_grad=False.)

Tensors whose errors backward exponentiates (``is_sensitive``: log_softmax outputs, attention's
saved inputs) are packed with at least ``sensitive_bits`` bits (default 8) unless an override says
otherwise: on the character LM of docs/fidelity.md, 4-bit training with this floor ends at exact
training's held-out loss (2.389 vs 2.391 nats, 3 seeds) and 0.58 nats above it without.
"""

from __future__ import annotations

from collections.abc import Container

import torch

from .codec import SUPPORTED_DTYPES

PACKABLE_DEVICES = ("cuda", "cpu")

REASONS = {
    "parameter": "parameters, buffers and views of them",
    "backward": "saved while backward runs",
    "layout": "sparse or non-strided",
    "subclass": "tensor subclass",
    "device": "device without a backend",
    "dtype": "integer, float64 or other unsupported dtype",
    "small": "storage below min_bytes",
    "excluded": "excluded by an override",
}


_LOG_DOMAIN_GRAD_FNS = ("LogSoftmaxBackward0",)


def is_sensitive(t: torch.Tensor, module: torch.nn.Module | None) -> bool:
    """True for tensors whose packing error backward amplifies exponentially: log_softmax outputs, and
    everything saved inside an attention module (a class whose name contains "attention", e.g.
    nn.MultiheadAttention or Hugging Face's *Attention), where backward recomputes the attention
    probabilities as exp(q k^T - lse) from the saved q and k."""
    grad_fn = t.grad_fn
    if grad_fn is not None and type(grad_fn).__name__ in _LOG_DOMAIN_GRAD_FNS:
        return True
    return module is not None and "attention" in type(module).__name__.lower()


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def pass_reason(t: torch.Tensor, module_tensors: Container[int], min_bytes: int) -> str | None:
    """Why ``t`` must not be packed (a key of REASONS), or None to pack it.

    ``module_tensors`` contains the storage addresses of the parameters and buffers of modules seen
    running in this block, so views and aliases of them are recognised too.
    """
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return "subclass"
    if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
        return "parameter"
    if in_backward():
        return "backward"
    if t.layout != torch.strided:
        return "layout"
    if t.device.type not in PACKABLE_DEVICES:
        return "device"
    if t.dtype not in SUPPORTED_DTYPES:
        return "dtype"
    storage = t.untyped_storage()
    if storage.data_ptr() in module_tensors:
        return "parameter"
    if storage.nbytes() < min_bytes:
        return "small"
    return None
