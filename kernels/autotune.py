"""Per-GPU autotuning of the quantize/dequantize launch configuration, with a small on-disk cache.

What is tuned: ``rows`` (groups a tile, the kernels' ``ROWS``), ``num_warps``, and for quantize ``tiles``
(tiles a program quantizes in turn, loading the next while it computes: the kernel's ``TILES``).
``num_stages`` is left at Triton's default: Triton's own pipelining does not overlap these kernels'
plain pointer loads (docs/kernels.md, "Quantize from bf16: bytes in flight"); ``tiles`` does it by hand.
The tile never changes the result: every group is computed independently from its own elements, so the
bytes written are identical for every configuration (tests/kernels/test_autotune.py checks this).

Key (``TuneKey``): GPU name, compute capability, Triton version, kernel kind ("quantize"/"dequantize"),
bits, group_size, sigma flag, stochastic flag, dtype (input for quantize, output for dequantize) and a
size bucket. Dequantize does not depend on the scheme or the rounding, so its key has both flags False.
The bucket of n elements is the smallest k with 4**k >= n, clamped to MAX_TUNED_BUCKET; each bucket is
timed on real buffers of 4**k elements with ``triton.testing.do_bench``. Buckets below MIN_TUNED_BUCKET
are launch-bound (the tile barely matters and timing them measures launch overhead), so they use the
heuristic of ``launch.default_group_tile`` and are never timed.

Lookup order on a launch: a config forced with ``use_config`` (this thread) -> the interpreter's single
config (TRITON_INTERPRET=1, no timing) -> the heuristic when TRITONQUANT_AUTOTUNE=0, the tensor is
small or the packing is standardized (its kernels hold more registers than the tuned plain ones) ->
the in-process dict -> the cache file -> tune now (once per key and process, under a lock) and
persist. Once a key is in the dict a launch costs one dict lookup on Python values: no host sync.

Cache file: ``$TRITONQUANT_CACHE_DIR/autotune-<FORMAT_VERSION>.json`` if that variable is set, else
``$XDG_CACHE_HOME/tritonquant/...`` or ``~/.cache/tritonquant/...``. A corrupt file, a file of another
format version, or an unreadable one is ignored (and replaced at the next save); entries are merged
under an advisory file lock and written to a temporary file in the same folder, then ``os.replace``d,
so readers never see a partial file. An unwritable folder only costs a warning: configs then live in
memory for the rest of the process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import triton

from .gpu_timing import graph_ms_per_call, l2_cache_bytes, rotation_count
from .launch import default_group_tile, env_flag, is_interpreted, next_power_of_2

# Bumped whenever a kernel changes in a way that can move its best tile (its tiling, its registers), so
# that configs timed for the old kernel are not reused
# (2: _quantize_kernel shares a group among 8 threads instead of a warp; _dequantize_kernel loads its
# payload without a round trip through shared memory. 3: under Triton before 3.7 that sharing now
# happens too (quantize.split_axis_first); neither kernel converts between float and int per element.
# 4: _quantize_kernel's row reductions shuffle once per row, with fewer registers under Triton 3.6, and
# tiles of 8 rows or more per warp share each row among 4 threads instead of 8. 5: fp16 ranges are
# found in fp16, with 40-96 registers instead of 68-128. 6: each value's code bounds come from two
# selects by its sign, float32 inputs test signs after the reductions, and nearest rounding rounds
# the product once in an fma: registers move by -24 to +47 under Triton 3.6. 7: quantize configs carry
# ``tiles``, and pipelined ones are candidates).
FORMAT_VERSION = 7
ENV_AUTOTUNE = "TRITONQUANT_AUTOTUNE"  # "0" (or off/false/no): never tune, use the heuristic
ENV_CACHE_DIR = "TRITONQUANT_CACHE_DIR"  # folder of the cache file, overrides the user cache dir

KINDS = ("quantize", "dequantize")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

MIN_TUNED_BUCKET = 8  # lower buckets (tensors of at most 4**7 = 16,384 elements) use the heuristic
MAX_TUNED_BUCKET = 13  # 4**13 = 67,108,864 elements (256 MiB of fp32); larger tensors share this bucket

# (elements per program, num_warps) pairs worth timing: 8 to 64 elements a thread, the range where a
# memory-bound kernel with per-row reductions neither starves the memory system nor spills registers.
# At group size 256, _quantize_kernel gives a warp at least 4 groups (8 threads each, or 4 in tiles of
# 8 rows or more per warp: quantize.threads_per_group), so its tiles hold at least 4 groups per warp;
# (1024, 2) and (1024, 4), which give a warp fewer, are there for the dequantize kernel (the H200 run
# chose them for 22 of its 39 dequantize keys).
CANDIDATE_TILES = ((1024, 1), (1024, 2), (1024, 4), (2048, 2), (4096, 2), (4096, 4), (8192, 4), (8192, 8),
                   (16384, 8))
# Quantize also times these tiles pipelined, PIPELINED_TILES tiles a program (quantize.py, TILES): by
# their registers, the tiles that let an SM keep the most input in flight while it computes
# (benchmarks/bytes_in_flight.py; docs/kernels.md, "Quantize from bf16: bytes in flight").
PIPELINED_CANDIDATE_TILES = ((2048, 2), (4096, 2), (4096, 4), (8192, 4))
PIPELINED_TILES = 4
VALID_NUM_WARPS = (1, 2, 4, 8, 16, 32)
MAX_TILE_ELEMENTS = 1 << 20  # Triton's largest block

# do_bench settings while tuning: short, because a key has up to len(CANDIDATE_TILES) configs to time.
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 20
# Buckets up to this one (4**12 elements: 32 MiB of bf16, about 15 us to quantize on an H200) are timed
# from a CUDA graph, on buffer sets whose bytes add up to 4 x the L2 cache (gpu_timing). do_bench, which
# times each call from the host, timed the gaps between the host's launches there: on the H200 the
# plain kernels at 16 MiB ran at 31-67% more GB/s from a graph than by do_bench, while at 256 MiB the
# graph gave 0.2-11% less (docs/results/2026-11-30-h200/bench_kernels.json).
GRAPH_TIMED_MAX_BUCKET = 12

_LOCK_TIMEOUT_S = 5.0
_TRITON_VERSION = triton.__version__


class LaunchConfig(NamedTuple):
    """One launch configuration: ``rows`` groups a tile (a power of two), ``num_warps``, and ``tiles``, the
    tiles one quantize program takes in turn (dequantize always takes one; so does a standardized
    quantize, whatever the config says)."""

    rows: int
    num_warps: int
    tiles: int = 1


class TuneKey(NamedTuple):
    """What a tuned config is valid for. ``capability`` is (major, minor); ``dtype`` a DTYPES name."""

    gpu: str
    capability: tuple[int, int]
    triton: str
    kind: str
    bits: int
    group_size: int
    sigma: bool
    stochastic: bool
    dtype: str
    bucket: int


class CacheEntry(NamedTuple):
    """A config with its measured time in ms (None when not timed) and the heuristic's time."""

    config: LaunchConfig
    ms: float | None = None
    heuristic_ms: float | None = None


