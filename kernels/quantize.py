"""Fused quantize: load a group, reduce, choose the grid, round, pack, store; one pass over the input.

Input: n float32/float16/bfloat16 elements read in physical memory order (a dense tensor), cut into
``n_groups = ceil(n / group_size)`` groups of consecutive elements (the last may be partial).
Output:
    payload  uint8 [n_groups * group_size * bits // 8]   codes, packed as in kernels/bitpack.py
    meta     float32 [n_groups, 2]                        (base, step); element = base + code * step

How the grid is chosen (docs/format.md has the full story):
    * [lo, hi] = min/max of the group ("minmax"), or that range narrowed to mean +/- 3 sigma ("sigma").
      If the group's values include zero (lo <= 0 <= hi) the grid range is widened to include zero.
    * One-signed groups count away from zero: base is the range end nearest zero and step carries the
      sign, so decoded values keep the group's sign; a group touching zero gets base = 0 exactly.
    * Mixed-sign groups put zero on a grid point z, with at least one level on each side (bits >= 2):
      base = -(z * step), so code z decodes to exactly 0.0.
    * Codes are round-to-nearest (or stochastic) on that grid, then nudged so that exact zeros map to
      zero and nonzero values never decode to zero or to the other sign.
    * A group holding NaN or +/-Inf, or whose range hi - lo overflows float32, gets step = NaN and
      all-zero codes, so every element decodes to NaN.

Optional per-channel standardization (``channels``): element i, in channel
``c = (i // channel_stride) % C``, is first mapped to ``(x - minimum[c]) * (1 / scale[c]) + 1`` in float32
(``channels`` is float32 [C, 2] holding (minimum, scale); the reciprocal is rounded to float32 once per
channel, ``channels.standardizing_pairs``); the grid is then chosen for those values.
``dequantize`` applies the inverse before its one rounding to the output dtype.

The torch reference ``torch_quantize`` repeats the kernel's arithmetic operation for operation (fp32,
correctly rounded division and square root, no fused multiply-add), so deterministic rounding is
bit-identical across backends. The sigma statistics sum integers (16-bit fixed point of the centred
values) because integer sums do not depend on the reduction order.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bitpack import pack_codes, torch_pack_codes
from . import launch as launch_module
from .autotune import config_generation, quantize_launch_config
from .channels import (COUNT_LIMIT, channel_launch_args, channel_of, channel_statistics, divide, divider, row_channels,
                       standardizing_pairs, torch_channel_pieces)
from .launch import KernelLauncher, cdiv, flat_view, int_width, is_interpreted, runs_view, strided_runs
from .philox import DITHER_ROUNDS, torch_dither4

SIGMA_WIDTH = 3.0  # grid half-width in standard deviations (Chakrabarti & Moseley use 3)
FIXED_POINT_SCALE = 32768.0  # centred values map into [-2**15, 2**15] for the sigma statistics
_TINY_RANGE = 2.0**-100  # below this half-range the sigma statistics are taken as zero
_MIN_NORMAL = 2.0**-126  # a step below this has no finite fp32 reciprocal
# The same constants for the kernel: Triton lets a kernel read only constexpr globals.
_K_SIGMA_WIDTH = tl.constexpr(SIGMA_WIDTH)
_K_FIXED_POINT_SCALE = tl.constexpr(FIXED_POINT_SCALE)
_K_TINY_RANGE = tl.constexpr(_TINY_RANGE)
_K_MIN_NORMAL = tl.constexpr(_MIN_NORMAL)
# 1.5 * 2**23: t + _K_MAGIC is a float32 whose spacing is 1, so the add rounds t to an integer (ties to
# even) and leaves it in the low mantissa bits (see the kernel's rounding).
_K_MAGIC = tl.constexpr(12582912.0)
_K_DITHER_ROUNDS = tl.constexpr(DITHER_ROUNDS)


# Threads that share one group in _quantize_kernel: fewer threads per group means each holds more of
# it and pays for the group's reduction and scalars over more elements; 8 threads of 16-byte vectors
# still cover 128 contiguous bytes per group and load instruction (4 threads, in tiles with rows to
# spare, 64 bytes: two whole 32-byte sectors; ``threads_per_group``).
THREADS_PER_GROUP = 8


def threads_per_group(rows: int, num_warps: int) -> int:
    """Threads of _quantize_kernel that share a group: THREADS_PER_GROUP, or half as many when the tile
    has 8 rows or more per warp.

    At 8 threads a row, a warp covers 4 rows, so a tile of 8 rows per warp gives each thread two rows,
    with the registers and scalars of both. At 4 it gives each thread one row's share, twice as long,
    and the row's scalars once for 64 values. sm_90, bf16, 4 bits, 32 rows on 4 warps, when this was
    chosen: 16.2 instructions per element at 124 registers, against 19.3 at 158 with 8 threads a row.
    The 16-row, 4-warp tile keeps 8 (18.4 at 67 then; docs/kernels.md has today's counts). Which of the
    two tiles is faster is the tuner's question.
    """
    return THREADS_PER_GROUP // 2 if rows >= 8 * num_warps else THREADS_PER_GROUP


def split_for(group_size: int, element_size: int, threads: int = THREADS_PER_GROUP) -> int:
    """_quantize_kernel's SPLIT: the chunks a group is cut into so that ``threads`` threads, one 16-byte
    vector each, cover a chunk (at 8 threads: 4 for bf16/fp16 and 8 for fp32 at group size 256; 1 for
    groups of one chunk or less)."""
    chunk = threads * (16 // element_size)
    return max(group_size // chunk, 1)


def split_axis_first() -> bool:
    """_quantize_kernel's SPLIT_FIRST for the installed Triton: whether the tile's SPLIT axis goes first.

    Triton's coalescing gives a warp's threads to the contiguous axis (CHUNK), then to the next axis
    in its order. Rows and chunks are both strided, so they tie. Triton 3.7 and later break the tie
    towards the later axis, and earlier versions towards the earlier one. The rows must win it, so
    that 8 threads share a row rather than a whole warp. Checked for the installed Triton by
    tests/kernels/compile_for_gpu.py; measured with 3.6 (rows first) and 3.7 to 3.9 (split first).
    """
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 7)


SPLIT_FIRST = split_axis_first()


# On the CPU the torch references (torch_quantize, torch_dequantize) take a tensor a chunk of whole
# groups at a time (``torch_chunk_elements``). Quantize's temporaries come to 24 bytes an element (38
# with stochastic rounding; dequantize's to 5-8), so a chunk holds about 6 MB of them at most (10 MB
# stochastic); for a tensor of 2**19 elements or more, about 3 bytes per element of the tensor (5
# stochastic). Groups are independent: chunks change no bit. (Figures: docs/kernels.md, "The
# torch backend on the CPU".)
TORCH_CHUNK_ELEMENTS = 1 << 18
TORCH_CHUNK_MIN_ELEMENTS = 1 << 16
TORCH_CHUNK_PARTS = 8
# torch_quantize works out the grids of a span of at most this many groups (or one chunk's) at a time.
# Its per-group temporaries, about 100 bytes a group, then stay under 2 MB at groups of 16 or more, and
# under 4 MB at groups of 8, whose chunk of 2**18 elements holds 32K of them.
TORCH_GRID_GROUPS = 1 << 14


def payload_nbytes(n_elements: int, bits: int, group_size: int) -> int:
    n_groups = -(-n_elements // group_size)
    return n_groups * group_size * bits // 8


def philox_counters(n_elements: int, group_size: int) -> int:
    """Philox counters one stochastic quantize of ``n_elements`` uses (from its ``rng_offset`` on): one
    per 4 elements of its whole groups."""
    return -(-n_elements // group_size) * group_size // 4


# seed and rng_offset are not specialized on their values: an unseeded stochastic call takes the next
# offset of the library's stream, which is a multiple of 16 or not, or 1, from call to call, and each
# would be another compiled kernel: compiled mid-training, or inside a CUDA graph capture, where
# loading a new kernel is an error. (Only their int width still selects a kernel.)
@triton.jit(do_not_specialize=["seed", "rng_offset"])
def _quantize_kernel(
    x_ptr, payload_ptr, meta_ptr, n_elements, n_groups, seed, rng_offset,
    channels_ptr, stride_divisor, count_divisor, run_divisor, run_stride,
    BITS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
    SIGMA: tl.constexpr, STOCHASTIC: tl.constexpr, STANDARDIZE: tl.constexpr, INDEX64: tl.constexpr,
    ROW_CHANNELS: tl.constexpr, RUNS: tl.constexpr,
    EVEN: tl.constexpr, SPLIT: tl.constexpr, SPLIT_FIRST: tl.constexpr, EXACT_FMA: tl.constexpr,
    TILES: tl.constexpr,
):
    # The kernel is bound by instructions per element, not bytes: work that can be done once per row
    # (group) is done per row, and each row is shared by as few threads as keep loads coalesced.
    # The tile is [SPLIT, ROWS, CHUNK] (SPLIT_FIRST) or [ROWS, SPLIT, CHUNK]: element (s, r, j) is
    # element s * CHUNK + j of row r. Triton spreads a warp's threads over CHUNK first, then over one
    # of the other two axes, and SPLIT_FIRST (``split_axis_first``) makes that the rows: a row is
    # shared by 8 threads (4 in tiles of 8 rows or more per warp, ``threads_per_group``), a chunk is one
    # 16-byte vector for each of them, and each thread holds SPLIT vectors of its row: 32 bf16 values at
    # GROUP 256 (64 with 4 threads), where a [ROWS, GROUP] tile gave each of 32 threads 8 values, and
    # every thread pays for the row's reduction and scalars (sm_90, 4 bits: 18 instructions per element
    # against 32; ``split_for``, ``_row_min``). _per_row and _per_chunk broadcast [ROWS] and [SPLIT] to
    # the tile.
    # EVEN: n_elements is a multiple of GROUP, so every group is whole and only rows past n_groups are
    # masked (per row, not per element).
    # RUNS: x is not one run of memory but runs of whole groups, each starting run_stride elements after
    # the one before (``launch.strided_runs``: q, k and v as views of one projection's output);
    # run_divisor is the groups per run, prepared for multiply-high with the count riding above (as
    # channels.channel_index_args prepares a channel count). Only where each group starts changes, once
    # per row; the groups are numbered, dithered and stored as for a dense copy of x. (The launcher
    # admits RUNS only with EVEN and without STANDARDIZE, whose channels are found from the element's
    # offset: ``check_runs``.)
    # TILES: the tiles of ROWS groups one program quantizes in turn. With more than one, the program
    # loads the next tile before it quantizes the one it holds, so its loads stay in flight while it
    # computes (the tuner's pipelined configs; docs/kernels.md, "Pipelined programs"). The next tile is
    # held as raw input, two bf16 values to a register. Standardized packings gather their channel
    # statistics before each load and take one tile a program.
    CHUNK: tl.constexpr = GROUP // SPLIT
    pid = tl.program_id(0)
    if TILES == 1:
        rows = pid * ROWS + tl.arange(0, ROWS)
        idx, valid = _tile_elements(rows, n_elements, n_groups, run_divisor, run_stride, GROUP, SPLIT, SPLIT_FIRST,
                                    EVEN, RUNS)
        # Standardized tiles gather their channel statistics before loading x. Triton 3.6 gives the gather a
        # layout of one element per thread; loaded after x, that layout took over the whole tile (x converted
        # through shared memory: 78 instructions per element for bf16 at 2 bits), loaded before, only the
        # gathered values are converted (54). Triton 3.9 compiles both orders alike (52).
        if STANDARDIZE and ROW_CHANNELS:  # each group in at most two channels: their statistics per row
            minimum, reciprocal, next_minimum, next_reciprocal, boundary = row_channels(
                channels_ptr, rows, rows < n_groups, stride_divisor, count_divisor, GROUP)
            position = _per_chunk(tl.arange(0, SPLIT) * CHUNK, SPLIT_FIRST) + tl.arange(0, CHUNK)[None, None, :]
            in_next = position >= _per_row(boundary, SPLIT_FIRST)
            minimum = tl.where(in_next, _per_row(next_minimum, SPLIT_FIRST), _per_row(minimum, SPLIT_FIRST))
            reciprocal = tl.where(in_next, _per_row(next_reciprocal, SPLIT_FIRST), _per_row(reciprocal, SPLIT_FIRST))
        elif STANDARDIZE:  # (kernels/channels.py: the channel index without a division per element)
            channel = channel_of(idx, stride_divisor, count_divisor, INDEX64)
            minimum, reciprocal = channel_statistics(channels_ptr, channel, valid)  # (minimum, 1 / scale)
        else:  # (not read)
            minimum = 0.0
            reciprocal = 0.0
        x_loaded = tl.load(x_ptr + idx, mask=valid, other=0.0)
        _quantize_tile(x_loaded, valid, rows, payload_ptr, meta_ptr, n_elements, n_groups, seed, rng_offset,
                       minimum, reciprocal, BITS, GROUP, ROWS, SIGMA, STOCHASTIC, STANDARDIZE, EVEN, SPLIT,
                       SPLIT_FIRST, EXACT_FMA)
    else:
        tl.static_assert(not STANDARDIZE, "standardized packings take one tile a program")
        rows = pid * (ROWS * TILES) + tl.arange(0, ROWS)
        idx, valid = _tile_elements(rows, n_elements, n_groups, run_divisor, run_stride, GROUP, SPLIT, SPLIT_FIRST,
                                    EVEN, RUNS)
        x_loaded = tl.load(x_ptr + idx, mask=valid, other=0.0)
        # Only the rows and the raw input cross from one tile to the next (names first bound before the
        # loop and bound again inside it are carried in registers): the offsets and masks are cheaper to
        # compute again than to hold.
        for _tile in range(TILES - 1):
            next_rows = rows + ROWS
            next_idx, next_valid = _tile_elements(next_rows, n_elements, n_groups, run_divisor, run_stride, GROUP,
                                                  SPLIT, SPLIT_FIRST, EVEN, RUNS)
            x_next = tl.load(x_ptr + next_idx, mask=next_valid, other=0.0)
            tile_idx, tile_valid = _tile_elements(rows, n_elements, n_groups, run_divisor, run_stride, GROUP, SPLIT,
                                                  SPLIT_FIRST, EVEN, RUNS)
            _quantize_tile(x_loaded, tile_valid, rows, payload_ptr, meta_ptr, n_elements, n_groups, seed, rng_offset,
                           0.0, 0.0, BITS, GROUP, ROWS, SIGMA, STOCHASTIC, False, EVEN, SPLIT, SPLIT_FIRST,
                           EXACT_FMA)
            rows = next_rows
            x_loaded = x_next
        idx, valid = _tile_elements(rows, n_elements, n_groups, run_divisor, run_stride, GROUP, SPLIT, SPLIT_FIRST,
                                    EVEN, RUNS)
        _quantize_tile(x_loaded, valid, rows, payload_ptr, meta_ptr, n_elements, n_groups, seed, rng_offset,
                       0.0, 0.0, BITS, GROUP, ROWS, SIGMA, STOCHASTIC, False, EVEN, SPLIT, SPLIT_FIRST, EXACT_FMA)


@triton.jit
def _tile_elements(rows, n_elements, n_groups, run_divisor, run_stride, GROUP: tl.constexpr, SPLIT: tl.constexpr,
                   SPLIT_FIRST: tl.constexpr, EVEN: tl.constexpr, RUNS: tl.constexpr):
    """(offsets, mask) of the tile of groups ``rows``: where in x each of its elements lies, and whether
    it exists."""
    CHUNK: tl.constexpr = GROUP // SPLIT
    row_valid = rows < n_groups
    if RUNS:
        run = divide(rows.to(tl.uint32), run_divisor)
        within = rows - (run * (run_divisor >> 40).to(tl.uint32)).to(tl.int32)
        row_start = run.to(tl.int64) * run_stride + within.to(tl.int64) * GROUP
    else:
        row_start = rows.to(tl.int64) * GROUP
    idx = (_per_row(row_start, SPLIT_FIRST) + _per_chunk(tl.arange(0, SPLIT) * CHUNK, SPLIT_FIRST)
           + tl.arange(0, CHUNK)[None, None, :])
    if EVEN:  # the row mask, broadcast to the tile: no 64-bit compare per element
        valid = (_per_chunk(tl.arange(0, SPLIT) < SPLIT, SPLIT_FIRST) & _per_row(row_valid, SPLIT_FIRST)
                 & (tl.arange(0, CHUNK) < CHUNK)[None, None, :])
    else:
        valid = idx < n_elements
    return idx, valid


@triton.jit
def _quantize_tile(x_loaded, valid, rows, payload_ptr, meta_ptr, n_elements, n_groups, seed, rng_offset, minimum,
                   reciprocal, BITS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, SIGMA: tl.constexpr,
                   STOCHASTIC: tl.constexpr, STANDARDIZE: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr,
                   SPLIT_FIRST: tl.constexpr, EXACT_FMA: tl.constexpr):
    """Quantize one loaded tile (``x_loaded``, in x's dtype, laid out as _tile_elements lays it out;
    ``valid`` its mask) of the groups ``rows``, and store their codes and (base, step).
    ``minimum`` and ``reciprocal``: the elements' channel statistics when STANDARDIZE."""
    CHUNK: tl.constexpr = GROUP // SPLIT
    LEVELS_M1: tl.constexpr = (1 << BITS) - 1
    # With one bit a mixed-sign group cannot keep both signs; with more, zero gets a level on each side.
    Z_MIN: tl.constexpr = 1 if BITS > 1 else 0
    Z_MAX: tl.constexpr = LEVELS_M1 - 1 if BITS > 1 else LEVELS_M1
    row_valid = rows < n_groups
    x = x_loaded.to(tl.float32)
    if STANDARDIZE:
        x = (x - minimum) * reciprocal + 1.0  # (masked elements: kept out of the reductions below)
    # fp16 ranges are found on the loaded values: the same minimum and maximum (widening is exact and
    # keeps the order), two per instruction on sm_80 and later (sm_90, Triton 3.6, 4 bits: 18.0 -> 17.3
    # instructions per element). Triton takes a bf16 minimum in float32 and rounds it back, a loss.
    if x_loaded.dtype == tl.float16 and not STANDARDIZE:
        x_range = x_loaded
    else:
        x_range = x

    # NaN-propagating min/max: one reduction each finds the range and any NaN or +/-Inf in the group.
    if EVEN:
        lo_raw = _row_min(x_range, SPLIT_FIRST).to(tl.float32)
        hi_raw = _row_max(x_range, SPLIT_FIRST).to(tl.float32)
    else:
        lo_raw = _row_min(tl.where(valid, x_range, float("inf")), SPLIT_FIRST).to(tl.float32)
        hi_raw = _row_max(tl.where(valid, x_range, -float("inf")), SPLIT_FIRST).to(tl.float32)
    # A bad group holds NaN or +/-Inf, or its range overflows float32 (the comparison is false for a NaN
    # or infinite difference). It stores step = NaN and all-zero codes; its grid is computed from 0.
    bad = ~((hi_raw - lo_raw < float("inf")) & row_valid)
    lo = tl.where(bad, 0.0, lo_raw)
    hi = tl.where(bad, 0.0, hi_raw)

    if SIGMA:
        center = lo * 0.5 + hi * 0.5
        half = hi * 0.5 - lo * 0.5
        to_fixed = tl.where(half > 0, tl.div_rn(_K_FIXED_POINT_SCALE, tl.maximum(half, _K_TINY_RANGE)), 0.0)
        ok = valid & ~_per_row(bad, SPLIT_FIRST)
        fixed = (tl.where(ok, x - _per_row(center, SPLIT_FIRST), 0.0) * _per_row(to_fixed, SPLIT_FIRST)).to(tl.int32)
        sum1 = _row_sum(fixed, SPLIT_FIRST)
        sum2 = _row_sum((fixed * fixed).to(tl.int64), SPLIT_FIRST)
        count = tl.maximum(tl.minimum(n_elements - rows.to(tl.int64) * GROUP, GROUP), 1).to(tl.float32)
        mean_fixed = tl.div_rn(sum1.to(tl.float32), count)
        var_fixed = tl.maximum(tl.div_rn(sum2.to(tl.float32), count) - mean_fixed * mean_fixed, 0.0)
        unit = half * (1.0 / _K_FIXED_POINT_SCALE)
        mean = tl.minimum(tl.maximum(center + mean_fixed * unit, lo), hi)
        width = _K_SIGMA_WIDTH * (tl.sqrt_rn(var_fixed) * unit)
        g_lo = tl.maximum(lo, mean - width)
        g_hi = tl.minimum(hi, mean + width)
        collapsed = g_hi <= g_lo
        g_lo = tl.where(collapsed, lo, g_lo)
        g_hi = tl.where(collapsed, hi, g_hi)
    else:
        g_lo = lo
        g_hi = hi
    g_lo = tl.where(lo <= 0, tl.minimum(g_lo, 0.0), g_lo)
    g_hi = tl.where(hi >= 0, tl.maximum(g_hi, 0.0), g_hi)

    has_neg = lo < 0
    has_pos = hi > 0
    mixed = has_neg & has_pos
    negative_side = has_neg & ~has_pos
    near = tl.where(negative_side, g_hi, g_lo)
    far = tl.where(negative_side, g_lo, g_hi)
    step = tl.div_rn(far - near, LEVELS_M1 * 1.0)
    invertible = tl.abs(step) >= _K_MIN_NORMAL
    inv_step = tl.where(invertible, tl.div_rn(1.0, tl.where(invertible, step, 1.0)), 0.0)
    z_mixed = tl.minimum(tl.maximum(tl.floor(-g_lo * inv_step + 0.5), Z_MIN * 1.0), Z_MAX * 1.0)
    z = tl.where(mixed, z_mixed, tl.where((lo <= 0) & (hi >= 0), 0.0, -1.0))
    base = tl.where(mixed, -(z * step), near)
    # min/max may return either sign of zero: canonical +0.0 keeps decoded zeros identical everywhere.
    base = tl.where(base == 0.0, 0.0, base)

    # Per row: the codes a value may take, by its sign. Values on the side of zero that step points to
    # ("away") take z+1..L, the others 0..z-1, so no nonzero value decodes to zero or to the other sign; a
    # bad group takes 0 only. An exact zero (of either sign) is neither positive nor negative: it takes
    # the negatives' lower bound and the positives' upper bound. Where step points to the positives (or
    # is 0 in a group without negatives) that is 0..L, which holds z, and the zero's rounding gives it z
    # (below). Where step points to the negatives, the group has no positives and z is 0 or -1: the
    # bounds z+1..max(z-1, 0) cross, and the upper one, 0, wins. (Offset by _K_MAGIC, as the codes are.)
    positives_away = ~negative_side
    toward_hi = tl.maximum(z - 1.0, 0.0)
    positive_lo = tl.where(bad, 0.0, tl.where(positives_away, z + 1.0, 0.0)) + _K_MAGIC
    positive_hi = tl.where(bad, 0.0, tl.where(positives_away, LEVELS_M1 * 1.0, toward_hi)) + _K_MAGIC
    negative_lo = tl.where(bad, 0.0, tl.where(positives_away, 0.0, z + 1.0)) + _K_MAGIC
    negative_hi = tl.where(bad, 0.0, tl.where(positives_away, toward_hi, LEVELS_M1 * 1.0)) + _K_MAGIC
    # A zero's t is (z * step) * inv_step: three roundings from z, less than 2**-14 away for z < 256, so
    # it rounds to z. Where step has no finite reciprocal, inv_step is 0 and so is every t: the row's
    # rounding offset adds z (z is at most Z_MIN there, so the clamp gives nonzero values the codes t = 0
    # gives them). Stochastic rounding would move a zero's t by up to half a code: zeros get no dither.
    magic = tl.where(invertible, 0.0, z) + _K_MAGIC  # (a bad group's z is 0)

    # Codes are computed as _K_MAGIC + code: a float32 in [2**23, 2**24), where floats are the integers,
    # whose low bits are the code. Adding _K_MAGIC to t rounds t to the nearest integer (ties to even),
    # and taking the low bits replaces float-to-int conversions. Those conversions, a floor and a
    # convert per element, run at 1/8 of the float32 rate on recent GPUs; the add and the mask run at
    # full and half rate. Exact while |t| < 2**22; beyond, t is clamped to the bounds either way.
    # Nearest rounding multiplies and adds in one fma: t = (x - base) * inv_step is rounded once, to the
    # nearest integer, and the instruction that rounded the product to float32 is gone.
    d = x - _per_row(base, SPLIT_FIRST)
    if STOCHASTIC:  # rounding t + v to nearest, v uniform in [-0.5, 0.5), rounds t up with probability frac(t)
        t = d * _per_row(inv_step, SPLIT_FIRST)
        t = t + tl.where(x != 0, _dithers(seed, rng_offset, rows, SPLIT, ROWS, CHUNK, GROUP, SPLIT_FIRST), 0.0)
        r = t + _per_row(magic, SPLIT_FIRST)
    else:
        r = _round_product(d, _per_row(inv_step, SPLIT_FIRST), _per_row(magic, SPLIT_FIRST), EXACT_FMA)
    # The sign tests. For 16-bit inputs the compiler tests the loaded values, two per instruction, against
    # a literal 0. For float32 it computes tests against a literal 0 as soon as x is loaded and keeps them
    # through the reductions, more than the predicate registers hold: a zero from the row (lo * 0 is
    # +-0, as lo is finite here) keeps them after (sm_90, Triton 3.6, 4 bits: 20.3 -> 17.5 instructions
    # per element).
    if STANDARDIZE:
        # No sign rule: standardized values keep no signs (docs/format.md), only the code range 0..L. (The
        # library's statistics map every value to 1 or more, where the positives' bounds are 0..L too.)
        lower = _K_MAGIC
        upper = _per_row(tl.where(bad, 0.0, LEVELS_M1 * 1.0) + _K_MAGIC, SPLIT_FIRST)
    else:
        if x_loaded.dtype == tl.float32:
            zero = _per_row(lo * 0.0, SPLIT_FIRST)
        else:
            zero = 0.0
        lower = tl.where(x > zero, _per_row(positive_lo, SPLIT_FIRST), _per_row(negative_lo, SPLIT_FIRST))
        upper = tl.where(x < zero, _per_row(negative_hi, SPLIT_FIRST), _per_row(positive_hi, SPLIT_FIRST))
    # (min/max that ignore NaN: a bad group's NaN t lands on its bounds, code 0.)
    r = tl.minimum(tl.maximum(r, lower), upper)
    if not EVEN:
        r = tl.where(valid, r, _K_MAGIC)
    code = (r.to(tl.int32, bitcast=True) & 0xFF).to(tl.uint8)

    BYTES_PER_GROUP: tl.constexpr = GROUP * BITS // 8
    CHUNK_BYTES: tl.constexpr = CHUNK * BITS // 8
    packed = pack_codes(tl.reshape(code, (SPLIT * ROWS, CHUNK)), SPLIT * ROWS, CHUNK, BITS)
    if SPLIT_FIRST:
        packed = tl.reshape(packed, (SPLIT, ROWS, CHUNK_BYTES))
    else:
        packed = tl.reshape(packed, (ROWS, SPLIT, CHUNK_BYTES))
    # Each thread's codes fill whole bytes of one run (a 16-byte vector of bf16 at 4 bits: 4 bytes); the
    # contiguity hint keeps the store in that layout instead of a round trip through shared memory
    # to make 16-byte stores.
    VECTOR: tl.constexpr = 128 // x_loaded.dtype.primitive_bitwidth
    THREAD_BYTES: tl.constexpr = max(VECTOR * BITS // 8, 1)
    out_idx = (_per_row(rows.to(tl.int64) * BYTES_PER_GROUP, SPLIT_FIRST)
               + _per_chunk(tl.arange(0, SPLIT) * CHUNK_BYTES, SPLIT_FIRST)
               + tl.max_contiguous(tl.arange(0, CHUNK_BYTES), THREAD_BYTES)[None, None, :])
    tl.store(payload_ptr + out_idx, packed, mask=_per_row(row_valid, SPLIT_FIRST))
    meta = tl.join(base, tl.where(bad, float("nan"), step))  # [ROWS, 2]: one store for both
    tl.store(meta_ptr + rows.to(tl.int64)[:, None] * 2 + tl.arange(0, 2)[None, :], meta, mask=row_valid[:, None])


_launch_quantize = KernelLauncher(_quantize_kernel)

# 1.5 * 2**52: the float64 counterpart of _K_MAGIC (_round_product's interpreter path).
_K_MAGIC64 = tl.constexpr(6755399441055744.0)


@triton.jit
def _round_product(d, inv_step, magic, EXACT_FMA: tl.constexpr):
    """magic + (d * inv_step rounded once to the nearest integer, ties to even), as float32: one fma.

    Where tl.fma rounds twice (Triton's interpreter before it gained an exact fma: 3.6 multiplies and adds
    in float32), EXACT_FMA is False and the same value comes from float64: the product of two float32 is
    exact there, adding and taking away 1.5 * 2**52 rounds it to an integer (ties to even), and the
    integer plus magic is exact in float32 while |d * inv_step| < 2**22 (beyond, the codes clamp alike).
    """
    if EXACT_FMA:
        return tl.fma(d, inv_step, magic)
    else:
        product = d.to(tl.float64) * inv_step.to(tl.float64)
        whole = (product + _K_MAGIC64) - _K_MAGIC64
        return (whole + magic.to(tl.float64)).to(tl.float32)


def fma_rounds_once() -> bool:
    """_quantize_kernel's EXACT_FMA: whether tl.fma rounds once where the kernels run. Compiled kernels
    use the GPU's fma; Triton's interpreter has an exact one in 3.9 (3.6 rounds twice)."""
    if not is_interpreted():
        return True
    try:  # (a private module: where it is missing or moved, the float64 path is always right)
        from triton._C.libtriton import interpreter
    except ImportError:
        return False
    return hasattr(interpreter, "fma_fp32")


_EXACT_FMA = fma_rounds_once()


@triton.jit
def _dithers(seed, rng_offset, rows, SPLIT: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
             GROUP: tl.constexpr, SPLIT_FIRST: tl.constexpr):
    """Float32 dithers in [-0.5, 0.5) for the tile ([SPLIT, ROWS, CHUNK] or [ROWS, SPLIT, CHUNK]):
    element i (of the whole tensor) takes word i % 4 of Philox4x32-7(seed, counter = rng_offset + i // 4),
    so one Philox evaluation serves 4 elements; ``philox.torch_dither4`` maps the words the same way."""
    QUADS: tl.constexpr = CHUNK // 4
    quad = (_per_row(rows.to(tl.int64) * (GROUP // 4), SPLIT_FIRST)
            + _per_chunk(tl.arange(0, SPLIT) * QUADS, SPLIT_FIRST) + tl.arange(0, QUADS)[None, None, :])
    w0, w1, w2, w3 = tl.randint4x(seed, rng_offset + quad, _K_DITHER_ROUNDS)
    # join(join(w0, w2), join(w1, w3))[..., b, a] is w_(2b + a): word k lands at position k of its quad.
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    quads = ((words >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 1.5
    if SPLIT_FIRST:
        return tl.reshape(quads, (SPLIT, ROWS, CHUNK))
    else:
        return tl.reshape(quads, (ROWS, SPLIT, CHUNK))


@triton.jit
def _per_row(v, SPLIT_FIRST: tl.constexpr):
    """[ROWS] -> broadcastable against the tile."""
    if SPLIT_FIRST:
        return v[None, :, None]
    else:
        return v[:, None, None]


@triton.jit
def _per_chunk(v, SPLIT_FIRST: tl.constexpr):
    """[SPLIT] -> broadcastable against the tile."""
    if SPLIT_FIRST:
        return v[:, None, None]
    else:
        return v[None, :, None]


# The row reductions fold the SPLIT axis first. A thread holds every SPLIT chunk of its share of a row,
# so that fold stays in the thread, and the shuffles between the threads that share a row then run once
# per row. Folding CHUNK first ran them once per chunk, SPLIT times over (bf16 at 4 bits, sm_90, Triton 3.6:
# 20.4 instructions per element that way, 18.4 this way).
@triton.jit
def _row_min(x, SPLIT_FIRST: tl.constexpr):
    """Tile -> [ROWS]: each row's minimum, NaN if it holds one."""
    if SPLIT_FIRST:
        return tl.reduce(tl.reduce(x, 0, _min_propagating_nan), 1, _min_propagating_nan)
    else:
        return tl.reduce(tl.reduce(x, 1, _min_propagating_nan), 1, _min_propagating_nan)


@triton.jit
def _row_max(x, SPLIT_FIRST: tl.constexpr):
    """Tile -> [ROWS]: each row's maximum, NaN if it holds one. (_row_min's twin: a jit helper cannot
    take the combine function as an argument.)"""
    if SPLIT_FIRST:
        return tl.reduce(tl.reduce(x, 0, _max_propagating_nan), 1, _max_propagating_nan)
    else:
        return tl.reduce(tl.reduce(x, 1, _max_propagating_nan), 1, _max_propagating_nan)


@triton.jit
def _row_sum(x, SPLIT_FIRST: tl.constexpr):
    """Tile -> [ROWS]: each row's sum."""
    if SPLIT_FIRST:
        return tl.sum(tl.sum(x, axis=0), axis=1)
    else:
        return tl.sum(tl.sum(x, axis=1), axis=1)


@triton.jit
def _min_propagating_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def triton_quantize(
    x: torch.Tensor, bits: int, group_size: int, sigma: bool, stochastic: bool, seed: int, rng_offset: int,
    channels: torch.Tensor | None = None, channel_stride: int = 1, runs: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a dense float tensor in memory order. Returns (payload uint8, meta float32 [n_groups, 2]).

    ``x``: float32/float16/bfloat16 whose n elements fill one gap-free run of memory from
    ``x.data_ptr()`` (``launch.flat_view``): a 1-D contiguous tensor, or any dense layout, read as
    that run. Element i of the run draws its stochastic-rounding dither from word i % 4 of
    Philox4x32-7(seed, counter = rng_offset + i // 4): a call uses ceil(n_groups * group_size / 4)
    counters from rng_offset on.
    ``channels``: float32 [C, 2] (minimum, scale) to standardize element i with, for its channel
    ``(i // channel_stride) % C`` (see the module docstring); None: no standardization.
    ``runs``: (run, run_stride) from ``launch.strided_runs``: ``x``'s elements lie in runs of ``run``
    elements, ``run_stride`` apart, from ``x.data_ptr()`` on; they are packed in that order, as one dense
    run would be (``check_runs`` says which runs are accepted). None: ``x`` is dense.
    """
    n = x.numel()
    n_groups = -(-n // group_size)
    device = x.device
    payload = torch.empty(payload_nbytes(n, bits, group_size), dtype=torch.uint8, device=device)
    meta = torch.empty((n_groups, 2), dtype=torch.float32, device=device)
    if n == 0:
        return payload, meta
    rows, num_warps, tiles = quantize_launch_config(x, n_groups, bits, group_size, sigma, stochastic,
                                                    channels is not None)
    plan = None
    if channels is None and runs is None:
        # What this launch's grid, constexprs and Triton's specialization depend on, bar payload and meta,
        # whose fresh allocations are always 16-byte aligned: a repeat skips building them
        # (KernelLauncher.launch_planned), as every layer of a model repeats each step.
        plan = _plain_plan(x.dtype, n, bits, group_size, sigma, stochastic, rows, num_warps, tiles,
                           x.data_ptr() % 16 == 0, seed, rng_offset)
        if _launch_quantize.launch_planned(plan, _plain_arguments(x, payload, meta, n, n_groups, seed, rng_offset)):
            return payload, meta
    elif channels is not None:
        tiles = 1  # (the kernel pipelines plain tiles only)
    args, constexprs = quantize_launch_arguments(x, payload, meta, bits, group_size, rows, num_warps, sigma, stochastic,
                                                 seed, rng_offset, channels, channel_stride, runs, tiles)
    _launch_quantize(cdiv(n_groups, rows * tiles), args, constexprs, num_warps, plan)
    return payload, meta


def _plain_plan(dtype: torch.dtype, n: int, bits: int, group_size: int, sigma: bool, stochastic: bool, rows: int,
                num_warps: int, tiles: int, aligned: bool, seed: int, rng_offset: int) -> tuple:
    """The launch-plan key of a plain quantize launch (no standardization, no runs)."""
    return (dtype, n, bits, group_size, sigma, stochastic, rows, num_warps, tiles, aligned, int_width(seed),
            int_width(rng_offset))


class PreparedQuantize(NamedTuple):
    """``triton_quantize``'s launch for one kind of input, worked out once for calls that repeat it
    (``prepare_quantize``)."""

    n_elements: int
    n_groups: int
    payload_nbytes: int
    plan: tuple  # the launcher's plan key
    generation: int  # autotune.config_generation() when the tile was read


def prepare_quantize(x: torch.Tensor, bits: int, group_size: int, sigma: bool) -> PreparedQuantize | None:
    """What ``triton_quantize(x, bits, group_size, sigma, stochastic=False, seed=0, rng_offset=0)``
    launches for a dense, 16-byte aligned ``x`` (float32/float16/bfloat16, non-empty): its tile, grid
    and plan, for a caller that packs tensors of ``x``'s dtype, element count and layout again and
    again, as every layer does every step (``quantize_prepared``; tritonquant's codec). None where
    nothing can be prepared: under the interpreter (whose launches have no plans), or while a
    ``use_config`` block forces the tile."""
    generation = config_generation()
    n = x.numel()
    if generation is None or n == 0 or is_interpreted():
        return None
    n_groups = cdiv(n, group_size)
    rows, num_warps, tiles = quantize_launch_config(x, n_groups, bits, group_size, sigma, False)
    plan = _plain_plan(x.dtype, n, bits, group_size, sigma, False, rows, num_warps, tiles, True, 0, 0)
    return PreparedQuantize(n, n_groups, payload_nbytes(n, bits, group_size), plan, generation)


def quantize_prepared(x: torch.Tensor, prepared: PreparedQuantize) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``triton_quantize``'s (payload, meta) for ``x``, launched from ``prepared`` (made by
    ``prepare_quantize`` for a tensor of ``x``'s dtype, element count and dense layout) without working
    anything out again. None, launching nothing, where that launch would not be the one
    ``triton_quantize`` makes: ``x`` not 16-byte aligned, a tuning since that may change the tile, or no
    plan held by the launcher (none made yet: ``triton_quantize`` makes it on its first direct launch;
    direct launches off)."""
    if prepared.generation != config_generation() or x.data_ptr() % 16 or not launch_module.DIRECT_LAUNCH:
        return None
    device = x.device
    payload = torch.empty(prepared.payload_nbytes, dtype=torch.uint8, device=device)
    meta = torch.empty((prepared.n_groups, 2), dtype=torch.float32, device=device)
    arguments = _plain_arguments(x, payload, meta, prepared.n_elements, prepared.n_groups, 0, 0)
    return (payload, meta) if _launch_quantize.launch_planned(prepared.plan, arguments) else None


def _plain_arguments(x: torch.Tensor, payload: torch.Tensor, meta: torch.Tensor, n: int, n_groups: int, seed: int,
                     rng_offset: int) -> tuple:
    """_quantize_kernel's runtime arguments without standardization or runs: meta stands in for the
    statistics it then never reads, and the divisors and the run arguments are 1."""
    return x, payload, meta, n, n_groups, seed, rng_offset, meta, 1, 1, 1, 1


def quantize_launch_arguments(
    x: torch.Tensor, payload: torch.Tensor, meta: torch.Tensor, bits: int, group_size: int, rows: int, num_warps: int,
    sigma: bool = False, stochastic: bool = False, seed: int = 0, rng_offset: int = 0,
    channels: torch.Tensor | None = None, channel_stride: int = 1, runs: tuple[int, int] | None = None,
    tiles: int = 1,
) -> tuple[tuple, dict]:
    """(runtime arguments, constexprs) of one _quantize_kernel launch: what ``triton_quantize`` passes,
    for callers that launch the kernel themselves (benchmarks/profile_host.py). Its grid is
    ``cdiv(n_groups, rows * tiles)`` programs; ``tiles`` > 1 only without ``channels``."""
    if tiles > 1 and channels is not None:
        raise ValueError(f"tiles must be 1 with channels (standardization), got {tiles}")
    n = x.numel()
    if channels is not None:
        channels = standardizing_pairs(channels)
    statistics, stride_divisor, count_divisor, index64, by_row = channel_launch_args(
        n, channels, channel_stride, group_size, meta)
    if channels is None and runs is None:
        args = _plain_arguments(x, payload, meta, n, meta.shape[0], seed, rng_offset)
    else:
        # Without runs the kernel ignores run_divisor and run_stride: 1 each, one specialization for all sizes.
        run_divisor, run_stride = 1, 1
        if runs is not None:
            check_runs(n, runs, group_size, channels)
            run_groups = runs[0] // group_size
            run_divisor, run_stride = divider(run_groups) | run_groups << 40, runs[1]
        args = (x, payload, meta, n, meta.shape[0], seed, rng_offset, statistics, stride_divisor, count_divisor,
                run_divisor, run_stride)
    constexprs = dict(BITS=bits, GROUP=group_size, ROWS=rows, SIGMA=sigma, STOCHASTIC=stochastic,
                      STANDARDIZE=channels is not None, INDEX64=index64, ROW_CHANNELS=by_row, RUNS=runs is not None,
                      EVEN=n % group_size == 0,
                      SPLIT=split_for(group_size, x.element_size(), threads_per_group(rows, num_warps)),
                      SPLIT_FIRST=SPLIT_FIRST, EXACT_FMA=_EXACT_FMA, TILES=tiles)
    return args, constexprs


def readable_runs(x: torch.Tensor, group_size: int) -> tuple[int, int] | None:
    """``launch.strided_runs(x)`` when the quantize kernels can read those runs where they lie
    (``check_runs``), else None (then ``x`` is copied densely first)."""
    runs = strided_runs(x)
    return runs if runs is not None and _runs_fit(runs, group_size) else None


def _runs_fit(runs: tuple[int, int], group_size: int) -> bool:
    # Whole groups per run, fewer than COUNT_LIMIT of them (the count rides in run_divisor's top bits).
    return runs[0] > 0 and runs[0] % group_size == 0 and runs[0] // group_size < COUNT_LIMIT and runs[1] > runs[0]


def check_runs(n: int, runs: tuple[int, int], group_size: int, channels: torch.Tensor | None) -> None:
    """Raise ValueError unless the quantize kernel can read ``n`` elements laid out as ``runs`` = (run,
    run_stride): whole groups per run (fewer than 2**23), whole runs, gaps between them, and no
    standardization (the kernel finds an element's channel from its offset, which runs change)."""
    run, run_stride = runs
    if not _runs_fit(runs, group_size) or n % run:
        raise ValueError(f"runs must be (run, run_stride) with run a positive multiple of group_size "
                         f"({group_size}), fewer than 2**23 groups, that divides the {n} elements, and "
                         f"run_stride > run; got {runs}")
    if channels is not None:
        raise ValueError("runs cannot be combined with channels (standardization): pass a dense copy")


def _exact_div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    # torch evaluates `scalar / tensor` as a reciprocal times the scalar (two roundings);
    # tensor / tensor is the correctly rounded IEEE division that tl.div_rn computes.
    return torch.full_like(t, numerator) / t


def _exact_div_by(t: torch.Tensor, denominator: float) -> torch.Tensor:
    # On CUDA torch evaluates `tensor / python scalar` as a product with the scalar's reciprocal,
    # one ulp away from tl.div_rn for some inputs (on CPU it divides); tensor / tensor divides.
    return t / torch.full_like(t, denominator)


def _exact_sqrt(t: torch.Tensor) -> torch.Tensor:
    # torch's vectorized float32 sqrt on CPU can be 1 ulp off; the float64 root of a float32 value,
    # rounded to float32, is the correctly rounded float32 root that tl.sqrt_rn computes.
    return t.double().sqrt().float()


def torch_quantize(
    x: torch.Tensor, bits: int, group_size: int, sigma: bool, stochastic: bool, seed: int, rng_offset: int,
    channels: torch.Tensor | None = None, channel_stride: int = 1, runs: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference for ``triton_quantize``: same signature, same bits out.

    On the CPU it takes the tensor a span of at most ``TORCH_GRID_GROUPS`` groups at a time, and a span
    a chunk at a time (``torch_chunk_elements``); elsewhere both are the whole tensor. See
    ``_torch_quantize_span``. ``runs`` are copied into one dense run first.
    """
    if runs is not None:
        check_runs(x.numel(), runs, group_size, channels)
    flat = flat_view(x) if runs is None else runs_view(x, runs).reshape(-1)
    n = flat.numel()
    device = flat.device
    payload = torch.empty(payload_nbytes(n, bits, group_size), dtype=torch.uint8, device=device)
    meta = torch.empty((-(-n // group_size), 2), dtype=torch.float32, device=device)
    if n == 0:
        return payload, meta
    chunk = torch_chunk_elements(n, group_size, device) or n
    span = chunk if chunk >= n else chunk * max(1, TORCH_GRID_GROUPS * group_size // chunk)
    pairs = None if channels is None else standardizing_pairs(channels)
    for start in range(0, n, span):
        _torch_quantize_span(flat[start:start + span], start, chunk, bits, group_size, sigma, stochastic, seed,
                             rng_offset, pairs, channel_stride, payload, meta)
    return payload, meta


def _torch_quantize_span(
    span: torch.Tensor, start: int, chunk: int, bits: int, group_size: int, sigma: bool, stochastic: bool,
    seed: int, rng_offset: int, pairs: torch.Tensor | None, channel_stride: int, payload: torch.Tensor,
    meta: torch.Tensor,
) -> None:
    """Quantize the run ``span`` (1-D, whole groups but for a partial last one), which starts at element
    ``start`` of the tensor, into its groups' bytes of ``payload`` and rows of ``meta``.

    Two passes over its chunks: the groups' ranges (and the sigma scheme's windows), then their codes.
    In between, the span's grids are worked out together, from vectors of one value per group: some 60
    torch ops, whose cost is mostly their dispatch, paid once per span rather than once per chunk.
    """
    n = span.numel()
    n_groups = -(-n // group_size)
    first_group = start // group_size

    def values(offset: int) -> torch.Tensor:
        return _torch_group_values(span[offset:offset + chunk], start + offset, group_size, pairs, channel_stride)

    def rows(offset: int) -> slice:  # the chunk's groups, counted from the span's first
        return slice(offset // group_size, -(-min(offset + chunk, n) // group_size))

    # Pass 1: each group's range, and the sigma scheme's window inside it.
    lo = torch.empty(n_groups, dtype=torch.float32, device=span.device)
    hi = torch.empty_like(lo)
    window = (torch.empty_like(lo), torch.empty_like(lo)) if sigma else None
    kept = None  # the values of a span taken in one chunk, kept for pass 2
    for offset in range(0, n, chunk):
        r, v = rows(offset), values(offset)
        lo[r], hi[r] = v.amin(dim=1), v.amax(dim=1)
        if sigma:
            window[0][r], window[1][r] = _torch_sigma_window(v, lo[r], hi[r], min(chunk, n - offset))
        if chunk >= n:
            kept = v

    grid = _torch_grid(lo, hi, window, bits, standardized=pairs is not None)
    del lo, hi, window
    meta[first_group:first_group + n_groups] = grid.meta

    # Pass 2: the codes.
    group_bytes = group_size * bits // 8
    for offset in range(0, n, chunk):
        r = rows(offset)
        v = kept if kept is not None else values(offset)
        # (chunks start on whole groups, so on multiples of 4: the dither counters stay aligned)
        codes = _torch_codes(v, grid.rows(r), min(chunk, n - offset), bits, stochastic, seed,
                             rng_offset + (start + offset) // 4)
        first_byte = (first_group + r.start) * group_bytes
        payload[first_byte:first_byte + (r.stop - r.start) * group_bytes] = torch_pack_codes(codes, bits).view(-1)
        del v, codes


def torch_chunk_elements(n: int, group_size: int, device: torch.device) -> int | None:
    """How many of a tensor's ``n`` elements the torch references take at a time: on the CPU outside
    torch.compile, an eighth of the tensor, but at least ``TORCH_CHUNK_MIN_ELEMENTS`` and at most
    ``TORCH_CHUNK_ELEMENTS``, rounded to whole groups; elsewhere None, the whole tensor in one piece.

    On the CPU the torch backend is how training packs, so its temporaries count against the memory it
    is there to save, and chunks that stay in cache run faster. On a GPU the reference is what the
    kernels are measured against, whole. torch.compile fuses it and plans its own buffers, and would
    unroll a loop over chunks.
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return None
    chunk = max(TORCH_CHUNK_MIN_ELEMENTS, min(TORCH_CHUNK_ELEMENTS, n // TORCH_CHUNK_PARTS))
    return max(group_size, chunk // group_size * group_size)


def _torch_group_values(flat: torch.Tensor, start: int, group_size: int, pairs: torch.Tensor | None,
                       channel_stride: int) -> torch.Tensor:
    """float32 [groups, group_size]: a new copy of the run ``flat`` (1-D, whole groups but for a partial
    last one, starting at element ``start`` of the tensor), standardized by ``pairs``
    (``standardizing_pairs``, or None) for its channels. A partial last group is padded with its own
    last value, which changes none of its statistics but the sigma scheme's (that one masks the padding
    out); the padding's codes are set to 0."""
    n = flat.numel()
    n_groups = -(-n // group_size)
    x = torch.empty(n_groups * group_size, dtype=torch.float32, device=flat.device)
    x[:n] = flat
    if pairs is not None:
        for piece, channel in torch_channel_pieces(x[:n], start, channel_stride, pairs.shape[0]):
            piece -= pairs[channel, 0]
            piece *= pairs[channel, 1]
            piece += 1.0
    x[n:] = x[n - 1]
    return x.view(n_groups, group_size)


class _TorchGrid(NamedTuple):
    """Each group's grid, as ``_torch_codes`` applies it: float32 [groups, 1] columns, and the meta."""

    base: torch.Tensor
    inv_step: torch.Tensor
    offset: torch.Tensor  # added to a group's products: z where inv_step is 0 (every product is 0 there)
    # The codes a value may take, by its sign: [lower + lower_rise, upper] for x > 0, [lower, upper +
    # upper_rise] for x < 0, and [lower, upper] for x == 0 (an exact zero takes the negatives' lower bound
    # and the positives' upper bound; the kernel's comments say why that gives it z). A standardized
    # grid has no sign rule: rises None, [lower, upper] for every value.
    lower: torch.Tensor
    lower_rise: torch.Tensor | None
    upper: torch.Tensor
    upper_rise: torch.Tensor | None
    meta: torch.Tensor  # float32 [groups, 2]: (base, step), step NaN for a bad group (``_torch_grid``)

    def rows(self, r: slice) -> "_TorchGrid":
        return _TorchGrid(*(None if column is None else column[r] for column in self))


def _torch_grid(lo: torch.Tensor, hi: torch.Tensor, window: tuple[torch.Tensor, torch.Tensor] | None, bits: int,
                standardized: bool) -> _TorchGrid:
    """Each group's grid from its range ``lo``, ``hi`` (float32 [groups], NaN or Inf for a group holding
    one: min and max propagate NaN) and, for the sigma scheme, the ``window`` inside it."""
    levels_m1 = float(2**bits - 1)  # (not 1 << bits: torch 2.11's dynamic-shape compile fails on a shift)
    z_min, z_max = (1.0, levels_m1 - 1.0) if bits > 1 else (0.0, levels_m1)
    bad = ~(hi - lo < float("inf"))  # NaN or +/-Inf in the group, or a range that overflows float32
    lo = torch.where(bad, 0.0, lo)
    hi = torch.where(bad, 0.0, hi)
    g_lo, g_hi = (torch.where(bad, 0.0, window[0]), torch.where(bad, 0.0, window[1])) if window else (lo, hi)

    g_lo = torch.where(lo <= 0, g_lo.clamp(max=0.0), g_lo)
    g_hi = torch.where(hi >= 0, g_hi.clamp(min=0.0), g_hi)

    has_neg, has_pos = lo < 0, hi > 0
    mixed = has_neg & has_pos
    negative_side = has_neg & ~has_pos
    near = torch.where(negative_side, g_hi, g_lo)
    far = torch.where(negative_side, g_lo, g_hi)
    step = _exact_div_by(far - near, levels_m1)
    invertible = step.abs() >= _MIN_NORMAL
    inv_step = torch.where(invertible, _exact_div(1.0, torch.where(invertible, step, 1.0)), 0.0)
    z_mixed = torch.floor(-g_lo * inv_step + 0.5).clamp(z_min, z_max)
    z = torch.where(mixed, z_mixed, torch.where((lo <= 0) & (hi >= 0), 0.0, -1.0))
    base = torch.where(mixed, -(z * step), near)
    base = torch.where(base == 0.0, 0.0, base)
    offset = torch.where(invertible, 0.0, z)  # where every product is 0, zeros round to z (a bad group's z is 0)

    # A bad group's codes are all 0.
    if standardized:  # no sign rule, codes 0..L (the kernel says why)
        lower, lower_rise = torch.zeros_like(lo), None
        upper, upper_rise = torch.where(bad, 0.0, levels_m1), None
    else:
        positives_away = ~negative_side
        toward_hi = (z - 1.0).clamp(min=0.0)
        positive_lo = torch.where(bad, 0.0, torch.where(positives_away, z + 1.0, 0.0))
        positive_hi = torch.where(bad, 0.0, torch.where(positives_away, levels_m1, toward_hi))
        negative_lo = torch.where(bad, 0.0, torch.where(positives_away, 0.0, z + 1.0))
        negative_hi = torch.where(bad, 0.0, torch.where(positives_away, toward_hi, levels_m1))
        lower, lower_rise = negative_lo, positive_lo - negative_lo
        upper, upper_rise = positive_hi, negative_hi - positive_hi
    meta = torch.stack([base, torch.where(bad, float("nan"), step)], dim=1)
    return _TorchGrid(*(None if column is None else column[:, None]
                        for column in (base, inv_step, offset, lower, lower_rise, upper, upper_rise)), meta)


def _torch_codes(x: torch.Tensor, grid: _TorchGrid, n: int, bits: int, stochastic: bool, seed: int,
                 rng_offset: int) -> torch.Tensor:
    """uint8 [groups, group_size] codes of the values ``x`` (``_torch_group_values``, overwritten), on
    their groups' ``grid``; the first ``n`` are the run's elements, the rest padding (code 0).

    (On the CPU this is how training packs: temporaries the size of the run are made in place or
    dropped once used, to keep the chunks' memory small.)"""
    xs = x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # (a bad group's codes are all 0 whatever it holds)
    d = xs - grid.base
    if stochastic:
        # Element i takes word i % 4 of Philox(seed, rng_offset + i // 4), as _dithers in the kernel.
        counters = rng_offset + torch.arange(xs.numel() // 4, device=xs.device, dtype=torch.int64)
        t = d * grid.inv_step + torch_dither4(seed, counters).view(xs.shape) * (xs != 0).float()
        del counters
        rounded = torch.round(t.add_(grid.offset))  # to nearest, ties to even (zeros were not dithered)
        del t
    else:
        # The kernel's fma rounds the product once: in float64 the product of two float32 is exact, and
        # offset is nonzero only where inv_step is 0, so the sum is exact too.
        rounded = (d.double() * grid.inv_step.double()).add_(grid.offset.double()).round_().float()
    del d
    # The bounds are small whole numbers, so selecting by multiplying with a 0/1 mask is exact (and, on
    # the CPU, several times faster than torch.where on a full tile).
    signed = grid.lower_rise is not None
    lower = grid.lower + grid.lower_rise * (xs > 0).float() if signed else grid.lower
    code = torch.maximum(rounded, lower, out=rounded)
    del lower
    upper = grid.upper + grid.upper_rise * (xs < 0).float() if signed else grid.upper
    code = torch.minimum(code, upper, out=code)
    code = code.to(torch.uint8)
    code.view(-1)[n:].zero_()  # the padding (zero_, not `= 0`: that makes a tensor of host data)
    return code


def _torch_sigma_window(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                        n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigma scheme's grid window of each group of ``x`` (float32 [n_groups, group_size], holding the
    run's ``n`` elements and then padding), given each group's [lo, hi] (NaN or Inf where the group
    holds one; its window is then not used): mean +/- SIGMA_WIDTH standard deviations, inside [lo, hi];
    [lo, hi] itself where that window is empty."""
    n_groups, group_size = x.shape
    finite = lo.isfinite() & hi.isfinite()
    lo = torch.where(finite, lo, 0.0)
    hi = torch.where(finite, hi, 0.0)
    ok = x.isfinite()
    ok.view(-1)[n:].fill_(False)
    center = lo * 0.5 + hi * 0.5
    half = hi * 0.5 - lo * 0.5
    to_fixed = torch.where(half > 0, _exact_div(FIXED_POINT_SCALE, half.clamp(min=_TINY_RANGE)), 0.0)
    fixed = (torch.where(ok, x - center[:, None], 0.0) * to_fixed[:, None]).to(torch.int32)
    sum1 = fixed.sum(dim=1, dtype=torch.int64)
    sum2 = (fixed * fixed).to(torch.int64).sum(dim=1)
    count = (n - torch.arange(n_groups, device=x.device) * group_size).clamp(1, group_size).float()
    mean_fixed = sum1.float() / count
    var_fixed = (sum2.float() / count - mean_fixed * mean_fixed).clamp(min=0.0)
    unit = half * (1.0 / FIXED_POINT_SCALE)
    mean = torch.minimum(torch.maximum(center + mean_fixed * unit, lo), hi)
    width = SIGMA_WIDTH * (_exact_sqrt(var_fixed) * unit)
    g_lo = torch.maximum(lo, mean - width)
    g_hi = torch.minimum(hi, mean + width)
    collapsed = g_hi <= g_lo
    return torch.where(collapsed, lo, g_lo), torch.where(collapsed, hi, g_hi)
