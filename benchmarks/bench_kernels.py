#!/usr/bin/env python
"""Kernel roofline: quantize and dequantize throughput against the device's own copy bandwidth.

For each kernel kind (quantize, dequantize), input dtype (bf16, fp32), bits (2, 4, 8) and input size
(1 MiB to 1 GiB of input bytes; --quick: 1, 16 and 256 MiB), and for standardized packings (per-channel
statistics: bf16 at 2 bits as BatchNorm inputs get, fp32 at 4 bits as softmax outputs do, and fp32 at 4
bits with one pair for every element, as log-probabilities get; --quick: 256 MiB only), it times, on a
CUDA device:
    triton     the Triton kernel with the autotuned launch config (tuned now if not cached)
    graph      the same, calls on rotating buffers run from one CUDA graph (``graph_ms_per_call``)
    heuristic  the same kernel forced to the untuned heuristic config
    torch      the plain-torch reference (tritonquant.kernels.torch_quantize / torch_dequantize)
    compiled   torch.compile of the torch reference: dynamic shapes, else static shapes at the largest
               size (a failure is reported per row)
GB/s counts the bytes a kernel must move: quantize reads the input and writes codes plus 8 bytes of
(base, step) per group of 256; dequantize reads those and writes the output. "%copy" divides by the
bandwidth of ``dst.copy_(src)`` on a large buffer (read + write) measured in the same run, so it is
the fraction of the achievable memory roofline. Below the largest sizes a copy need not reach that
bandwidth either, so each row also times a copy that moves the row's own bytes, and "triton %copy,
same bytes" divides the tuned kernel's rate by that copy's. GPU times are medians of
triton.testing.do_bench, but for the graph column.

Why the graph column: do_bench launches each call after flushing the L2 cache, and when the host takes
longer to launch a call than the GPU takes to flush (small tensors, a slow host), the wait lands inside
the timed interval: run 1 timed a 1 MiB quantize at 16 us, longer than a 16 MiB one. Captured in a CUDA
graph the calls run back to back without the host, as in a captured training step; each call reads
buffers of its own, 4 x the L2 cache in all (at most 256 calls: kernels/gpu_timing.py), so no call finds
its input in the cache. "graph %copy, same bytes" divides by a copy of the row's bytes timed the same way.
With --quick, torch.compile runs for 4-bit rows only (each compile costs tens of seconds); it is not
run for standardized rows.

Without CUDA the script still runs, in seconds: small sizes, the torch reference only, timed with
time.perf_counter and labelled as CPU figures (the Triton interpreter is far too slow to time
meaningfully, and torch.compile is skipped).

Writes bench_kernels.md and bench_kernels.json (GPU name, driver, torch/triton/python versions,
date) to --out, else $OUT, else benchmarks/results/.

Exit status: 0; 1 on a GPU when not one Triton kernel row was measured (a row's failure is otherwise
written into its cell, and the sweep goes on); 2 for --device cuda without a CUDA device.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

from tritonquant.bench import environment as shared_environment, write_atomically
from tritonquant.kernels import autotune, torch_dequantize, torch_quantize, triton_dequantize, triton_quantize
from tritonquant.kernels.gpu_timing import graph_ms_per_call, l2_cache_bytes, rotation_count

GROUP = 256
MIB = 1 << 20
KINDS = ("quantize", "dequantize")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BITS = (2, 4, 8)
GPU_SIZES_MIB = (1, 4, 16, 64, 256, 1024)
QUICK_GPU_SIZES_MIB = (1, 16, 256)
CPU_SIZES_KIB = (64, 256, 1024)
QUICK_CPU_SIZES_KIB = (64,)
IMPLS = ("triton", "graph", "heuristic", "torch", "compiled")
# Standardized packings timed on a GPU: (dtype, bits, layout) of BatchNorm inputs under bf16 autocast at 2
# bits and of fp32 softmax outputs at 4 bits, laid out as a 56x56 map of 256 channels in NCHW (ResNet-50's
# first stage: element i is in channel (i // 3136) % 256); and of fp32 log-probabilities at 4 bits, one
# pair of statistics for every element (their fixed shift, docs/format.md).
STANDARDIZED = (("bf16", 2, "channels"), ("fp32", 4, "channels"), ("fp32", 4, "one pair"))
STANDARDIZED_LAYOUTS = {"channels": (56 * 56, 256), "one pair": (1, 1)}  # layout: (channel stride, channels)
GPU_WARMUP_MS, GPU_REP_MS = 10, 50
# With --max-seconds, no torch.compile starts with less time than this left: a compile of the reference
# takes tens of seconds, and one still running at the stage's timeout is lost along with its time.
COMPILE_RESERVE_S = 50
CPU_NOTE = ("CPU figures (no CUDA device): torch reference only, timed with time.perf_counter. The Triton "
            "interpreter is far too slow to time meaningfully and torch.compile is not run. These are not GPU "
            "figures and say nothing about the Triton kernels' speed.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    started = time.monotonic()
    meta = environment(use_gpu)
    meta["mode"] = ("quick " if args.quick else "full ") + ("gpu" if use_gpu else "cpu")
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")

    def save(rows: list[dict], final: bool = False) -> str:
        # Called after each phase too, so a run cut short by a timeout still leaves its figures.
        meta["seconds"] = round(time.monotonic() - started, 1)
        meta["complete"] = final
        text = render(meta, rows)
        write_outputs(out_dir, meta, rows, text)
        return text

    rows = measure_gpu(args, meta, save) if use_gpu else measure_cpu(args, meta)
    print(save(rows, final=True))
    print(f"\nwrote {out_dir / 'bench_kernels.md'} and {out_dir / 'bench_kernels.json'}")
    # Every cell catches its own error (one must not stop the sweep), so a broken kernel would still exit
    # 0: on a GPU, a run without a single Triton figure is a failure (the GPU suite's stage then says so).
    if use_gpu and not any("triton_gbps" in row for row in rows):
        print("\nexit status 1: no Triton kernel row was measured (each row's triton cell says why)", flush=True)
        return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sweep (GPU: 1/16/256 MiB, compile 4-bit only)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (default); cpu: the small CPU table")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop starting new measurements after this long; the rest are marked skipped")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def gpu_ms(fn: Callable[[], object]) -> float:
    return autotune.benchmark(fn, GPU_WARMUP_MS, GPU_REP_MS)


def measure_gpu(args: argparse.Namespace, meta: dict, save: Callable[[list[dict]], object]) -> list[dict]:
    device = torch.device("cuda", torch.cuda.current_device())
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    sizes = QUICK_GPU_SIZES_MIB if args.quick else GPU_SIZES_MIB
    generator = torch.Generator(device=device).manual_seed(0)

    copy_bytes = (256 if args.quick else 1024) * MIB
    src = torch.ones(copy_bytes // 4, dtype=torch.float32, device=device)  # touched pages, not a zero page
    dst = torch.empty_like(src)
    copy_ms = gpu_ms(lambda: dst.copy_(src))
    src = dst = None  # (freed; rebinding, not del: the lambda above closes over them)
    meta["copy_buffer_mib"] = copy_bytes // MIB
    meta["copy_gbps"] = 2 * copy_bytes / (copy_ms * 1e6)
    copy_gbps = meta["copy_gbps"]
    same_size_copies: dict[int, float] = {}  # traffic bytes -> GB/s of a copy moving that many
    same_size_graph_copies: dict[int, float] = {}  # the same, timed as the graph column is
    l2_bytes = l2_cache_bytes(device)
    meta["l2_cache_mib"] = round(l2_bytes / MIB, 1)

    def inputs(row: dict):
        """(x, payload, meta, out, channel statistics or None) for one row."""
        dtype = DTYPES[row["dtype"]]
        n = row["elements"]
        x = torch.randn(n, generator=generator, device=device, dtype=torch.float32).to(dtype)
        channels = None
        if row["standardized"]:  # any positive scales will do for timing
            n_channels = channel_layout(row)[1]
            channels = torch.stack([torch.randn(n_channels, device=device),
                                    torch.rand(n_channels, device=device) + 0.5], 1)
        payload, meta_ = triton_quantize(x, row["bits"], GROUP, False, False, 0, 0, channels, channel_layout(row)[0])
        out = torch.empty(n, dtype=dtype, device=device)
        return x, payload, meta_, out, channels

    rows = [new_row(kind, dtype, bits, size * MIB) for kind in KINDS for dtype in DTYPES for bits in BITS
            for size in sizes]
    rows += [new_row(kind, dtype, bits, size * MIB, standardized=layout) for kind in KINDS
             for dtype, bits, layout in STANDARDIZED for size in (sizes[-1:] if args.quick else sizes)]
    # Pass 1: the Triton kernel (tuned and heuristic) and the torch reference, for every row. The largest
    # size first: its rows are the ones the bandwidth target reads, so a run short of time loses others.
    # (The table keeps its order.)
    for row in sorted(rows, key=lambda r: -r["input_bytes"]):
        if over(deadline):
            mark_skipped(row, ("triton", "graph", "heuristic", "torch"), "skipped (time budget)")
            continue
        try:
            x, payload, meta_, out, channels = inputs(row)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 1 GiB
            mark_skipped(row, ("triton", "graph", "heuristic", "torch"), short_error(exc))
            continue
        bits, n_groups, standardized = row["bits"], -(-row["elements"] // GROUP), bool(row["standardized"])
        stride = channel_layout(row)[0]
        if row["kind"] == "quantize":
            config = autotune.quantize_launch_config(x, n_groups, bits, GROUP, False, False, standardized)
            fns = {"triton": lambda: triton_quantize(x, bits, GROUP, False, False, 0, 0, channels, stride),
                   "torch": lambda: torch_quantize(x, bits, GROUP, False, False, 0, 0, channels, stride)}
        else:
            config = autotune.dequantize_launch_config(out, n_groups, bits, GROUP, standardized)
            fns = {"triton": lambda: triton_dequantize(payload, meta_, out, bits, GROUP, channels, stride),
                   "torch": lambda: torch_dequantize(payload, meta_, out, bits, GROUP, channels, stride)}
        heuristic = autotune.heuristic_config(n_groups, GROUP)
        # rows x warps, and x tiles a program where a quantize program takes more than one
        row["config"] = "x".join(str(part) for part in (config if len(config) == 3 and config[2] > 1 else config[:2]))
        row["heuristic_config"] = f"{heuristic.rows}x{heuristic.num_warps}"

        def forced_heuristic() -> object:
            with autotune.use_config(heuristic):
                return fns["triton"]()

        fns["heuristic"] = forced_heuristic
        for impl in ("triton", "heuristic", "torch"):
            record(row, impl, copy_gbps, lambda: gpu_ms(fns[impl]))
        x = payload = meta_ = out = channels = fns = None  # freed before the next row's buffers
        record_same_size_copy(row, device, same_size_copies)  # (after: it allocates as much again)
        record(row, "graph", copy_gbps, lambda: graph_row_ms(row, inputs, l2_bytes))
        record_same_size_graph_copy(row, device, l2_bytes, same_size_graph_copies)
        torch.cuda.empty_cache()
        # After every row: a row that tunes a new setting can run past the stage's time limit, and the
        # SIGINT that stops it must not take the rows already measured with it.
        save(rows)

    print("pass 1 (triton, heuristic, torch) done; compiling the torch reference", flush=True)
    for row in rows:
        if row["standardized"]:
            mark_skipped(row, ("compiled",), "not run (standardized)")
    # Pass 2: torch.compile of the reference, per (kind, dtype, bits) (compile_rows).
    for kind in KINDS:
        for dtype in DTYPES:
            for bits in BITS:
                group_rows = [r for r in rows if (r["kind"], r["dtype"], r["bits"]) == (kind, dtype, bits)
                              and not r["standardized"]]
                if args.quick and bits != 4:
                    for row in group_rows:
                        mark_skipped(row, ("compiled",), "not run (--quick: 4-bit only)")
                    continue
                if not compile_fits(deadline):
                    for row in group_rows:  # a compile takes tens of seconds: do not start one late
                        mark_skipped(row, ("compiled",), "skipped (time budget)")
                    continue
                compile_rows(group_rows, kind, bits, inputs, copy_gbps, deadline)
                save(rows)
    return rows


def compile_rows(rows: list[dict], kind: str, bits: int, inputs, copy_gbps: float, deadline: float | None) -> None:
    """torch.compile of the reference for one (kind, dtype, bits), rows in increasing size: one compile
    with dynamic shapes serves every size. If it fails, one more compile with static shapes is tried,
    at the largest size only: that is where the roofline target is, and a compile costs tens of
    seconds. Each measured row records ``compile_mode``; every failure's traceback goes to the log."""
    import torch._dynamo

    def make(dynamic: bool):
        # A fresh dynamo cache per combination: the closures share one code object, and the recompile
        # limit would otherwise silently fall back to eager after a few of them.
        torch._dynamo.reset()
        if kind == "quantize":
            return torch.compile(lambda t: torch_quantize(t, bits, GROUP, False, False, 0, 0), dynamic=dynamic)
        return torch.compile(lambda p, m, o: torch_dequantize(p, m, o, bits, GROUP), dynamic=dynamic)

    def compile_and_time(row: dict, compiled, mode: str) -> str | None:
        """Measure ``row`` with ``compiled``; the compile's failure text, or None."""
        try:
            x, payload, meta_, out, _ = inputs(row)
        except Exception as exc:  # noqa: BLE001
            mark_skipped(row, ("compiled",), short_error(exc))
            return None

        def fn():
            return compiled(x) if kind == "quantize" else compiled(payload, meta_, out)

        try:
            started = time.monotonic()
            fn()  # compiles on the first call
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - report per row, never crash the sweep
            # The table keeps one line; the log gets the whole story (the first line alone rarely says why).
            print(f"torch.compile ({mode} shapes) of the {kind} reference ({bits} bits) failed:", flush=True)
            traceback.print_exception(exc, limit=-8)
            return "compile failed: " + short_error(exc)
        row["compile_s"] = round(time.monotonic() - started, 1)
        row["compile_mode"] = mode
        record(row, "compiled", copy_gbps, lambda: gpu_ms(fn))
        return None

    compiled_dynamic = make(True)
    for i, row in enumerate(rows):
        if over(deadline):
            mark_skipped(row, ("compiled",), "skipped (time budget)")
            continue
        failure = compile_and_time(row, compiled_dynamic, "dynamic")
        torch.cuda.empty_cache()  # (the row's buffers are freed by now)
        if failure is not None:
            break
    else:
        return
    largest = rows[-1]
    for row in rows[i:-1]:
        mark_skipped(row, ("compiled",), f"{failure} (dynamic shapes; static shapes tried at the largest size only)")
    if not compile_fits(deadline):  # a second compile, as long as the first
        mark_skipped(largest, ("compiled",), "skipped (time budget)")
        return
    static_failure = compile_and_time(largest, make(False), "static")
    torch.cuda.empty_cache()
    if static_failure is not None:
        mark_skipped(largest, ("compiled",), f"{static_failure} (dynamic and static shapes)")


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------


