#!/usr/bin/env python
"""Where the time of a compressed training step goes: host (Python, launches) against GPU.

    python benchmarks/profile_host.py [--out DIR]        # CUDA; without it, a CPU run of the same steps

Why: on the H200 (docs/benchmarks.md) the step-time overhead of compress() did not depend on the bit
width or the batch size, so it is a per-tensor cost on the host. This script measures that cost piece
by piece, so each change to the pack path can be judged by a number.

1. Host microseconds per call, on a 64K-element bf16 tensor (the GPU finishes each kernel long before
   the host issues the next, so wall time is host time): the median over 5 rounds of 200 calls, with
   one synchronization at the end of each round.
       torch.empty        one allocation (a quantize makes two, a dequantize one)
       launch             _quantize_kernel[grid](...) through Triton's dispatch, and the same launch
                          through kernels/launch.KernelLauncher's direct path (the library's default)
       device context     torch.cuda.device(...) entered and left
       triton_quantize    the launcher: allocations, launch-config lookup, launch
       triton_dequantize  likewise
       quantize_with      the codec around the launcher (input checks, layout, PackedTensor)
       quantize_checked   the same without the input checks: what the pack hook calls
       pack hook          forward of a chain of 200 tanh ops under compress(bits=4), minus the same chain
                          without it, per saved tensor; "unpack hook" is the same for backward
   Each layer from triton_quantize up is measured with both launch paths, side by side.
   Then the hooks again, timed from inside (``HookTimer``) on a chain of 64 tanh ops, with 0, 1 and
   32 MiB of host memory copied between the links (``EvictHostCaches``): in a real step other code
   runs between two saved tensors and the hooks find the CPU's caches cold.
2. One training step of ResNet-50 (bf16 autocast, batch 32, 224 px) under compress(bits=4), after two
   warm-up steps, beside exact training, compress() with nothing to pack (its hooks and bookkeeping
   alone) and compress(bits=4) with every launch through Triton's dispatch: host time to issue
   forward + backward against the GPU time of the step (CUDA events; medians of STEP_ROUNDS steps each,
   the contexts taken in turn), the calls in one step that make
   the host wait for the GPU (synchronizations, cudaMalloc, cudaFree), the CUDA time of tritonquant's
   kernels against all kernels (torch.profiler), the host time of the compressed step's pack and
   unpack hooks by kind of saved tensor (``HookTimer``: packed, reused, kept, weight casts made again,
   pooling indices), and a cProfile of three steps (the 25 functions with the most own time).

Without CUDA the same measurements run on the CPU with the torch backend and no Triton launch; those
figures describe this machine's Python, not a GPU host.

Writes profile_host.md (and cprofile.txt) to --out, else $OUT, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

import tritonquant as tq
from tritonquant.codec import quantize_checked, quantize_with
from tritonquant.config import QuantConfig
from tritonquant.kernels import launch, torch_dequantize, torch_quantize, triton_dequantize, triton_quantize
from tritonquant.models import ResNet50Like, cnn_batch, cnn_loss

SMALL_ELEMENTS = 1 << 16
CHAIN_LENGTH = 200
ROUNDS, CALLS = 5, 200
STEP_ROUNDS = 5  # timed steps per context, medians reported
OUR_KERNELS = ("_quantize_kernel", "_dequantize_kernel", "_pack_bool_kernel", "_unpack_bool_kernel", "_encode_kernel",
               "_decode_kernel")


class HookTimer:
    """Host time spent in a block's pack and unpack hooks, by kind of saved tensor: what the pack hook
    returned (``Packed``, ``Kept``, ``RecastWeight``, ``WindowIndices``...; "(reused)" where it reused
    a packing of the same memory), and for each unpack the kind its handle was packed as (a handle
    that several saves share, as its first save).

    ``with timer.timing(session):`` around a step's forward and backward. Wall-clock seconds: on a GPU,
    where launches return before their kernels run, that is host time."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()  # ("pack" or "unpack", kind) -> seconds
        self.calls: collections.Counter = collections.Counter()
        self.steps = 0

    @contextlib.contextmanager
    def timing(self, session):
        from tritonquant.session import Session

        pack, unpack, stats = session._pack, Session._unpack, session.stats
        kinds: dict[int, str] = {}  # id(handle) -> its kind, for the unpack

        def timed_pack(t):
            reused_before = stats.deduplicated
            started = time.perf_counter()
            handle = pack(t)
            elapsed = time.perf_counter() - started
            kind = type(handle).__name__.lstrip("_") + (" (reused)" if stats.deduplicated > reused_before else "")
            kinds.setdefault(id(handle), kind)  # (a handle several saves share: the kind of its first)
            self.seconds["pack", kind] += elapsed
            self.calls["pack", kind] += 1
            return handle

        def timed_unpack(handle):
            started = time.perf_counter()
            t = unpack(handle)
            kind = kinds.get(id(handle), type(handle).__name__.lstrip("_"))
            self.seconds["unpack", kind] += time.perf_counter() - started
            self.calls["unpack", kind] += 1
            return t

        # (The pack hook is looked up on the block, the unpack hook on the class: traced.py's hooks call
        # the innermost block's _pack and Session._unpack.)
        session._pack, Session._unpack = timed_pack, staticmethod(timed_unpack)
        try:
            yield
        finally:
            del session._pack
            Session._unpack = staticmethod(unpack)
            self.steps += 1

    def total_ms(self, hook: str) -> float:
        """Milliseconds per step in ``hook`` ("pack" or "unpack"), every kind together."""
        return sum(seconds for (name, _), seconds in self.seconds.items() if name == hook) / max(self.steps, 1) * 1e3

    def mean_us(self, hook: str) -> float:
        """Microseconds per call of ``hook`` ("pack" or "unpack"), every kind together."""
        seconds = sum(seconds for (name, _), seconds in self.seconds.items() if name == hook)
        calls = sum(calls for (name, _), calls in self.calls.items() if name == hook)
        return seconds / max(calls, 1) * 1e6

    def rows(self) -> list[list[str]]:
        """[hook, kind, per step, us each, ms per step], the kinds of each hook by their time."""
        steps = max(self.steps, 1)
        order = sorted(self.calls, key=lambda key: (key[0] != "pack", -self.seconds[key]))
        return [[hook, kind, f"{self.calls[hook, kind] / steps:.0f}",
                 f"{self.seconds[hook, kind] / self.calls[hook, kind] * 1e6:.1f}",
                 f"{self.seconds[hook, kind] / steps * 1e3:.2f}"] for hook, kind in order]


