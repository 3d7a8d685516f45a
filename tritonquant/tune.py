"""``python -m tritonquant tune``: tune the launch configuration of the common cases ahead of time.

Each item is one cache key of ``tritonquant.kernels.autotune`` (kernel kind, bits, group size, dtype,
size bucket, scheme/rounding for quantize). Items already in the cache are reported, not retimed
(``--force`` retimes them). Results go to the autotune cache file, so later processes skip tuning.

Defaults: bits 4, 2, 8, 1 (in that order, so a time budget keeps the common ones); group size 256;
bf16, fp32, fp16; buckets 9..13, i.e. 4**9 = 262,144 to 4**13 = 67,108,864 elements (1 MiB to 256 MiB
of fp32 input); minmax scheme, nearest rounding.

Exit status: 0 when every item was tuned or found in the cache, or when there is no CUDA GPU (tuning
needs one: the command then says so and prints the single config the Triton interpreter uses); 1 when
tuning of some item failed (that key falls back to the heuristic); 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import NamedTuple, Sequence, TextIO

import torch
from tabulate import tabulate

from .config import BITS_CHOICES, GROUP_SIZES, SCHEMES
from .kernels import autotune

DEFAULT_BITS = (4, 2, 8, 1)
DEFAULT_GROUP_SIZES = (256,)
DEFAULT_DTYPES = ("bf16", "fp32", "fp16")
DEFAULT_BUCKETS = tuple(range(9, autotune.MAX_TUNED_BUCKET + 1))
DEFAULT_SCHEMES = ("minmax",)


class TuneItem(NamedTuple):
    """One thing to tune. ``scheme`` and ``stochastic`` only matter for quantize."""

    kind: str
    bits: int
    group_size: int
    dtype: str
    bucket: int
    scheme: str
    stochastic: bool


def plan_items(
    bits: Sequence[int] = DEFAULT_BITS,
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    stochastic: bool = False,
) -> list[TuneItem]:
    """Items in tuning order: group size, bits, dtype, bucket, then quantize variants and dequantize."""
    roundings = (False, True) if stochastic else (False,)
    items = []
    for group_size in group_sizes:
        for b in bits:
            for dtype in dtypes:
                for bucket in buckets:
                    for scheme in schemes:
                        for rounding in roundings:
                            items.append(TuneItem("quantize", b, group_size, dtype, bucket, scheme, rounding))
                    items.append(TuneItem("dequantize", b, group_size, dtype, bucket, "-", False))
    return items


def run_tune(
    bits: Sequence[int] = DEFAULT_BITS,
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    stochastic: bool = False,
    max_seconds: float | None = None,
    force: bool = False,
    stream: TextIO | None = None,
) -> int:
    """Tune every planned item on the current CUDA device, print progress and a table; see the module
    docstring for the defaults and the exit status. ``max_seconds`` stops starting new items after that
    long (the ones left are listed as skipped)."""
    out = stream or sys.stdout
    try:
        _check_choices(bits, group_sizes, dtypes, buckets, schemes)
    except ValueError as exc:
        print(f"tritonquant tune: {exc}", file=out)
        return 2

    if not torch.cuda.is_available():
        _print_no_gpu(group_sizes, out)
        return 0

    device = torch.device("cuda", torch.cuda.current_device())
    gpu, (major, minor) = autotune.device_identity(device)
    items = plan_items(bits, group_sizes, dtypes, buckets, schemes, stochastic)
    print(f"Tuning {len(items)} launch configurations on {gpu} (sm_{major}{minor}); cache: {autotune.cache_path()}",
          file=out)
    if not autotune.autotune_enabled():
        print(f"Note: {autotune.ENV_AUTOTUNE}=0 is set, so launches ignore what is tuned here until it is unset.",
              file=out)

    start = time.monotonic()
    rows = []
    failed = skipped = 0
    width = len(str(len(items)))
    for index, item in enumerate(items, 1):
        elapsed = time.monotonic() - start
        label = _describe(item)
        if max_seconds is not None and elapsed > max_seconds:
            skipped += 1
            rows.append(_row(item, None))
            print(f"[{index:>{width}}/{len(items)} {_clock(elapsed)}] {label}: skipped (time budget)", file=out)
            continue
        key = autotune.make_key(item.kind, device, item.dtype, autotune.bucket_elements(item.bucket), item.bits,
                                item.group_size, item.scheme == "sigma", item.stochastic)
        result = autotune.get_or_tune(key, device, force=force)
        failed += result.source == "failed"
        rows.append(_row(item, result))
        print(f"[{index:>{width}}/{len(items)} {_clock(time.monotonic() - start)}] {label}: {_outcome(result)}",
              file=out, flush=True)

    # "1-tile ms": the fastest config of one tile a program, timed in the same tuning (quantize, when
    # tuned now): beside "ms", what loading the next tile while computing one gained, or not.
    headers = ["kind", "scheme", "bits", "group", "dtype", "elements", "rows", "warps", "tiles", "elements/program",
               "ms", "1-tile ms", "GB/s", "vs heuristic", "source"]
    print(file=out)
    print(tabulate(rows, headers=headers, tablefmt="github", floatfmt=".4g"), file=out)
    print(f"\n{len(items) - failed - skipped} of {len(items)} configurations tuned or cached, {failed} failed, "
          f"{skipped} skipped, in {_clock(time.monotonic() - start)}. Cache: {autotune.cache_path()}", file=out)
    return 1 if failed else 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tune`` subcommand's options."""
    parser.add_argument("--bits", type=_int_list, default=DEFAULT_BITS, help="comma-separated (default 4,2,8,1)")
    parser.add_argument("--group-sizes", type=_int_list, default=DEFAULT_GROUP_SIZES,
                        help="comma-separated (default 256)")
    parser.add_argument("--dtypes", type=_str_list, default=DEFAULT_DTYPES, help="comma-separated fp32,bf16,fp16")
    parser.add_argument("--buckets", type=_int_list, default=DEFAULT_BUCKETS,
                        help="size buckets k, tuned on 4**k elements (default 9..13: 1 to 256 MiB of fp32)")
    parser.add_argument("--schemes", type=_str_list, default=DEFAULT_SCHEMES,
                        help="quantize schemes to tune, comma-separated minmax,sigma (default minmax)")
    parser.add_argument("--stochastic", action="store_true", help="also tune stochastic-rounding quantize")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop starting new items after this many seconds (the rest are skipped)")
    parser.add_argument("--force", action="store_true", help="retime items already in the cache")


