"""``bits="auto"``: per-tensor precision under an average-bits budget, from a one-step calibration.

What a packing error costs depends on where backward uses the tensor:
* A Linear/Conv layer's saved input only enters its own weight gradient (dW = dY^T X): a relative
  error r in X becomes a relative error of about r in dW, an absolute squared error ~ r * ||dW||^2.
* A tensor the *input* gradient is computed from (normalization layers, GELU/SiLU/softmax inputs,
  attention) corrupts dX, and dX flows into every layer that ran before: the error is paid on the
  gradients of all upstream parameters, ~ r * (||dW_own||^2 + sum of ||dW_k||^2 over earlier modules).
* ReLU's saved output is needed only as a mask for dX, which packing keeps exact, and as the next
  layer's input (a weight-gradient use, charged to that layer's savings below).

A plan names each saved tensor by its slot: (the module that saved it, n) for the n-th new tensor
that module saved in the forward pass (reuses of a tensor already packed do not count). The same
model running the same forward saves the same tensors in the same order, so a plan measured on one
step applies to the next; a slot the plan does not know (a longer forward, another branch) gets the
widest width not above the budget. Plans are {module name: {n: bits}}.

Calibration (the first step a model runs under ``bits="auto"``) packs at 8 bits and records, for
every packed tensor, its relative squared error r(b) at each width (relative to its centred energy
for normalization inputs, which backward centres and scales) and which modules saved it; backward
then delivers each module's parameter-gradient norm. The cost of packing a tensor at b bits is r(b)
times the gradient mass its savers expose. ``allocate`` then picks a width per tensor minimizing the
summed cost while the average code width stays within the budget. The plan is kept per root module
(weakly) and used from the next step on. Metadata (0.25 bit an element at group size 256) is not
part of the budget.

``calibrate(model, loss_fn, budget)`` replaces that estimate with a measurement: it runs one forward
keeping the saved tensors exact, then backpropagates the same graph once per (tensor, width) with only
that tensor packed at that width, and charges each choice the error it caused in the parameter
gradients. Nothing is modelled (one bit is allowed wherever it measurably costs little, e.g.
a ReLU output read only by max-pool), and calling it again later in training follows the model as it
changes (attention becomes sensitive only once it sharpens). It costs one backward per tensor and width.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import nn

from .codec import dequantize, quantize_with
from .config import BITS_CHOICES, CompressConfig, QuantConfig
from .policy import standardization

NORMALIZATION_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Modules whose saved tensors feed only weight gradients (or, for ReLU, an exact mask).
WEIGHT_GRADIENT_ONLY = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU)
LOSSLESS = 1e-12  # relative squared error below which a width counts as lossless

Slot = tuple[str, int]  # (module name, n): the n-th new tensor the module saved in a forward pass
Plan = dict[str, dict[int, int]]  # module name -> {n: bits}; slots it does not list get fallback_bits


@dataclass
class SavedRecord:
    """One packed tensor seen during calibration."""

    owner: str  # the module that saved it first (the plan's width applies to its slot)
    slot: int  # n: the owner's n-th new saved tensor
    elements: int
    relative_error: dict[int, float]
    # (module name, how many modules had started running when it saved the tensor)
    savers: list[tuple[str, int]]
    min_bits: int = 1  # the sensitivity floor (CompressConfig.sensitive_bits) for this tensor


@dataclass
class Calibration:
    """Statistics of one calibration step.

    Tensors with a sensitivity floor (``policy.is_sensitive``) are fixed at the floor and left out of
    the plan (the session packs them at their floor).
    """

    records: list[SavedRecord] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # modules in the order they first ran
    on_input_path: dict[str, bool] = field(default_factory=dict)
    param_grad_sq: dict[str, float] = field(default_factory=dict)
    _hooks: list = field(default_factory=list)

    def enter(self, name: str, module: nn.Module) -> None:
        """A module starts running: remember its position and watch its parameters' gradients."""
        if name in self.on_input_path:
            return
        self.order.append(name)
        self.on_input_path[name] = not isinstance(module, WEIGHT_GRADIENT_ONLY)
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                self._hooks.append(param.register_hook(lambda grad, name=name: self._add_grad(name, grad)))

    def _add_grad(self, name: str, grad: torch.Tensor) -> None:
        self.param_grad_sq[name] = self.param_grad_sq.get(name, 0.0) + grad.detach().float().square().sum().item()

    def record_tensor(self, slot: Slot, t: torch.Tensor, quant: QuantConfig, normalization: bool,
                      min_bits: int = 1, standardize_kind: str | None = None) -> SavedRecord:
        """Pack ``t``, saved in ``slot``, at every candidate width (standardized as the pack hook would,
        given its ``policy.standardize_kind``) and record its relative squared errors."""
        reference = t.detach().float()
        energy = (reference - reference.mean() if normalization else reference).square().sum().item()
        errors = {}
        for bits in BITS_CHOICES:
            trial = QuantConfig(bits, quant.scheme, False, quant.group_size, None, quant.backend)
            packed = quantize_with(t, trial, standardize=standardization(standardize_kind, bits))
            diff = dequantize(packed, backend=quant.backend).float() - reference
            errors[bits] = diff.square().sum().item() / max(energy, 1e-30)
        name, n = slot
        record = SavedRecord(name, n, t.numel(), errors, [], min_bits)
        self.add_saver(record, name)
        self.records.append(record)
        return record

    def add_saver(self, record: SavedRecord, name: str) -> None:
        record.savers.append((name, len(self.order)))

    @property
    def complete(self) -> bool:
        """True once a backward pass has delivered parameter gradients."""
        return bool(self.param_grad_sq)

    def exposure(self, name: str, started: int, upstream: list[float]) -> float:
        """Squared gradient norm that a packing error in a tensor ``name`` saved can reach, when
        ``started`` modules had begun running (``upstream[i]``: gradient mass of the first i modules)."""
        own = self.param_grad_sq.get(name, 0.0)
        return own + (upstream[started] - own if self.on_input_path.get(name, True) else 0.0)

    def costs(self) -> tuple[dict[Slot, dict[int, float]], dict[Slot, int]]:
        """(cost per slot and width, elements per slot); a floored tensor's only finite cost is at its floor."""
        upstream = [0.0]
        for name in self.order:
            upstream.append(upstream[-1] + self.param_grad_sq.get(name, 0.0))
        costs: dict[Slot, dict[int, float]] = {}
        elements: dict[Slot, int] = {}
        for record in self.records:
            weight = sum(self.exposure(saver, started, upstream) for saver, started in record.savers)
            unit = (record.owner, record.slot)
            per_width = costs.setdefault(unit, {b: 0.0 for b in BITS_CHOICES})
            for bits, error in record.relative_error.items():
                per_width[bits] += weight * error
            if record.relative_error[1] > LOSSLESS:
                # One bit wrecks backward nonlinearly in ways a linear error model underrates: allow
                # it only where it loses nothing (masks, two-valued tensors).
                per_width[1] = float("inf")
            for bits in BITS_CHOICES:
                if bits != record.min_bits and record.min_bits > 1:
                    per_width[bits] = float("inf")
            elements[unit] = elements.get(unit, 0) + record.elements
        return costs, elements

    def plan(self, budget: float) -> Plan:
        """The widths ``allocate`` chooses under ``budget``, floored tensors left out."""
        floored = {(r.owner, r.slot) for r in self.records if r.min_bits > 1}
        chosen = allocate(*self.costs(), budget)
        return plan_of({slot: bits for slot, bits in chosen.items() if slot not in floored})

    def release(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by this module's caller point at the user's line:
    the first frame outside tritonquant and torch (the budget is checked deep inside the pack hook,
    ``calibrate`` or a session, at depths that differ)."""
    skipped = tuple(os.path.dirname(module_file) + os.sep for module_file in (__file__, torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level


def allocate(costs: dict[Hashable, dict[int, float]], elements: dict[Hashable, int],
             budget: float) -> dict[Hashable, int]:
    """Bits per unit (a slot, or any hashable key) minimizing the summed cost with
    sum(elements * bits) <= budget * sum(elements).

    A multiple-choice knapsack: the Lagrangian relaxation (each unit takes the width minimizing
    cost + lam * elements * bits, with lam bisected to the smallest value that meets the budget) finds
    the allocations on the convex hull, which may narrow some units below the average to pay for
    others; the budget left over is then spent greedily, best cost reduction per added bit first.
    """
    names = list(costs)
    allowed = budget * sum(elements.values())

    def choose(lam: float) -> dict[Hashable, int]:
        return {n: min(BITS_CHOICES, key=lambda b: (costs[n][b] + lam * elements[n] * b, b)) for n in names}

    def used(bits: dict[Hashable, int]) -> float:
        return sum(elements[n] * bits[n] for n in names)

    high = 1.0
    while used(choose(high)) > allowed and high < 1e30:
        high *= 4
    low = 0.0
    for _ in range(200):
        mid = (low + high) / 2
        if used(choose(mid)) > allowed:
            low = mid
        else:
            high = mid
    bits = choose(high)
    if used(bits) > allowed * (1 + 1e-9):
        warnings.warn(
            f"bits='auto': a budget of {budget} bits is below what these tensors allow (probabilities keep "
            f"sensitive_bits; an estimated plan uses 1 bit only where it is lossless); using the narrowest "
            f"allowed widths, {used(bits) / sum(elements.values()):.2f} bits on average",
            stacklevel=_user_stacklevel(),
        )
    allowance = allowed - used(bits)
    while True:  # spend what is left, best cost reduction per added bit first
        best, best_gain = None, 0.0
        for name, b in bits.items():
            if b == BITS_CHOICES[-1]:
                continue
            nxt = BITS_CHOICES[BITS_CHOICES.index(b) + 1]
            extra = elements[name] * (nxt - b)
            gain = (costs[name][b] - costs[name][nxt]) / extra
            if extra <= allowance and gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return bits
        nxt = BITS_CHOICES[BITS_CHOICES.index(bits[best]) + 1]
        allowance -= elements[best] * (nxt - bits[best])
        bits[best] = nxt


def plan_of(widths: dict[Slot, int]) -> Plan:
    """{(module name, n): bits} as a plan, {module name: {n: bits}}."""
    plan: Plan = {}
    for (name, n), bits in sorted(widths.items()):
        plan.setdefault(name, {})[n] = bits
    return plan


def fallback_bits(budget: float) -> int:
    """Width for tensors the plan does not know: the widest choice not above the budget."""
    return max(b for b in BITS_CHOICES if b <= budget)


class AutoPlans:
    """Calibrations and plans per (root module, budget); weak in the module."""

    def __init__(self) -> None:
        self._by_root: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def state(self, root: nn.Module, budget: float) -> Calibration | Plan:
        """The plan for ``root`` if its calibration finished, else the calibration to record into."""
        per_budget = self._by_root.setdefault(root, {})
        state = per_budget.get(budget)
        if isinstance(state, Calibration) and state.complete:
            state.release()
            state = per_budget[budget] = state.plan(budget)
        if state is None:
            state = per_budget[budget] = Calibration()
        return state

    def install(self, root: nn.Module, budget: float, plan: Plan) -> None:
        """Use ``plan`` for ``root`` under ``bits="auto", budget=budget`` (replacing any calibration)."""
        per_budget = self._by_root.setdefault(root, {})
        old = per_budget.get(float(budget))
        if isinstance(old, Calibration):
            old.release()
        per_budget[float(budget)] = {name: dict(widths) for name, widths in plan.items()}

    def reset(self, root: nn.Module) -> None:
        for state in self._by_root.pop(root, {}).values():
            if isinstance(state, Calibration):
                state.release()


PLANS = AutoPlans()


def recalibrate(model: nn.Module) -> None:
    """Forget ``model``'s bits="auto" plans: the next step calibrates again (e.g. after a phase change)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    PLANS.reset(model)


# -- measured calibration ---------------------------------------------------------------------------


class ProbeTensor:
    """What autograd holds for a saved tensor during ``calibrate``: the exact tensor, restored exact
    unless its owner is the module being probed, then packed and restored at the probed width."""

    __slots__ = ("tensor", "version", "key", "quant", "probe", "standardize_kind", "__weakref__")
    calibration_record = None  # read by the session's deduplication, like _Packed's

    def __init__(self, tensor: torch.Tensor, key: tuple[int, Slot], quant: QuantConfig, probe: "Probe",
                 standardize_kind: str | None = None) -> None:
        self.tensor = tensor.detach()  # not the tensor itself: see session._Kept
        self.standardize_kind = standardize_kind
        self.version = tensor._version
        self.key = key
        self.quant = quant
        self.probe = probe

    def source(self) -> torch.Tensor:
        """The saved tensor (held strongly, so its address cannot have been reused)."""
        return self.tensor

    def restore(self) -> torch.Tensor:
        active = self.probe.active
        if active is None or active[0] != self.key:
            return self.tensor
        bits = active[1]
        cached = self.probe.restored.get(id(self))
        if cached is None or cached[0] != bits:
            quant = dataclasses.replace(self.quant, bits=bits)
            packed = quantize_with(self.tensor, quant, standardize=standardization(self.standardize_kind, bits))
            cached = (bits, dequantize(packed, backend=quant.backend))
            self.probe.restored[id(self)] = cached
        return cached[1]


@dataclass
class ProbedSlot:
    """One saved tensor that ``calibrate`` probes: at every width, or at its floor ``min_bits`` only."""

    root: weakref.ref
    slot: Slot
    min_bits: int
    elements: int
    # gradient_error with only this tensor packed, per width (inf: not tried)
    costs: dict[int, float] = field(default_factory=lambda: {b: float("inf") for b in BITS_CHOICES})


class Probe:
    """The exact saved tensors of one forward, by (root module, slot), and which one is probed at which width."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, Slot], ProbedSlot] = {}
        self.active: tuple[tuple[int, Slot], int] | None = None
        self.restored: dict[int, tuple[int, torch.Tensor]] = {}

    def add(self, t: torch.Tensor, root: nn.Module, slot: Slot, quant: QuantConfig, min_bits: int,
            standardize_kind: str | None = None) -> ProbeTensor:
        key = (id(root), slot)
        self.slots[key] = ProbedSlot(weakref.ref(root), slot, min_bits, t.numel())
        return ProbeTensor(t, key, quant, self, standardize_kind)

    def select(self, key: tuple[int, Slot] | None, bits: int = 0) -> None:
        """Probe ``key``'s tensor at ``bits`` on the next backward (None: every tensor exact)."""
        self.active = None if key is None else (key, bits)
        self.restored.clear()


def gradient_error(grads: list[torch.Tensor | None], reference: list[torch.Tensor | None]) -> float:
    """Sum over parameter tensors of ||g - g_ref||^2 / ||g_ref||^2 (parameters without gradient skipped).

    Relative per parameter tensor because Adam-family optimizers normalize each parameter's update:
    an error in a layer with small gradients matters as much as the same relative error in a large one.
    """
    total = 0.0
    for g, ref in zip(grads, reference):
        if ref is None or g is None:
            continue
        norm = ref.detach().float().square().sum().item()
        if norm > 0:
            total += (g.detach().float() - ref.detach().float()).square().sum().item() / norm
    return total


def measure(model: nn.Module, loss_fn: Callable[[], torch.Tensor], config: CompressConfig,
            progress: bool = False) -> list[ProbedSlot]:
    """The probed tensors of one ``loss_fn()`` forward, each with its measured ``costs`` per width.

    ``config`` must have ``auto_budget`` set (tensors outside modules are packed at its fallback width).
    Parameters' ``.grad``, buffers and the random number generators are left as they were.
    """
    from .session import Session  # session.py imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable returning the scalar loss, got {type(loss_fn).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad: there are no gradients to measure")
    probe = Probe()
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda_devices = sorted({p.device.index for p in params if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            # Tensors saved outside every module are not probed; they are packed at the width a
            # bits="auto" session gives them, so the measured gradients are training's.
            fallback = dataclasses.replace(config.quant, bits=fallback_bits(config.auto_budget))
            with Session(dataclasses.replace(config, quant=fallback, auto_budget=None), probe=probe):
                loss = loss_fn()
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise ValueError("loss_fn must return the training loss: a one-element tensor that requires grad")

            def grads() -> list[torch.Tensor | None]:
                return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))

            reference = grads()
            trials = [(key, b) for key, probed in probe.slots.items() for b in BITS_CHOICES
                      if probed.min_bits == 1 or b == probed.min_bits]
            for done, (key, bits) in enumerate(trials, 1):
                probe.select(key, bits)
                probe.slots[key].costs[bits] = gradient_error(grads(), reference)
                if progress:
                    print(f"\rcalibrate: {done}/{len(trials)} backward passes", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)
            probe.select(None)
    finally:
        with torch.no_grad():
            for buffer, value in saved_buffers:
                buffer.copy_(value)
    return list(probe.slots.values())


def calibrate(model: nn.Module, loss_fn: Callable[[], torch.Tensor], budget: float, *,
              progress: bool = False, **config) -> Plan:
    """Choose per-tensor widths for ``bits="auto", budget=budget`` by measuring their gradient error.

    ``loss_fn()`` must run ``model``'s forward on a representative batch and return the scalar loss,
    e.g. ``lambda: F.cross_entropy(model(x), y)``. ``config`` takes the other keywords of ``compress``
    (``scheme``, ``group_size``, ``min_bytes``, ``sensitive_bits``, ``overrides``, ...); pass the same
    ones to the ``compress``/``attach`` that trains, since the plan is stored per (model, budget):

        tq.calibrate(model, lambda: loss_of(model, batch), budget=2.0, sensitive_bits=1)
        with tq.compress(bits="auto", budget=2.0, sensitive_bits=1):   # uses the measured plan
            loss = loss_of(model, batch)

    Runs one forward (saved tensors kept exact, so this step needs exact training's memory) and
    1 + (tensors x widths) backward passes on its graph with ``torch.autograd.grad``: parameters'
    ``.grad`` are untouched, and buffers (BatchNorm running statistics) and the random number
    generators are restored afterwards, so calibrating does not change training. A tensor's cost at a
    width is ``gradient_error`` with only that tensor packed at that width; the widths are then
    allocated as for the estimated calibration (``allocate``). Tensors with a sensitivity floor are
    probed at their floor only and kept there (not in the plan); bool tensors (lossless at 1 bit),
    tensors saved outside modules and modules an override decides are not probed.
    Call it again (e.g. every few hundred steps) to follow the model as it trains. ``progress`` prints
    a counter of backward passes to stderr. Returns the plan, {module name: {n: bits}} for the n-th
    tensor each module saves (module docstring).
    """
    if "bits" in config:
        raise TypeError("calibrate chooses the widths itself (bits='auto'); remove the bits keyword")
    compress_config = CompressConfig.from_kwargs(bits="auto", budget=budget, **config)
    probed = measure(model, loss_fn, compress_config, progress)
    chosen = allocate({id(p): p.costs for p in probed}, {id(p): p.elements for p in probed},
                      compress_config.auto_budget) if probed else {}
    roots: dict[int, tuple[nn.Module, dict[Slot, int]]] = {}
    for p in probed:
        root = p.root()
        if root is not None and p.min_bits == 1:  # floored tensors keep their floor: not in the plan
            roots.setdefault(id(root), (root, {}))[1][p.slot] = chosen[id(p)]
    merged: dict[Slot, int] = {}
    for root, widths in roots.values():
        PLANS.install(root, compress_config.auto_budget, plan_of(widths))
        merged.update(widths)
    return plan_of(merged)