HOOK_HEADERS = ["hook", "saved tensor, by what the pack hook returned", "per step", "us each", "ms per step"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us_per_call(fn: Callable[[], object], device: torch.device, calls: int = CALLS) -> float:
    """Median over ROUNDS of (wall time of `calls` calls, one sync at the end) / calls, in microseconds."""
    fn()
    synchronize(device)
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(rounds)


def chain_us_per_tensor(device: torch.device, backend: str) -> tuple[float, float]:
    """(pack, unpack) host microseconds per saved tensor: a tanh chain with and without compress()."""
    x = torch.randn(SMALL_ELEMENTS, device=device, dtype=torch.bfloat16, requires_grad=True)

    def run(ctx_factory) -> tuple[float, float]:
        forward, backward = [], []
        for _ in range(ROUNDS + 1):
            synchronize(device)
            started = time.perf_counter()
            with ctx_factory():
                y = x
                for _ in range(CHAIN_LENGTH):
                    y = torch.tanh(y)
            synchronize(device)
            middle = time.perf_counter()
            y.float().sum().backward()
            synchronize(device)
            forward.append(middle - started)
            backward.append(time.perf_counter() - middle)
        return statistics.median(forward[1:]), statistics.median(backward[1:])

    exact_forward, exact_backward = run(contextlib.nullcontext)
    packed_forward, packed_backward = run(lambda: tq.compress(bits=4, backend=backend))
    return ((packed_forward - exact_forward) / CHAIN_LENGTH * 1e6,
            (packed_backward - exact_backward) / CHAIN_LENGTH * 1e6)


# Host bytes copied between two saved tensors by ``hook_us_with_evicted_caches``: about one core's L2
# cache, and more than a server's L3 slice holds.
EVICT_BYTES = (1 << 20, 32 << 20)
EVICT_CHAIN_LENGTH, EVICT_ROUNDS = 64, 3


class EvictHostCaches(torch.autograd.Function):
    """The identity, copying a host buffer in forward and again in backward. Between two saved
    tensors of a real step the host runs other code (dispatch, cuDNN's and cuBLAS's set-up, the
    allocator), and a hook then finds little of its own code and data in the CPU's caches. A hook timed
    in a tight loop finds all of it, so this puts the copy between the links of the chain."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.buffers = source, target
        target.copy_(source)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        source, target = ctx.buffers
        target.copy_(source)
        return grad, None, None


def hook_us_with_evicted_caches(device: torch.device, backend: str, evict_bytes: int) -> tuple[float, float]:
    """(pack, unpack) host microseconds inside compress(bits=4)'s hooks per saved tensor of a tanh
    chain, with ``evict_bytes`` of host memory copied between its links (0: none, caches warm). Timed
    inside the hooks (``HookTimer``), so the copies themselves are not counted."""
    x = torch.randn(SMALL_ELEMENTS, device=device, dtype=torch.bfloat16, requires_grad=True)
    source = torch.empty(evict_bytes, dtype=torch.uint8)
    target = torch.empty_like(source)
    timer = HookTimer()
    for round_index in range(EVICT_ROUNDS + 1):  # (the first round warms up, untimed)
        session = tq.compress(bits=4, backend=backend)
        with timer.timing(session) if round_index else contextlib.nullcontext():
            with session:
                y = x
                for _ in range(EVICT_CHAIN_LENGTH):
                    y = torch.tanh(y)
                    if evict_bytes:
                        y = EvictHostCaches.apply(y, source, target)
            y.float().sum().backward()
        synchronize(device)
    return timer.mean_us("pack"), timer.mean_us("unpack")


def evicted_cache_rows(device: torch.device, backend: str) -> list[list[str]]:
    """[what, pack us, unpack us]: the hooks per saved tensor, caches warm and evicted (EVICT_BYTES)."""
    rows = []
    for evict_bytes in (0, *EVICT_BYTES):
        pack, unpack = hook_us_with_evicted_caches(device, backend, evict_bytes)
        what = f"{evict_bytes >> 20} MiB of host memory copied between saves" if evict_bytes else "caches warm"
        rows.append([what, f"{pack:.1f}", f"{unpack:.1f}"])
    return rows


EVICT_HEADERS = ["tanh chain under compress(bits=4), inside the hooks", "pack us per tensor", "unpack us per tensor"]


@contextlib.contextmanager
def launch_mode(direct: bool):
    """Launch through KernelLauncher's direct path (the default) or always through Triton's dispatch."""
    previous = launch.DIRECT_LAUNCH
    launch.DIRECT_LAUNCH = direct
    try:
        yield
    finally:
        launch.DIRECT_LAUNCH = previous


LAUNCH_MODES = {"dispatch": False, "direct": True}


def launch_costs(x: torch.Tensor, payload: torch.Tensor, meta: torch.Tensor, device: torch.device) -> list[list]:
    """[name, host us] of one quantize launch of ``x`` (bf16, 4 bits) through Triton's dispatch and
    through KernelLauncher's direct path. (Also run by benchmarks/host_stand_in.py, without a GPU.)"""
    from tritonquant.kernels.quantize import _launch_quantize, _quantize_kernel, quantize_launch_arguments

    grid = -(-meta.shape[0] // 16)
    arguments, constexprs = quantize_launch_arguments(x, payload, meta, bits=4, group_size=256, rows=16, num_warps=4)

    def dispatched_launch():
        return _quantize_kernel[(grid,)](*arguments, **constexprs, num_warps=4, **launch.launch_options())

    rows = [["launch, Triton's dispatch: _quantize_kernel[grid](...)", host_us_per_call(dispatched_launch, device)]]
    with launch_mode(True):
        rows.append(["launch, KernelLauncher direct path",
                     host_us_per_call(lambda: _launch_quantize(grid, arguments, constexprs, 4), device)])
    return rows


def call_costs(device: torch.device) -> list[list[str]]:
    on_gpu = device.type == "cuda"
    backend = "triton" if on_gpu else "torch"
    quantize = triton_quantize if on_gpu else torch_quantize
    dequantize = triton_dequantize if on_gpu else torch_dequantize
    x = torch.randn(SMALL_ELEMENTS, device=device, dtype=torch.bfloat16)
    payload, meta = quantize(x, 4, 256, False, False, 0, 0)
    out = torch.empty_like(x)
    config = QuantConfig(bits=4, backend=backend)
    rows = [
        ["torch.empty", host_us_per_call(lambda: torch.empty(1024, device=device, dtype=torch.uint8), device)],
    ]
    if not on_gpu:  # no Triton launches on the CPU path: one column of figures
        rows += [
            [f"{quantize.__name__}", host_us_per_call(lambda: quantize(x, 4, 256, False, False, 0, 0), device)],
            [f"{dequantize.__name__}", host_us_per_call(lambda: dequantize(payload, meta, out, 4, 256), device)],
            ["quantize_with", host_us_per_call(lambda: quantize_with(x, config), device)],
            ["quantize_checked", host_us_per_call(lambda: quantize_checked(x, config), device)],
        ]
        pack, unpack = chain_us_per_tensor(device, backend)
        rows += [["pack hook (per saved tensor)", pack], ["unpack hook (per saved tensor)", unpack]]
        return [[name, f"{us:.1f}"] for name, us in rows]

    rows += launch_costs(x, payload, meta, device)

    def device_context() -> None:
        with torch.cuda.device(device):
            pass

    rows.append(["torch.cuda.device(...) enter + exit", host_us_per_call(device_context, device)])
    # The library's own layers, launching each way; the same figures side by side.
    for label, direct in LAUNCH_MODES.items():
        with launch_mode(direct):
            pack, unpack = chain_us_per_tensor(device, backend)
            rows += [
                [f"{quantize.__name__} ({label})",
                 host_us_per_call(lambda: quantize(x, 4, 256, False, False, 0, 0), device)],
                [f"{dequantize.__name__} ({label})",
                 host_us_per_call(lambda: dequantize(payload, meta, out, 4, 256), device)],
                [f"quantize_with ({label})", host_us_per_call(lambda: quantize_with(x, config), device)],
                [f"quantize_checked ({label})", host_us_per_call(lambda: quantize_checked(x, config), device)],
                [f"pack hook per saved tensor ({label})", pack],
                [f"unpack hook per saved tensor ({label})", unpack],
            ]
    return [[name, f"{us:.1f}"] for name, us in rows]


def launch_path() -> str:
    """Whether the quantize launches of the steps above went the direct way or through Triton's
    dispatch: a launch hook installed by another library (a profiler) turns the direct path off."""
    from tritonquant.kernels.quantize import _launch_quantize

    if not launch.DIRECT_LAUNCH:
        return "Triton's dispatch (TRITONQUANT_DIRECT_LAUNCH=0)"
    if not launch._no_launch_hooks():
        return "Triton's dispatch (a Triton launch hook is installed)"
    if not _launch_quantize._compiled:
        return "Triton's dispatch (no direct launch was set up)"
    return f"direct ({len(_launch_quantize._compiled)} quantize specializations)"


def gpu_waits(step: Callable[[], None]) -> tuple[int, int, int]:
    """(synchronizing calls, cudaMalloc calls, cudaFree calls) during one ``step()`` after warm-up.

    Each of them can make the host wait for the GPU (cudaFree synchronizes the device), which puts
    the host's issue time in series with the GPU's. Synchronizing calls are counted by torch's sync
    debug mode (copies to the host, .item(), stream and device synchronizations); allocator calls
    by the caching allocator's own counters."""
    import warnings

    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    syncs = sum("synchronizing" in str(w.message) for w in caught)
    return (syncs, after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0),
            after.get("num_device_free", 0) - before.get("num_device_free", 0))


def resnet_step(device: torch.device, out_dir: Path) -> tuple[list[list[str]], str]:
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = ResNet50Like().to(device)
    batch = cnn_batch(32 if on_gpu else 2, size=224 if on_gpu else 64, classes=1000, device=device)
    backend = "triton" if on_gpu else "torch"

    # "compress, nothing packed": the hooks and the bookkeeping alone (every tensor is below min_bytes).
    contexts = {
        "exact": contextlib.nullcontext,
        "compress, nothing packed": lambda: tq.compress(bits=4, backend=backend, min_bytes=1 << 62),
        "compress(bits=4)": lambda: tq.compress(bits=4, backend=backend),
    }
    if on_gpu:  # the same step with every launch through Triton's dispatch, for the side-by-side figure
        contexts["compress(bits=4), Triton's dispatch"] = lambda: tq.compress(bits=4, backend=backend)

    def step(name: str) -> None:
        model.zero_grad(set_to_none=True)
        with launch_mode(not name.endswith("dispatch")):
            with contexts[name](), torch.autocast(device.type, dtype=torch.bfloat16):
                loss = cnn_loss(model, batch)
            loss.backward()

    for name in contexts:  # warm-up: compiles, the allocator's pools
        for _ in range(2):
            step(name)
    synchronize(device)
    hosts, gpus = {name: [] for name in contexts}, {name: [] for name in contexts}
    # Round-robin over the contexts: the GPU machine's host timings moved by up to 1.9x between two runs,
    # and taking every context's steps in turn spreads any drift within a run over all of them.
    for _ in range(STEP_ROUNDS):
        for name in contexts:
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            started = time.perf_counter()
            step(name)
            host_ms = (time.perf_counter() - started) * 1e3
            if on_gpu:
                end.record()
            synchronize(device)
            hosts[name].append(host_ms)
            gpus[name].append(start.elapsed_time(end) if on_gpu else float("nan"))
    rows = []
    for name in contexts:
        rows.append([f"ResNet-50 step, {name}: host ms to issue", f"{statistics.median(hosts[name]):.1f}"])
        rows.append([f"ResNet-50 step, {name}: step ms (events)", f"{statistics.median(gpus[name]):.1f}"])
        if on_gpu:
            syncs, mallocs, frees = gpu_waits(lambda: step(name))
            rows.append([f"ResNet-50 step, {name}: synchronizing calls / cudaMalloc / cudaFree",
                         f"{syncs} / {mallocs} / {frees}"])

    # Where the compressed step's extra host time is: its hooks, by kind of saved tensor. Each step is
    # timed alone (synchronized before and after), so that nothing waits on the previous one's kernels.
    timer = HookTimer()
    for _ in range(STEP_ROUNDS):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        session = tq.compress(bits=4, backend=backend)
        with timer.timing(session):
            with session, torch.autocast(device.type, dtype=torch.bfloat16):
                loss = cnn_loss(model, batch)
            loss.backward()
        synchronize(device)
    hook_rows = timer.rows()
    for hook in ("pack", "unpack"):
        rows.append([f"ResNet-50 step, compress(bits=4): host ms in the {hook} hook", f"{timer.total_ms(hook):.1f}"])

    if on_gpu:  # (before torch.profiler runs: it may install launch hooks of its own)
        rows.append(["ResNet-50 step: launch path of compress(bits=4)", launch_path()])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step("compress(bits=4)")
        synchronize(device)
    ours = total = 0.0
    for event in prof.key_averages():
        # Kernels only: a CPU op's self device time is that of the kernels it launched, which appear
        # again as events of their own (torch's profiler tables sum the same way).
        if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        device_us = event.self_device_time_total
        total += device_us
        if any(name in event.key for name in OUR_KERNELS):
            ours += device_us
    if on_gpu:
        rows.append(["ResNet-50 step: CUDA ms in tritonquant kernels", f"{ours / 1e3:.2f}"])
        rows.append(["ResNet-50 step: CUDA ms in all kernels", f"{total / 1e3:.2f}"])

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        step("compress(bits=4)")
    synchronize(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    (out_dir / "cprofile.txt").write_text(text.getvalue())
    return rows, hook_rows, text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (torch backend, no Triton launch)"
    header = f"Host profile on {where}; torch {torch.__version__}"
    rows = call_costs(device)
    table = tabulate(rows, headers=["what", "host us per call"], tablefmt="github")
    # Written now too, so that a failure (or the suite's time limit) in the step profile keeps it.
    (out_dir / "profile_host.md").write_text(f"# {header}\n\n{table}\n")
    backend = "triton" if device.type == "cuda" else "torch"
    cache_table = tabulate(evicted_cache_rows(device, backend), headers=EVICT_HEADERS, tablefmt="github",
                           disable_numparse=True)
    table = f"{table}\n\nThe same hooks with the host's caches evicted between saved tensors:\n\n{cache_table}"
    (out_dir / "profile_host.md").write_text(f"# {header}\n\n{table}\n")
    step_rows, hook_rows, profile_text = resnet_step(device, out_dir)
    step_table = tabulate(step_rows, headers=["what", "value"], tablefmt="github")
    hook_table = tabulate(hook_rows, headers=HOOK_HEADERS, tablefmt="github", disable_numparse=True)
    report = (f"# {header}\n\n{table}\n\n{step_table}\n\nThe compressed ResNet-50 step's hooks, host time by "
              f"kind of saved tensor (mean of {STEP_ROUNDS} steps, each timed alone):\n\n{hook_table}\n")
    (out_dir / "profile_host.md").write_text(report)
    print(report)
    print("\n".join(profile_text.splitlines()[:45]))
    print(f"\nwrote {out_dir / 'profile_host.md'} and {out_dir / 'cprofile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