class TuneResult(NamedTuple):
    """Outcome of ``get_or_tune``/``tune``. ``source``: "tuned", "cached", "single" (one candidate,
    not timed) or "failed" (tuning raised; the heuristic is used and ``error`` says why)."""

    key: TuneKey
    entry: CacheEntry
    source: str
    timings: dict[LaunchConfig, float]
    error: str | None = None


# In-process state. The hot path reads ``_resolved`` (one dict lookup on a plain tuple), and on a miss
# ``_entries`` and ``_identities``; ``_resolved`` is emptied whenever ``_entries`` changes.
_entries: dict[TuneKey, CacheEntry] = {}
_identities: dict[torch.device, tuple[str, tuple[int, int]]] = {}
_resolved: dict[tuple, LaunchConfig] = {}
# Counts the times ``_resolved`` was emptied: a config read when it had another value may since have
# changed (config_generation).
_generation = 0
_tune_lock = threading.Lock()  # one tuning at a time per process; also guards disk merges
_file_lock = threading.Lock()  # one writer per process (across processes: the advisory lock file)
_thread_state = threading.local()
# How many use_config blocks are open, in any thread: while none is, the hot path skips the
# thread-local lookup (a Python-level getattr, the costliest step of a cached lookup).
_open_forcings = 0
_forcing_lock = threading.Lock()
_warned: set[str] = set()


