"""What every launcher shares: numerics options, the untuned tile-size heuristic, integer helpers, the
flat view of a dense tensor, and ``KernelLauncher``, which launches a kernel without Triton's per-call
dispatch.

All kernels run with ``enable_fp_fusion=False`` so that ``a * b + c`` is rounded twice, as the torch
reference computes it; with fusion on, the compiler may emit FMAs and the backends would differ in the
last bit. The quantize/dequantize launchers get their tile from ``kernels/autotune.py``, which times
candidates per GPU and falls back to ``default_group_tile`` when tuning is off or not worth it.
"""

import itertools
import operator
import os

import torch

try:
    from triton import knobs as _knobs  # Triton >= 3.4: where launch hooks are installed
except ImportError:  # pragma: no cover - older Triton: always use its dispatch
    _knobs = None

BOOL_BLOCK_BYTES = 1024
BOOL_NUM_WARPS = 4  # Triton's default, which the bool kernels have always used
# Elements one program handles on a GPU, before tuning; the interpreter prefers fewer, larger tiles.
GPU_TILE_ELEMENTS = 4096
INTERPRETER_TILE_ELEMENTS = 1 << 16


# Triton makes a kernel interpreted or compiled when the kernel is decorated, by TRITON_INTERPRET at that
# moment. Ours are decorated as this package is imported, so their mode is read once, here, and a later
# change of the variable (which would not change them) does not mislead the launchers either.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreted() -> bool:
    """True when the kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def env_flag(name: str) -> bool:
    """False when the environment variable ``name`` is 0/off/false/no (any case), else True (also unset)."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "off", "false", "no")


def launch_options() -> dict:
    return {"enable_fp_fusion": False}


# Integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 do the same, but they are
# constexpr functions that cost more than a microsecond a call on the host, and the launchers run
# once per saved tensor.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def int_width(value: int) -> int:
    """Which of Triton's int types a runtime int argument gets when its value is not specialized on
    (``do_not_specialize``): 0 for int32, 1 for int64, 2 for uint64 (part of a launch plan's key)."""
    return 0 if -(1 << 31) <= value < (1 << 31) else (2 if value >= (1 << 63) else 1)


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """The elements of dense ``x`` as a 1-D tensor in memory order (no copy).

    "Dense": the elements fill one gap-free run of memory that starts at ``x.data_ptr()``, in any
    dimension order (contiguous, channels_last, any permutation). The launchers accept such tensors
    as they are, because a kernel only sees the start address; the references need this view.
    """
    return x if x.dim() == 1 else x.as_strided((x.numel(),), (1,))


def strided_runs(x: torch.Tensor) -> tuple[int, int] | None:
    """(run, run_stride) when the elements of ``x`` are not one run of memory but equal runs of ``run``
    elements, each starting ``run_stride`` elements after the one before, in memory order (the
    dimensions ordered by stride); None for any other layout, dense ones included.

    Views like these are what attention saves: q, k and v, split from one projection's output
    ([batch, seq, 3, heads, head_dim], permuted to [batch, heads, seq, head_dim]), are each runs of
    heads * head_dim elements, 3 * heads * head_dim apart; so is either half of ``x.chunk(2, -1)``.
    The quantize kernel reads such runs where they lie (``triton_quantize``'s ``runs``) and packs them
    as it would a dense copy of ``x`` with the same dimension order (``torch.empty_like(x)``).
    """
    dims = sorted((stride, size) for size, stride in zip(x.shape, x.stride()) if size != 1)
    run, inner = 1, 0
    while inner < len(dims) and dims[inner][0] == run:
        run *= dims[inner][1]
        inner += 1
    if inner == len(dims) or dims[inner][0] <= run:  # dense, or overlapping (broadcast) elements
        return None
    run_stride = next_start = dims[inner][0]
    for stride, size in dims[inner:]:
        if stride != next_start:
            return None
        next_start *= size
    return run, run_stride