def cpu_ms(fn: Callable[[], object], min_seconds: float = 0.02, max_reps: int = 20) -> float:
    """Median wall time of fn() in ms (perf_counter), after one warm-up call."""
    fn()
    times = []
    total = 0.0
    while len(times) < 3 or (total < min_seconds and len(times) < max_reps):
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        times.append(elapsed)
        total += elapsed
    return statistics.median(times) * 1e3


def measure_cpu(args: argparse.Namespace, meta: dict) -> list[dict]:
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    sizes = QUICK_CPU_SIZES_KIB if args.quick else CPU_SIZES_KIB
    generator = torch.Generator().manual_seed(0)
    copy_bytes = 64 * MIB
    src = torch.ones(copy_bytes // 4, dtype=torch.float32)  # touched pages, not a zero page
    dst = torch.empty_like(src)
    meta["copy_buffer_mib"] = copy_bytes // MIB
    meta["copy_gbps"] = 2 * copy_bytes / (cpu_ms(lambda: dst.copy_(src)) * 1e6)
    src = dst = None  # (freed; rebinding, not del: the lambda above closes over them)
    meta["note"] = CPU_NOTE
    rows = [new_row(kind, dtype, bits, size * 1024) for kind in KINDS for dtype in DTYPES for bits in BITS
            for size in sizes]
    for row in rows:
        mark_skipped(row, ("triton", "heuristic", "compiled"), "not run on CPU")
        if over(deadline):
            mark_skipped(row, ("torch",), "skipped (time budget)")
            continue
        dtype, bits, n = DTYPES[row["dtype"]], row["bits"], row["elements"]
        x = torch.randn(n, generator=generator).to(dtype)
        if row["kind"] == "quantize":
            record(row, "torch", meta["copy_gbps"],
                   lambda: cpu_ms(lambda: torch_quantize(x, bits, GROUP, False, False, 0, 0)))
        else:
            payload, meta_ = torch_quantize(x, bits, GROUP, False, False, 0, 0)
            out = torch.empty(n, dtype=dtype)
            record(row, "torch", meta["copy_gbps"],
                   lambda: cpu_ms(lambda: torch_dequantize(payload, meta_, out, bits, GROUP)))
    return rows


# ---------------------------------------------------------------------------------------------
# rows, environment, output
# ---------------------------------------------------------------------------------------------


def new_row(kind: str, dtype: str, bits: int, input_bytes: int, standardized: str | None = None) -> dict:
    """One row of the table; ``standardized``: a layout of STANDARDIZED_LAYOUTS, or None for a plain packing.
    Standardized rows move the same bytes (plus C x 8 of statistics, negligible)."""
    if standardized is not None and standardized not in STANDARDIZED_LAYOUTS:
        raise ValueError(f"standardized must be one of {tuple(STANDARDIZED_LAYOUTS)} or None, got {standardized!r}")
    elements = input_bytes // DTYPES[dtype].itemsize
    label = kind if standardized is None else f"{kind}, standardized" + (
        "" if standardized == "channels" else f", {standardized}")
    return {"kind": kind, "label": label, "dtype": dtype, "bits": bits, "group_size": GROUP,
            "input_bytes": input_bytes, "elements": elements, "standardized": standardized,
            "traffic_bytes": autotune.traffic_bytes(kind, elements, bits, GROUP, DTYPES[dtype].itemsize)}


def channel_layout(row: dict) -> tuple[int, int]:
    """(channel stride, channels) of a standardized row's layout; (1, 1) for a plain row (unused there)."""
    return STANDARDIZED_LAYOUTS.get(row["standardized"], (1, 1))


def record(row: dict, impl: str, copy_gbps: float, time_ms: Callable[[], float]) -> None:
    """Time one implementation of a row; an exception becomes that cell's error text."""
    try:
        ms = time_ms()
    except Exception as exc:  # noqa: BLE001
        mark_skipped(row, (impl,), short_error(exc))
        return
    gbps = row["traffic_bytes"] / (ms * 1e6)
    row[f"{impl}_ms"] = ms
    row[f"{impl}_gbps"] = gbps
    row[f"{impl}_frac"] = gbps / copy_gbps


def record_same_size_copy(row: dict, device: torch.device, cache: dict[int, float]) -> None:
    """Time ``dst.copy_(src)`` moving the row's traffic bytes (half read, half written; once per
    distinct size, kept in ``cache``) and, when the Triton row was measured, its rate as a fraction of
    that copy's: the roofline at this size rather than at the largest."""

    def copy_ms(elements: int) -> float:
        src = torch.ones(elements, dtype=torch.float32, device=device)  # touched pages, not a zero page
        dst = torch.empty_like(src)
        return gpu_ms(lambda: dst.copy_(src))

    _record_copy_of_row_bytes(row, "triton", copy_ms, cache)


def _record_copy_of_row_bytes(row: dict, impl: str, copy_ms: Callable[[int], float], cache: dict[int, float]) -> None:
    """The "same bytes" figures of ``impl``'s column: ``copy_ms(elements)`` times a float32 copy of
    ``elements`` values, moving the row's traffic bytes (once per distinct size, kept in ``cache``); its
    GB/s, and ``impl``'s rate as a fraction of it. A failure (out of memory) leaves the row its other
    figures."""
    prefix = "" if impl == "triton" else f"{impl}_"
    n_bytes = row["traffic_bytes"]
    if n_bytes not in cache:
        elements = max(1, n_bytes // 8)  # float32: 4 bytes read and 4 written per element
        try:
            cache[n_bytes] = 8 * elements / (copy_ms(elements) * 1e6)
        except Exception as exc:  # noqa: BLE001
            mark_skipped(row, (f"{prefix}size_copy",), short_error(exc))
            return
    row[f"{prefix}size_copy_gbps"] = cache[n_bytes]
    if f"{impl}_gbps" in row:
        row[f"{impl}_frac_of_size_copy"] = row[f"{impl}_gbps"] / cache[n_bytes]


def graph_row_ms(row: dict, inputs: Callable[[dict], tuple], l2_bytes: int) -> float:
    """The graph column of ``row``: its tuned Triton kernel, by ``graph_ms_per_call``, on buffer sets made
    by ``inputs(row)``."""
    bits, stride = row["bits"], channel_layout(row)[0]
    sets = [inputs(row) for _ in range(rotation_count(row["input_bytes"], l2_bytes))]
    if row["kind"] == "quantize":
        calls = [functools.partial(triton_quantize, x, bits, GROUP, False, False, 0, 0, channels, stride)
                 for x, _, _, _, channels in sets]
    else:
        calls = [functools.partial(triton_dequantize, payload, meta_, out, bits, GROUP, channels, stride)
                 for _, payload, meta_, out, channels in sets]
    return graph_ms_per_call(calls)


def record_same_size_graph_copy(row: dict, device: torch.device, l2_bytes: int, cache: dict[int, float]) -> None:
    """``record_same_size_copy`` for the graph column: copies of the row's bytes timed as it is."""

    def copy_ms(elements: int) -> float:
        pairs = [(torch.ones(elements, dtype=torch.float32, device=device),
                  torch.empty(elements, dtype=torch.float32, device=device))
                 for _ in range(rotation_count(4 * elements, l2_bytes))]
        return graph_ms_per_call([functools.partial(dst.copy_, src) for src, dst in pairs])

    _record_copy_of_row_bytes(row, "graph", copy_ms, cache)


def mark_skipped(row: dict, impls, reason: str) -> None:
    for impl in impls:
        row.setdefault(f"{impl}_error", reason)


def over(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def compile_fits(deadline: float | None) -> bool:
    """Whether a torch.compile started now should finish before ``deadline`` (time.monotonic seconds;
    None: no deadline): COMPILE_RESERVE_S or more is left."""
    return deadline is None or deadline - time.monotonic() >= COMPILE_RESERVE_S


def short_error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:120]}"


def environment(use_gpu: bool) -> dict:
    meta = shared_environment()
    meta.update(group_size=GROUP, autotune=autotune.autotune_enabled(), autotune_cache=str(autotune.cache_path()))
    if use_gpu:
        meta["timer"] = f"triton.testing.do_bench median (warmup {GPU_WARMUP_MS} ms, rep {GPU_REP_MS} ms)"
    else:
        meta.update(device="cpu", gpu=None, cpu=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads(), timer="time.perf_counter median")
    return meta


def table(rows: list[dict], ran: tuple[str, ...]) -> str:
    """One line per row; a cell that was not measured shows why (error, skipped, not run)."""
    headers = ["kind", "dtype", "bits", "input", "moved MB"]
    if "triton" in ran:
        headers.append("config")
    for impl in ran:
        headers += [f"{impl} GB/s", f"{impl} %copy"]
        if impl in ("triton", "graph"):
            headers.append(f"{impl} %copy, same bytes")
    lines = []
    for row in rows:
        line = [row["label"], row["dtype"], str(row["bits"]),
                size_label(row["input_bytes"]),
                number(row["traffic_bytes"] / 1e6)]
        if "triton" in ran:
            line.append(row.get("config", ""))
        for impl in ran:
            if f"{impl}_gbps" in row:
                static = " (static shapes)" if impl == "compiled" and row.get("compile_mode") == "static" else ""
                line += [number(row[f"{impl}_gbps"]) + static, f"{100 * row[f'{impl}_frac']:.1f}%"]
            else:
                line += [row.get(f"{impl}_error", ""), ""]
            if impl in ("triton", "graph"):
                prefix = "" if impl == "triton" else "graph_"
                same = row.get(f"{impl}_frac_of_size_copy")
                line.append(f"{100 * same:.1f}%" if same is not None else row.get(f"{prefix}size_copy_error", ""))
        lines.append(line)
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True)