# ---------------------------------------------------------------------------------------------
# Keys and candidates
# ---------------------------------------------------------------------------------------------


def autotune_enabled() -> bool:
    """False when TRITONQUANT_AUTOTUNE is 0/off/false/no (read on every call, so tests can flip it)."""
    return env_flag(ENV_AUTOTUNE)


def size_bucket(n_elements: int) -> int:
    """Smallest k with 4**k >= n_elements, clamped to MAX_TUNED_BUCKET."""
    k = ((max(n_elements, 1) - 1).bit_length() + 1) // 2
    return min(k, MAX_TUNED_BUCKET)


def bucket_elements(bucket: int) -> int:
    """Elements of the buffers a bucket is timed on: 4**bucket."""
    return 4**bucket


def device_identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(GPU name, (major, minor) compute capability) of a CUDA device; (device type, (0, 0)) otherwise."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return torch.cuda.get_device_name(device), (int(major), int(minor))
    return device.type, (0, 0)


def _identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    identity = _identities.get(device)
    if identity is None:
        identity = _identities.setdefault(device, device_identity(device))
    return identity


def make_key(
    kind: str, device: torch.device, dtype: torch.dtype | str, n_elements: int, bits: int, group_size: int,
    sigma: bool = False, stochastic: bool = False,
) -> TuneKey:
    """The cache key for one launch. ``dtype``: a torch float dtype or a DTYPES name."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name = dtype if isinstance(dtype, str) else _DTYPE_NAMES[dtype]
    if kind == "dequantize":  # decoding is base + code * step whatever the scheme and rounding
        sigma = stochastic = False
    gpu, capability = _identity(device)
    return TuneKey(gpu, capability, _TRITON_VERSION, kind, bits, group_size, bool(sigma), bool(stochastic), name,
                   size_bucket(n_elements))


def heuristic_config(n_groups: int, group_size: int) -> LaunchConfig:
    """The untuned GPU config (``launch.default_group_tile``), also used when tuning is off or fails."""
    return LaunchConfig(*default_group_tile(n_groups, group_size, interpreted=False))


def interpreter_config(n_groups: int, group_size: int) -> LaunchConfig:
    """The single config used under TRITON_INTERPRET=1: few, large tiles (the interpreter is per-program slow)."""
    return LaunchConfig(*default_group_tile(n_groups, group_size, interpreted=True))


def candidate_configs(n_groups: int, group_size: int, interpreted: bool | None = None,
                      pipelined: bool = False) -> list[LaunchConfig]:
    """Configs worth timing for ``n_groups`` groups, the heuristic first (ties keep it); with ``pipelined``
    (quantize) also PIPELINED_CANDIDATE_TILES at PIPELINED_TILES tiles a program, where the tensor has
    groups for all of a program's tiles.

    Under the interpreter (``interpreted``; None: ``launch.is_interpreted()``) this is the one interpreter
    config.
    """
    if interpreted is None:
        interpreted = is_interpreted()
    if interpreted:
        return [interpreter_config(n_groups, group_size)]
    cap = next_power_of_2(n_groups)
    configs = [heuristic_config(n_groups, group_size)]
    for tile, num_warps in CANDIDATE_TILES:
        config = LaunchConfig(min(max(1, tile // group_size), cap), num_warps)
        if config not in configs:
            configs.append(config)
    if pipelined:
        for tile, num_warps in PIPELINED_CANDIDATE_TILES:
            rows = max(1, tile // group_size)
            config = LaunchConfig(rows, num_warps, PIPELINED_TILES)
            if rows * PIPELINED_TILES <= cap and config not in configs:
                configs.append(config)
    return configs


def traffic_bytes(kind: str, n_elements: int, bits: int, group_size: int, element_size: int) -> int:
    """Bytes a kernel must move (read plus written) for n elements of ``element_size`` bytes.

    quantize reads the input and writes payload + meta (8 bytes a group); dequantize the reverse, so
    ``kind`` does not change the count (it names the kernel at call sites).
    """
    n_groups = -(-n_elements // group_size)
    return n_elements * element_size + n_groups * group_size * bits // 8 + n_groups * 8


# ---------------------------------------------------------------------------------------------
# The hot path
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def use_config(config: LaunchConfig | tuple[int, ...]) -> Iterator[LaunchConfig]:
    """Force every quantize/dequantize launch of this thread to ``config`` (rows, num_warps[, tiles]) while
    open (``tiles``, 1 when left out, applies to plain quantize launches only: LaunchConfig).

    Used by the tuner to time candidates and by tests; results do not depend on the config.
    """
    config = LaunchConfig(*config)
    if config.rows < 1 or config.rows & (config.rows - 1):
        raise ValueError(f"rows must be a power of two >= 1, got {config.rows}")
    if config.num_warps not in VALID_NUM_WARPS:
        raise ValueError(f"num_warps must be one of {VALID_NUM_WARPS}, got {config.num_warps}")
    if isinstance(config.tiles, bool) or not isinstance(config.tiles, int) or config.tiles < 1:
        raise ValueError(f"tiles must be an int >= 1, got {config.tiles!r}")
    global _open_forcings
    previous = getattr(_thread_state, "config", None)
    _thread_state.config = config
    with _forcing_lock:
        _open_forcings += 1
    try:
        yield config
    finally:
        _thread_state.config = previous
        with _forcing_lock:
            _open_forcings -= 1


def active_override() -> LaunchConfig | None:
    """The config forced by ``use_config`` on this thread, or None."""
    return getattr(_thread_state, "config", None)


def config_generation() -> int | None:
    """A number that changes whenever a launch config returned before may no longer be the one this
    process would return (a tuning finished, the entries were reset), for callers that remember a config
    across calls (``quantize.prepare_quantize``); None while a ``use_config`` block is open in any
    thread, when nothing should be remembered."""
    return None if _open_forcings else _generation


def _forget_resolved() -> None:
    global _generation
    _resolved.clear()
    _generation += 1


def quantize_launch_config(
    flat: torch.Tensor, n_groups: int, bits: int, group_size: int, sigma: bool, stochastic: bool,
    standardize: bool = False,
) -> tuple[int, int, int]:
    """(rows, num_warps, tiles) for quantizing the 1-D tensor ``flat`` (float32/float16/bfloat16).

    ``standardize``: a standardized packing (per-channel statistics), which gets the untuned tile: its
    kernel holds 1.4-2x the registers of the plain one the tuner times (sm_90: 94-128 against 67-76 at
    the 16-row default, 180-254 against 125 at 32 rows), so the plain kernel's best tile says little
    about it."""
    return _launch_config("quantize", flat.device, flat.dtype, flat.numel(), n_groups, bits, group_size,
                          sigma, stochastic, standardize)


def dequantize_launch_config(out: torch.Tensor, n_groups: int, bits: int, group_size: int,
                             standardize: bool = False) -> tuple[int, int]:
    """(rows, num_warps) for decoding into the 1-D tensor ``out`` (float32/float16/bfloat16);
    ``standardize`` as for ``quantize_launch_config``. (Dequantize takes one tile a program.)"""
    rows, num_warps, _ = _launch_config("dequantize", out.device, out.dtype, out.numel(), n_groups, bits, group_size,
                                        False, False, standardize)
    return rows, num_warps


def _launch_config(
    kind: str, device: torch.device, dtype: torch.dtype, n_elements: int, n_groups: int, bits: int,
    group_size: int, sigma: bool, stochastic: bool, standardize: bool = False,
) -> tuple[int, int, int]:
    # Runs once per packed tensor: the cheap tests first, and plain int arithmetic throughout.
    forced = getattr(_thread_state, "config", None) if _open_forcings else None
    if forced is not None:
        return forced
    if is_interpreted():
        return (*default_group_tile(n_groups, group_size, interpreted=True), 1)
    bucket = size_bucket(n_elements)
    # (Standardized packings take the untuned tile: quantize_launch_config says why.)
    if standardize or bucket < MIN_TUNED_BUCKET or not autotune_enabled():
        return (*default_group_tile(n_groups, group_size, interpreted=False), 1)
    fast_key = (kind, device, dtype, bucket, bits, group_size, sigma, stochastic)
    config = _resolved.get(fast_key)
    if config is None:
        gpu, capability = _identity(device)
        key = TuneKey(gpu, capability, _TRITON_VERSION, kind, bits, group_size, sigma, stochastic,
                      _DTYPE_NAMES[dtype], bucket)
        entry = _entries.get(key)
        if entry is None:
            entry = _resolve_miss(key, device)
        config = entry.config
        if _entries.get(key) is entry:  # (not the stand-in used during a CUDA graph capture)
            _resolved[fast_key] = config
    rows, num_warps, tiles = config
    # The bucket was timed at 4**bucket elements; a smaller tensor in it may have fewer groups than a tile.
    # (A pipelined program's tiles past the last group are masked: they load and store nothing.)
    cap = next_power_of_2(n_groups)
    return (rows if rows <= cap else cap), num_warps, tiles


def _resolve_miss(key: TuneKey, device: torch.device) -> CacheEntry:
    """First launch of ``key`` in this process: read the cache file, else tune and persist."""
    with _tune_lock:
        entry = _known_entry(key)
        if entry is not None:
            return entry
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Timing would synchronize inside a CUDA graph capture; use the heuristic and tune later.
            return _heuristic_entry(key)
        return _tune_and_store(key, device).entry


def _known_entry(key: TuneKey) -> CacheEntry | None:
    """The entry for ``key`` in memory, else in the cache file (merged into memory), else None.
    (Called holding _tune_lock.)"""
    entry = _entries.get(key)
    if entry is None:
        _merge_file_into_memory()
        entry = _entries.get(key)
    return entry


def _heuristic_entry(key: TuneKey) -> CacheEntry:
    """The untuned config for the groups of ``key``'s size bucket."""
    return CacheEntry(heuristic_config(-(-bucket_elements(key.bucket) // key.group_size), key.group_size))


def _tune_and_store(key: TuneKey, device: torch.device) -> TuneResult:
    """Tune ``key`` and remember the result; on failure remember the heuristic (in memory only)."""
    try:
        result = tune(key, device)
    except Exception as exc:  # noqa: BLE001 - a failed tuning must never break a training step
        entry = _heuristic_entry(key)
        _entries[key] = entry
        _forget_resolved()
        message = f"{type(exc).__name__}: {exc}"
        _warn_once(f"tune:{key}", f"tritonquant autotuning of {key} failed ({message}); using the heuristic config")
        return TuneResult(key, entry, "failed", {}, message)
    _entries[key] = result.entry
    _forget_resolved()
    if result.entry.ms is not None:
        save_entries({key: result.entry})
    return result


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------


def timed_from_a_graph(bucket: int, device: torch.device) -> bool:
    """Whether the tuner times ``bucket``'s candidates from a CUDA graph (``graph_benchmark``) rather than
    with do_bench (``benchmark``): on CUDA, for buckets up to GRAPH_TIMED_MAX_BUCKET."""
    return device.type == "cuda" and bucket <= GRAPH_TIMED_MAX_BUCKET


def benchmark(fn: Callable[[], object], warmup_ms: float = TUNE_WARMUP_MS, rep_ms: float = TUNE_REP_MS) -> float:
    """Median GPU time of ``fn()`` in ms, by ``triton.testing.do_bench`` (Triton 3.x; CUDA only), which
    flushes the L2 cache before each call."""
    from triton.testing import do_bench

    if "return_mode" in inspect.signature(do_bench).parameters:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms))


def graph_benchmark(calls: list[Callable[[], object]]) -> float:
    """GPU ms per call of ``calls``, each on buffers of its own, replayed from one CUDA graph
    (``gpu_timing.graph_ms_per_call``). A capture that fails (a driver or Triton that cannot launch
    there) falls back to ``benchmark`` of the first call, with a warning once per process."""
    try:
        return graph_ms_per_call(calls)
    except RuntimeError as exc:
        _warn_once("graph-timing", f"tritonquant autotuning could not time from a CUDA graph ({exc}); "
                                   "timing with triton.testing.do_bench instead")
        return benchmark(calls[0])


def _benchmark_first(calls: list[Callable[[], object]]) -> float:
    """``benchmark`` of ``calls[0]``: do_bench flushes the L2 cache itself, so one buffer set will do."""
    return benchmark(calls[0])


def tune(
    key: TuneKey,
    device: torch.device,
    timer: Callable[[list[Callable[[], object]]], float] | None = None,
    candidates: list[LaunchConfig] | None = None,
) -> TuneResult:
    """Time every candidate config of ``key`` on buffers of 4**key.bucket elements on ``device``.

    ``timer(calls) -> ms per call`` defaults to ``graph_benchmark`` for the buckets ``timed_from_a_graph``
    (``calls`` then runs the kernel on enough buffer sets to read past the L2 cache) and to ``benchmark``
    of ``calls[0]`` for the others (one set); module attributes, looked up at call time so tests can
    replace them. It is called while the candidate is forced with ``use_config``, so
    ``active_override()`` tells it which config runs. With a single candidate (the interpreter) nothing
    is allocated or timed. Returns the fastest config (ties keep the earlier candidate, the heuristic);
    does not touch the cache. Raises RuntimeError when no candidate ran.
    """
    n = bucket_elements(key.bucket)
    n_groups = -(-n // key.group_size)
    if candidates is None:
        candidates = candidate_configs(n_groups, key.group_size, pipelined=key.kind == "quantize")
    if len(candidates) == 1:
        return TuneResult(key, CacheEntry(candidates[0]), "single", {})
    heuristic = heuristic_config(n_groups, key.group_size)
    from .dequantize import triton_dequantize
    from .quantize import triton_quantize

    dtype = DTYPES[key.dtype]
    graph_timed = timed_from_a_graph(key.bucket, device)
    copies = 1
    if graph_timed:
        traffic = traffic_bytes(key.kind, n, key.bits, key.group_size, dtype.itemsize)
        copies = rotation_count(traffic, l2_cache_bytes(device))
    timer = timer or (graph_benchmark if graph_timed else _benchmark_first)
    timings: dict[LaunchConfig, float] = {}
    errors: list[str] = []
    with _device_context(device):
        # A private generator: tuning must not advance torch's global RNG (dropout masks would change).
        generator = torch.Generator(device=device).manual_seed(0)
        # ``copies`` calls, each on buffers of its own (graph_timed: none finds its input in the L2 cache).
        calls: list[Callable[[], object]] = []
        for _ in range(copies):
            if key.kind == "quantize":
                x = torch.randn(n, generator=generator, device=device, dtype=torch.float32).to(dtype)
                calls.append(functools.partial(triton_quantize, x, key.bits, key.group_size, key.sigma,
                                               key.stochastic, 0, 0))
            else:
                # Decoding speed does not depend on the values: random codes on a fixed grid will do, and
                # making them needs no kernel launch (and no memory-hungry torch reference).
                payload = torch.randint(0, 256, (n_groups * key.group_size * key.bits // 8,), generator=generator,
                                        device=device, dtype=torch.uint8)
                meta = torch.tensor([-1.0, 2.0 / ((1 << key.bits) - 1)], dtype=torch.float32,
                                    device=device).repeat(n_groups, 1)
                out = torch.empty(n, dtype=dtype, device=device)
                calls.append(functools.partial(triton_dequantize, payload, meta, out, key.bits, key.group_size))

        for config in candidates:
            with use_config(config):
                try:
                    ms = float(timer(calls))
                except Exception as exc:  # noqa: BLE001 - e.g. out of registers/shared memory for a big tile
                    ms = math.inf
                    errors.append(f"{tuple(config)}: {type(exc).__name__}: {exc}")
            # NaN or a non-positive time is a broken measurement, never the winner.
            timings[config] = ms if math.isfinite(ms) and ms > 0 else math.inf
    order = {config: index for index, config in enumerate(candidates)}
    best = min(candidates, key=lambda c: (timings[c], order[c]))
    if not math.isfinite(timings[best]):
        raise RuntimeError("no candidate config ran: " + "; ".join(errors))
    heuristic_ms = timings.get(heuristic, math.inf)
    heuristic_ms = heuristic_ms if math.isfinite(heuristic_ms) else None
    return TuneResult(key, CacheEntry(best, timings[best], heuristic_ms), "tuned", timings)


def get_or_tune(key: TuneKey, device: torch.device, force: bool = False) -> TuneResult:
    """The entry for ``key`` from memory or the cache file, else tune it now and persist it.

    ``force`` retunes even when an entry exists. Under the interpreter the single config comes back
    with source "single" and nothing is timed or written.
    """
    with _tune_lock:
        entry = None if force else _known_entry(key)
        if entry is not None:
            return TuneResult(key, entry, "cached", {})
        return _tune_and_store(key, device)


def _device_context(device: torch.device):
    # Kernels launch on the current device; make it the one the buffers live on.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# The cache file
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """$TRITONQUANT_CACHE_DIR, else $XDG_CACHE_HOME/tritonquant (when absolute), else ~/.cache/tritonquant."""
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "tritonquant"


def cache_path() -> Path:
    """The cache file: ``cache_dir() / f"autotune-{FORMAT_VERSION}.json"``."""
    return cache_dir() / f"autotune-{FORMAT_VERSION}.json"


def read_cache(path: Path | None = None) -> dict[TuneKey, CacheEntry]:
    """Entries of the cache file; {} when it is missing, unreadable, corrupt or of another format.

    Malformed entries are dropped one by one; the rest are kept.
    """
    path = cache_path() if path is None else path
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return {}
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        return {}
    items = document.get("entries")
    if not isinstance(items, list):
        return {}
    entries: dict[TuneKey, CacheEntry] = {}
    for item in items:
        try:
            key, entry = _entry_from_json(item)
        except (KeyError, TypeError, ValueError):
            continue
        entries[key] = entry
    return entries


def save_entries(new: dict[TuneKey, CacheEntry]) -> bool:
    """Merge ``new`` into the cache file atomically. False (and one warning) when it cannot be written."""
    path = cache_path()
    with _file_lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _interprocess_lock(path.with_name(path.name + ".lock")):
                merged = read_cache(path)  # entries other processes wrote meanwhile are kept
                merged.update(new)
                _atomic_write(path, _document(merged))
            return True
        except OSError as exc:
            _warn_once(f"write:{path}", f"tritonquant cannot write its autotune cache {path} ({exc}); "
                                        f"tuned configs are kept in memory for this process only")
            return False


def reset() -> None:
    """Forget every in-process entry and device identity (the cache file is left alone). For tests."""
    with _tune_lock:
        _entries.clear()
        _forget_resolved()
        _identities.clear()
        _warned.clear()


def _merge_file_into_memory() -> None:
    for key, entry in read_cache().items():
        _entries.setdefault(key, entry)


def _document(entries: dict[TuneKey, CacheEntry]) -> dict:
    rows = [_entry_to_json(key, entry) for key, entry in entries.items()]
    rows.sort(key=lambda row: (row["gpu"], row["kind"], row["dtype"], row["bits"], row["group_size"],
                               row["sigma"], row["stochastic"], row["bucket"], row["triton"]))
    return {"format": FORMAT_VERSION, "entries": rows}


def _entry_to_json(key: TuneKey, entry: CacheEntry) -> dict:
    return {
        "gpu": key.gpu,
        "capability": list(key.capability),
        "triton": key.triton,
        "kind": key.kind,
        "bits": key.bits,
        "group_size": key.group_size,
        "sigma": key.sigma,
        "stochastic": key.stochastic,
        "dtype": key.dtype,
        "bucket": key.bucket,
        "elements": bucket_elements(key.bucket),
        "rows": entry.config.rows,
        "num_warps": entry.config.num_warps,
        "tiles": entry.config.tiles,
        "ms": entry.ms,
        "heuristic_ms": entry.heuristic_ms,
    }


def _entry_from_json(item: object) -> tuple[TuneKey, CacheEntry]:
    """Parse and check one entry; raises KeyError/TypeError/ValueError when anything is off."""
    if not isinstance(item, dict):
        raise TypeError("entry is not an object")

    def typed(name: str, kind: type):
        value = item[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(name)
        if not isinstance(value, kind):
            raise TypeError(name)
        return value

    capability = typed("capability", list)
    if len(capability) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in capability):
        raise ValueError("capability")
    kind, bits, group_size = typed("kind", str), typed("bits", int), typed("group_size", int)
    sigma, stochastic, dtype = typed("sigma", bool), typed("stochastic", bool), typed("dtype", str)
    bucket, rows, num_warps = typed("bucket", int), typed("rows", int), typed("num_warps", int)
    tiles = typed("tiles", int)
    if kind not in KINDS or bits not in (1, 2, 4, 8) or dtype not in DTYPES:
        raise ValueError("kind/bits/dtype")
    if group_size < 8 or group_size & (group_size - 1) or not 0 <= bucket <= MAX_TUNED_BUCKET:
        raise ValueError("group_size/bucket")
    if rows < 1 or rows & (rows - 1) or rows * group_size > MAX_TILE_ELEMENTS or num_warps not in VALID_NUM_WARPS:
        raise ValueError("rows/num_warps")
    if tiles < 1 or (kind == "dequantize" and tiles != 1):
        raise ValueError("tiles")
    if kind == "dequantize" and (sigma or stochastic):
        raise ValueError("dequantize keys carry no scheme or rounding")
    times = []
    for name in ("ms", "heuristic_ms"):
        value = item.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(name)
        times.append(None if value is None else float(value))
    key = TuneKey(typed("gpu", str), (capability[0], capability[1]), typed("triton", str), kind, bits, group_size,
                  sigma, stochastic, dtype, bucket)
    return key, CacheEntry(LaunchConfig(rows, num_warps, tiles), times[0], times[1])


def _atomic_write(path: Path, document: dict) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _interprocess_lock(lock_path: Path) -> Iterator[None]:
    """Advisory exclusive lock (fcntl.flock) so concurrent writers merge instead of overwriting each
    other. Best effort: without fcntl, or after _LOCK_TIMEOUT_S, proceed unlocked (the write is still
    atomic; at worst one process's new entries are lost and retuned later)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    handle = open(lock_path, "a+b")  # noqa: SIM115 - closed in finally
    locked = False
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            except OSError:  # no locking on this file system (ENOLCK on some NFS homes): go on unlocked
                break
        yield
    finally:
        if locked:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