def runs_view(x: torch.Tensor, runs: tuple[int, int]) -> torch.Tensor:
    """[n // run, run] view of ``x``'s elements laid out as ``runs`` = (run, run_stride)
    (``strided_runs``), one run per row (no copy)."""
    run, run_stride = runs
    return x.as_strided((x.numel() // run, run), (run_stride, 1))


def default_group_tile(n_groups: int, group_size: int, interpreted: bool) -> tuple[int, int]:
    """(groups per program, num_warps) for the quantize/dequantize kernels, before any tuning.

    ``interpreted``: the interpreter's large tile (True) or the GPU tile.
    """
    if interpreted:
        # The interpreter pays per element of a tile, masked or not: shrink tiles to small tensors.
        rows = max(1, INTERPRETER_TILE_ELEMENTS // group_size)
        rows = min(rows, next_power_of_2(n_groups))
    else:
        # On a GPU masked lanes of a small tensor's tile cost nothing measurable, while every distinct
        # ROWS is another compiled specialization: keep the tile fixed per group size.
        rows = max(1, GPU_TILE_ELEMENTS // group_size)
    num_warps = 4 if rows * group_size <= 4096 else 8
    return rows, num_warps


# ---------------------------------------------------------------------------------------------
# Launching without Triton's per-call dispatch
# ---------------------------------------------------------------------------------------------

ENV_DIRECT_LAUNCH = "TRITONQUANT_DIRECT_LAUNCH"  # "0" (or off/false/no): always launch through Triton's dispatch
DIRECT_LAUNCH = env_flag(ENV_DIRECT_LAUNCH)  # (read once, at import)
# Launch plans a launcher keeps (KernelLauncher.launch_planned): a plan is per tensor size, and a model
# repeats a few hundred sizes per step, but shapes that change every step (text of varying length)
# would add plans without end.
MAX_PLANS = 4096


class KernelLauncher:
    """Launches one ``@triton.jit`` kernel, doing Triton's per-call dispatch once per specialization.

    ``kernel[grid](*args, **constexprs)`` binds the arguments, specializes them, builds a cache key
    and looks the compiled kernel up on every call: about 8 us of host Python per launch (Triton 3.6
    and 3.9, measured with the launch itself stubbed out), paid twice per packed tensor. This class
    keeps the compiled kernel that the first launch of each specialization returns and calls it
    directly afterwards, as ``CompiledKernel.__getitem__`` does.

    The key is what Triton's own key is made of: the current device, ``num_warps``, the constexpr
    values, and Triton's specialization of every runtime argument (``native_specialize_impl``, the
    function Triton's binder calls: dtype and 16-byte alignment of pointers, int width, divisibility
    by 16, and the value 1; the last two not for a parameter declared ``do_not_specialize``). So a
    direct launch only ever runs a kernel that Triton's dispatch would have chosen for the same
    arguments. (Process-wide Triton settings that also enter its key, such as TRITON_DEBUG, are taken
    as fixed for the life of the process.) The positional arguments passed on are the kernel's
    parameters in declaration order, runtime ones first (checked on construction: a kernel declared
    otherwise warns once and keeps Triton's dispatch).

    Triton's dispatch is used instead under the interpreter, while a launch hook is installed
    (profilers read launch metadata; without one, the direct call passes no metadata and no hooks,
    where Triton's passes its empty hook chains), when TRITONQUANT_DIRECT_LAUNCH=0, and, with one
    warning, if this Triton lacks the internals used.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, object] = {}
        # (caller's plan key, device) -> (compiled kernel, grid, constexpr values): launch_planned
        self._plans: dict[tuple, tuple] = {}
        self._device_state = None  # (get_current_device, get_current_stream, specialize, backend), at first use
        self._direct = False
        try:
            from triton.runtime.jit import JITFunction

            if isinstance(kernel, JITFunction):
                params = kernel.params
                self.constexpr_names = tuple(p.name for p in params if p.is_constexpr)
                # The constexpr values in declaration order, read from the dict in one C call.
                names = self.constexpr_names
                getter = operator.itemgetter(*names) if names else (lambda constexprs: ())
                self._constexpr_values = getter if len(names) != 1 else (lambda constexprs: (getter(constexprs),))
                runtime = [p for p in params if not p.is_constexpr]
                if [p.name for p in params] != [*(p.name for p in runtime), *self.constexpr_names]:
                    raise TypeError(f"{kernel.__name__}: runtime parameters must come before the constexprs")
                # What Triton's binder specializes each runtime argument on: its value, its alignment
                # (``do_not_specialize`` and ``do_not_specialize_on_alignment`` turn them off).
                self._value_flags = tuple(not getattr(p, "do_not_specialize", False) for p in runtime)
                self._align_flags = tuple(not getattr(p, "do_not_specialize_on_alignment", False) for p in runtime)
                self._direct = True
        except Exception as exc:  # noqa: BLE001 - an unfamiliar Triton: keep its own dispatch
            _warn_no_direct_launch(exc)

    def __call__(self, grid: int, args: tuple, constexprs: dict, num_warps: int, plan: tuple | None = None) -> None:
        """Launch ``grid`` programs (1-D grid). ``args``: the runtime arguments in declaration order;
        ``constexprs``: every constexpr parameter by name. ``plan``: a key under which to remember this
        launch for ``launch_planned`` (None: none)."""
        key = None
        if self._direct and DIRECT_LAUNCH and _no_launch_hooks():  # (checked per call: hooks come and go)
            key = self._key(args, constexprs, num_warps)
            compiled = self._compiled.get(key) if key is not None else None
            if compiled is not None:
                device, _, values, _ = key
                try:
                    compiled.run(grid, 1, 1, self._device_state[1](device), compiled.function,
                                 compiled.packed_metadata, None, None, None, *args, *values)
                except TypeError as exc:  # this Triton's launcher takes its arguments differently
                    self._give_up(exc)
                    key = None
                else:
                    if plan is not None:
                        if len(self._plans) >= MAX_PLANS:  # (sizes that keep changing: start again)
                            self._plans.clear()
                        self._plans[plan, device] = (compiled, grid, values)
                    return
        # Triton's dispatch: compiles (or loads) the kernel on a first launch, and returns it.
        compiled = self.kernel[(grid,)](*args, **constexprs, num_warps=num_warps, **launch_options())
        if key is not None and compiled is not None:
            self._compiled[key] = compiled

    def launch_planned(self, plan: tuple, args: tuple) -> bool:
        """Launch with ``args`` what the launch remembered under ``plan`` (on this device) launched:
        the same compiled kernel, grid and constexprs. False, launching nothing, when there is no such
        launch or direct launches are off right now; the caller then calls the launcher as usual.

        A plan skips what a launch spends most of its host time on: building the constexprs and
        Triton's specialization of every argument (``_key``). It is the caller's promise that ``plan``
        fixes the grid, the constexprs, ``num_warps``, and everything Triton specializes ``args`` on
        (``_key``): each tensor's dtype and 16-byte alignment, each int's value or, where the
        parameter is ``do_not_specialize``, its width. tests/kernels/direct_launch_check.py holds the
        launchers that make plans to that promise."""
        if not (self._plans and DIRECT_LAUNCH and _no_launch_hooks()):
            return False
        get_device, get_stream, _, _ = self._device_state
        device = get_device()
        planned = self._plans.get((plan, device))
        if planned is None:
            return False
        compiled, grid, values = planned
        compiled.run(grid, 1, 1, get_stream(device), compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *values)
        return True

    def _key(self, args: tuple, constexprs: dict, num_warps: int) -> tuple | None:
        """(device, num_warps, constexpr values, Triton's specialization of each argument), or None
        when it cannot be computed (then this launch goes through Triton's dispatch)."""
        if self._device_state is None:
            try:
                self._device_state = _device_state()
            except (AttributeError, ImportError) as exc:  # an unfamiliar Triton
                self._give_up(exc)
                return None
        get_device, _, specialize, backend = self._device_state
        if len(args) != len(self._value_flags):  # (the dispatch reports it)
            return None
        try:
            values = self._constexpr_values(constexprs)
            # (map rather than a generator: this runs once per launch, and a generator's frame per
            # argument costs as much as the C call it wraps.)
            specialization = tuple(map(specialize, itertools.repeat(backend), args, itertools.repeat(False),
                                       self._value_flags, self._align_flags))
        except (KeyError, TypeError):  # arguments the dispatch will report properly
            return None
        return get_device(), num_warps, values, specialization

    def _give_up(self, exc: Exception) -> None:
        self._direct = False
        self._plans.clear()
        _warn_no_direct_launch(exc)


def _device_state():
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler.compiler import make_backend
    from triton.runtime.driver import driver

    active = driver.active
    return (active.get_current_device, active.get_current_stream, native_specialize_impl,
            make_backend(active.get_current_target()))


def _no_launch_hooks() -> bool:
    """True when no launch hook is installed. (Triton 3.6+ keeps each hook as a chain, empty by default.)"""
    runtime = _knobs.runtime if _knobs is not None else None
    return (runtime is not None and _is_empty_hook(runtime.launch_enter_hook)
            and _is_empty_hook(runtime.launch_exit_hook))


def _is_empty_hook(hook) -> bool:
    return hook is None or getattr(hook, "calls", None) == []


_warned_no_direct = False


def _warn_no_direct_launch(exc: Exception) -> None:
    global _warned_no_direct
    if not _warned_no_direct:
        _warned_no_direct = True
        import warnings

        warnings.warn(f"tritonquant launches through Triton's dispatch ({type(exc).__name__}: {exc})",
                      RuntimeWarning, stacklevel=3)