def run_tune_from_args(args: argparse.Namespace) -> int:
    """``run_tune`` with the options of ``add_tune_arguments``."""
    return run_tune(bits=args.bits, group_sizes=args.group_sizes, dtypes=args.dtypes, buckets=args.buckets,
                    schemes=args.schemes, stochastic=args.stochastic, max_seconds=args.max_seconds,
                    force=args.force)


def _print_no_gpu(group_sizes: Sequence[int], out: TextIO) -> None:
    print("Autotuning needs a CUDA GPU, and none is available here (torch.cuda.is_available() is False).\n"
          "Nothing was tuned. Without a GPU the Triton kernels run only through Triton's CPU interpreter\n"
          "(TRITON_INTERPRET=1), where the launch configuration collapses to one config with no timing:",
          file=out)
    large = autotune.bucket_elements(autotune.MAX_TUNED_BUCKET)
    rows = []
    for group_size in group_sizes:
        config = autotune.interpreter_config(-(-large // group_size), group_size)
        rows.append([group_size, config.rows, config.num_warps, config.rows * group_size])
    print(tabulate(rows, headers=["group", "rows", "warps", "elements/program"], tablefmt="github"), file=out)
    print("(rows shrink to the tensor's group count when it has fewer groups.) Run `python -m tritonquant tune`\n"
          "on a CUDA machine to time the candidates and fill the cache.", file=out)


def _row(item: TuneItem, result: autotune.TuneResult | None) -> list:
    elements = autotune.bucket_elements(item.bucket)
    row = [item.kind, item.scheme + ("+stochastic" if item.stochastic else ""), item.bits, item.group_size,
           item.dtype, f"4^{item.bucket} = {elements:,}"]
    if result is None:
        return row + ["", "", "", "", "", "", "", "", "skipped"]
    config, ms, heuristic_ms = result.entry
    traffic = autotune.traffic_bytes(item.kind, elements, item.bits, item.group_size,
                                     autotune.DTYPES[item.dtype].itemsize)
    gbps = traffic / (ms * 1e6) if ms else None
    speedup = f"{heuristic_ms / ms:.2f}x" if ms and heuristic_ms else ""
    one_tile = [timing for candidate, timing in result.timings.items()
                if candidate.tiles == 1 and math.isfinite(timing)]
    one_tile_ms = min(one_tile) if one_tile and item.kind == "quantize" else None
    return row + [config.rows, config.num_warps, config.tiles, config.rows * config.tiles * item.group_size, ms,
                  one_tile_ms, gbps, speedup, result.source]


def _describe(item: TuneItem) -> str:
    variant = f" {item.scheme}{'+stochastic' if item.stochastic else ''}" if item.kind == "quantize" else ""
    return (f"{item.kind}{variant} {item.bits}-bit g{item.group_size} {item.dtype} "
            f"4^{item.bucket}={autotune.bucket_elements(item.bucket):,} el")


def _outcome(result: autotune.TuneResult) -> str:
    config, ms, heuristic_ms = result.entry
    text = f"rows {config.rows}, {config.num_warps} warps"
    if config.tiles > 1:
        text += f", {config.tiles} tiles a program"
    if ms is not None:
        text += f", {ms:.4g} ms"
        if heuristic_ms:
            text += f" (heuristic {heuristic_ms:.4g} ms)"
    text += f" [{result.source}]"
    if result.error:
        text += f" {result.error}"
    return text


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _check_choices(bits, group_sizes, dtypes, buckets, schemes) -> None:
    for name, values, allowed in (("bits", bits, BITS_CHOICES), ("group size", group_sizes, GROUP_SIZES),
                                  ("dtype", dtypes, tuple(autotune.DTYPES)), ("scheme", schemes, SCHEMES),
                                  ("bucket", buckets, tuple(range(autotune.MIN_TUNED_BUCKET,
                                                                  autotune.MAX_TUNED_BUCKET + 1)))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"invalid {name} {bad or values}; choose from {', '.join(map(str, allowed))}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
