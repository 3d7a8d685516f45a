"""``bits="auto"``: per-module precision under an average-bits budget, from a one-step calibration.

What a packing error costs depends on where backward uses the tensor:
* A Linear/Conv layer's saved input only enters its own weight gradient (dW = dY^T X): a relative
  error r in X becomes a relative error of about r in dW, an absolute squared error ~ r * ||dW||^2.
* A tensor the *input* gradient is computed from (normalization layers, GELU/SiLU/softmax inputs,
  attention) corrupts dX, and dX flows into every layer that ran before: the error is paid on the
  gradients of all upstream parameters, ~ r * (||dW_own||^2 + sum of ||dW_k||^2 over earlier modules).
* ReLU's saved output is needed only as a mask for dX, which packing keeps exact, and as the next
  layer's input (a weight-gradient use, charged to that layer's savings below).

Calibration (the first step a model runs under ``bits="auto"``) packs at 8 bits and records, for
every packed tensor, its relative squared error r(b) at each width (relative to its centred energy
for normalization inputs, which backward centres and scales) and which modules saved it; backward
then delivers each module's parameter-gradient norm. The cost of packing module m's tensors at b bits
is sum over its tensors of r(b) times the gradient mass each saver exposes. ``allocate`` then picks a
width per module minimizing the summed cost while the average code width stays within the budget.
The plan is kept per root module (weakly) and used from the next step on. Metadata (0.25 bit an
element at group size 256) is not part of the budget.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .codec import dequantize, quantize_with
from .config import BITS_CHOICES, QuantConfig

NORMALIZATION_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Modules whose saved tensors feed only weight gradients (or, for ReLU, an exact mask).
WEIGHT_GRADIENT_ONLY = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU)
LOSSLESS = 1e-12  # relative squared error below which a width counts as lossless


@dataclass
class SavedRecord:
    """One packed tensor seen during calibration."""

    owner: str  # the module that saved it first: its width is what the plan sets
    elements: int
    relative_error: dict[int, float]
    # (module name, how many modules had started running when it saved the tensor)
    savers: list[tuple[str, int]]
    min_bits: int = 1  # the sensitivity floor (CompressConfig.sensitive_bits) for this tensor


@dataclass
class Calibration:
    """Statistics of one calibration step."""

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

    def record_tensor(self, name: str, t: torch.Tensor, quant: QuantConfig, normalization: bool,
                      min_bits: int = 1) -> SavedRecord:
        """Pack ``t`` at every candidate width and record its relative squared errors."""
        reference = t.detach().float()
        energy = (reference - reference.mean() if normalization else reference).square().sum().item()
        errors = {}
        for bits in BITS_CHOICES:
            trial = QuantConfig(bits, quant.scheme, False, quant.group_size, None, quant.backend)
            diff = dequantize(quantize_with(t, trial), backend=quant.backend).float() - reference
            errors[bits] = diff.square().sum().item() / max(energy, 1e-30)
        record = SavedRecord(name, t.numel(), errors, [], min_bits)
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

    def costs(self) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
        """(cost per module and width, elements per module)."""
        upstream = [0.0]
        for name in self.order:
            upstream.append(upstream[-1] + self.param_grad_sq.get(name, 0.0))
        costs: dict[str, dict[int, float]] = {}
        elements: dict[str, int] = {}
        for record in self.records:
            weight = sum(self.exposure(saver, started, upstream) for saver, started in record.savers)
            per_width = costs.setdefault(record.owner, {b: 0.0 for b in BITS_CHOICES})
            for bits, error in record.relative_error.items():
                per_width[bits] += weight * error
            if record.relative_error[1] > LOSSLESS:
                # One bit wrecks backward nonlinearly in ways a linear error model underrates: allow
                # it only where it loses nothing (masks, two-valued tensors).
                per_width[1] = float("inf")
            for bits in BITS_CHOICES:
                if bits < record.min_bits:  # below the sensitivity floor: the session would not use it
                    per_width[bits] = float("inf")
            elements[record.owner] = elements.get(record.owner, 0) + record.elements
        return costs, elements

    def release(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def allocate(costs: dict[str, dict[int, float]], elements: dict[str, int], budget: float) -> dict[str, int]:
    """Bits per module minimizing the summed cost with sum(elements * bits) <= budget * sum(elements).

    A multiple-choice knapsack: the Lagrangian relaxation (each module takes the width minimizing
    cost + lam * elements * bits, with lam bisected to the smallest value that meets the budget) finds
    the allocations on the convex hull, which may narrow some modules below the average to pay for
    others; the budget left over is then spent greedily, best cost reduction per added bit first.
    """
    names = list(costs)
    allowed = budget * sum(elements.values())

    def choose(lam: float) -> dict[str, int]:
        return {n: min(BITS_CHOICES, key=lambda b: (costs[n][b] + lam * elements[n] * b, b)) for n in names}

    def used(bits: dict[str, int]) -> float:
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
            f"bits='auto': a budget of {budget} bits is below what these tensors allow (1 bit only where it is "
            f"lossless); using the narrowest allowed widths, {used(bits) / sum(elements.values()):.2f} bits on average",
            stacklevel=2,
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


def fallback_bits(budget: float) -> int:
    """Width for tensors the plan does not know: the widest choice not above the budget."""
    return max(b for b in BITS_CHOICES if b <= budget)


class AutoPlans:
    """Calibrations and plans per (root module, budget); weak in the module."""

    def __init__(self) -> None:
        self._by_root: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def state(self, root: nn.Module, budget: float) -> Calibration | dict[str, int]:
        """The plan for ``root`` if its calibration finished, else the calibration to record into."""
        per_budget = self._by_root.setdefault(root, {})
        state = per_budget.get(budget)
        if isinstance(state, Calibration) and state.complete:
            state.release()
            state = per_budget[budget] = allocate(*state.costs(), budget)
        if state is None:
            state = per_budget[budget] = Calibration()
        return state

    def reset(self, root: nn.Module) -> None:
        for state in self._by_root.pop(root, {}).values():
            if isinstance(state, Calibration):
                state.release()


PLANS = AutoPlans()


def recalibrate(model: nn.Module) -> None:
    """Forget ``model``'s bits="auto" plans: the next step calibrates again (e.g. after a phase change)."""
    PLANS.reset(model)