def number(value: float) -> str:
    """Three significant figures, without exponents for the magnitudes met here."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def size_label(n_bytes: int) -> str:
    if n_bytes >= 1 << 30:
        return f"{n_bytes / (1 << 30):g} GiB"
    if n_bytes >= MIB:
        return f"{n_bytes / MIB:g} MiB"
    return f"{n_bytes / 1024:g} KiB"


def render(meta: dict, rows: list[dict]) -> str:
    if meta["device"] == "cuda":
        partial = "" if meta.get("complete", True) else "PARTIAL RESULTS (run still in progress or cut short).\n"
        head = partial + (f"Kernel roofline on {meta['gpu']} (sm {meta['capability']}, driver {meta['driver'] or 'unknown'}, "
                f"CUDA {meta['cuda_runtime']}), torch {meta['torch']}, triton {meta['triton']}, {meta['date']}.\n"
                f"Copy bandwidth (torch copy_ of {meta['copy_buffer_mib']} MiB, read + write): "
                f"{meta['copy_gbps']:.0f} GB/s. GB/s = (bytes read + bytes written) / median time; "
                f"%copy = that / copy bandwidth. config = autotuned rows x num_warps.")
    else:
        head = (f"{meta['note']}\nCPU: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, "
                f"{meta['date']}. Copy bandwidth (copy_ of {meta['copy_buffer_mib']} MiB, read + write): "
                f"{meta['copy_gbps']:.1f} GB/s. GB/s = (bytes read + bytes written) / median time.")
    return head + "\n\n" + table(rows, IMPLS if meta["device"] == "cuda" else ("torch",))


def write_outputs(out_dir: Path, meta: dict, rows: list[dict], text: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    title = "# Kernel roofline (CPU figures)" if meta["device"] == "cpu" else "# Kernel roofline"
    write_atomically(out_dir / "bench_kernels.md", f"{title}\n\n{text}\n")
    write_atomically(out_dir / "bench_kernels.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
