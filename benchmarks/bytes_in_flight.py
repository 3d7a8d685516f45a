#!/usr/bin/env python
"""How much of its input a quantize tile lets one SM hold at once: registers, tiles per SM, bytes.

    python benchmarks/bytes_in_flight.py [--cache FILE] [--dtypes bf16,fp32] [--bits 4,2,8] [--maxnreg N]

Why: on the H200 (2026-11-30) quantize from bf16 reached 71-80% of copy bandwidth at 256 MiB, and
from fp32 89-93%, though neither needs more instructions per element than the bandwidth leaves
(docs/kernels.md). A tile's loads land in registers. So the registers a tile needs decide how many
tiles an SM runs at once, and with them how many bytes of input the SM can have requested and not yet
used. A memory-bound kernel needs about bandwidth x latency of them per SM to keep the memory busy.

This compiles the quantize tiles the tuner chose (the autotune cache ``--cache``, at its largest size
bucket for each dtype and width), the untuned default tile, and the tuner's pipelined candidates
(``autotune.PIPELINED_CANDIDATE_TILES``: programs that load their next tile while they compute one), for
sm_90 without a GPU (Triton's frontend and bundled ptxas). It reads each one's registers with the
bundled cuobjdump, and prints the programs and warps an SM can hold (65,536 registers, allocated 256
per warp; at most 64 warps and 32 programs), the input bytes their tiles load, and how many of those
bytes can be on their way while the programs compute: none for one tile a program, whose loads must
all arrive before it computes, and a tile a program when each loads its next one first.
``--maxnreg N`` compiles the pipelined candidates with Triton's register cap (``maxnreg``): fewer
registers, more programs an SM, unless ptxas must spill to fit (the ``spilled bytes`` column, the
stack each thread then uses). Exits 2 where this Triton lacks cuobjdump.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # (compiled kernels: set before triton is imported)

import triton  # noqa: E402
from tabulate import tabulate  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritonquant.kernels.autotune import PIPELINED_CANDIDATE_TILES, PIPELINED_TILES  # noqa: E402
from tritonquant.kernels.launch import default_group_tile  # noqa: E402
from tritonquant.kernels.quantize import SPLIT_FIRST, _quantize_kernel, split_for, threads_per_group  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "docs" / "results" / "2026-11-30-h200" / "autotune-6.json"
GROUP = 256
ELEMENT_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
# sm_90, per SM.
REGISTERS, REGISTERS_PER_WARP_GRANULE, MAX_WARPS, MAX_TILES = 65536, 256, 64, 32


def cuobjdump() -> str | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if os.access(path, os.X_OK) else None


def tile_registers(dtype: str, bits: int, rows: int, num_warps: int, tool: str, tiles: int = 1,
                   maxnreg: int | None = None) -> tuple[int, int]:
    """(registers, spilled bytes) per thread of the plain quantize kernel (whole groups, no scheme or
    standardization) for ``dtype`` at ``bits``, ``rows`` groups a tile on ``num_warps`` warps, ``tiles``
    tiles a program, at most ``maxnreg`` registers (None: ptxas's choice), compiled for sm_90 as a
    launch with 16-byte aligned pointers compiles it."""
    constexprs = {"BITS": bits, "GROUP": GROUP, "ROWS": rows, "SIGMA": False, "STOCHASTIC": False,
                  "STANDARDIZE": False, "INDEX64": False, "ROW_CHANNELS": False, "RUNS": False, "EVEN": True,
                  "SPLIT": split_for(GROUP, ELEMENT_SIZES[dtype], threads_per_group(rows, num_warps)),
                  "SPLIT_FIRST": SPLIT_FIRST, "EXACT_FMA": True, "TILES": tiles, "run_divisor": 1, "run_stride": 1}
    signature = {"x_ptr": f"*{dtype}", "payload_ptr": "*u8", "meta_ptr": "*fp32", "n_elements": "i64",
                 "n_groups": "i32", "seed": "i64", "rng_offset": "i64", "channels_ptr": "*fp32",
                 "stride_divisor": "i64", "count_divisor": "i64", **dict.fromkeys(constexprs, "constexpr")}
    pointers = [i for i, kind in enumerate(k for k in signature.values() if k != "constexpr") if kind.startswith("*")]
    attributes = {(i,): [["tt.divisibility", 16]] for i in pointers}
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(ASTSource(_quantize_kernel, signature, constexprs, attributes),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def residency(registers: int, num_warps: int) -> tuple[int, int]:
    """(programs, warps) one SM holds at once for programs of ``num_warps`` warps of ``registers`` each."""
    per_warp = -(-registers * 32 // REGISTERS_PER_WARP_GRANULE) * REGISTERS_PER_WARP_GRANULE
    tiles = min(REGISTERS // (per_warp * num_warps), MAX_WARPS // num_warps, MAX_TILES)
    return tiles, tiles * num_warps


def tuned_tiles(cache: Path, dtypes: list[str], bits: list[int]) -> dict[tuple[str, int], tuple[int, int, int, int]]:
    """{(dtype, bits): (rows, num_warps, tiles, bucket)} of the plain quantize entries at each one's
    largest bucket (``tiles`` 1 in caches from before format 7, which had no pipelined configs)."""
    chosen: dict[tuple[str, int], tuple[int, int, int, int]] = {}
    for entry in json.loads(cache.read_text())["entries"]:
        key = (entry["dtype"], entry["bits"])
        if (entry["kind"] != "quantize" or entry["sigma"] or entry["stochastic"] or entry["group_size"] != GROUP
                or key[0] not in dtypes or key[1] not in bits):
            continue
        if key not in chosen or entry["bucket"] > chosen[key][3]:
            chosen[key] = (entry["rows"], entry["num_warps"], entry.get("tiles", 1), entry["bucket"])
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"an autotune cache file (default: {DEFAULT_CACHE.relative_to(REPO)})")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16, fp16, fp32 (default bf16,fp32)")
    parser.add_argument("--bits", default="4,2,8", help="comma-separated, of 1, 2, 4, 8 (default 4,2,8)")
    parser.add_argument("--maxnreg", type=int, default=None,
                        help="a register cap for the pipelined candidates, 16 to 255 (default: none)")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= ELEMENT_SIZES.keys():
        parser.error(f"--dtypes must name some of {', '.join(ELEMENT_SIZES)}, got {args.dtypes!r}")
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        bits = []
    if not bits or not set(bits) <= {1, 2, 4, 8}:
        parser.error(f"--bits must name some of 1, 2, 4, 8, got {args.bits!r}")
    if args.maxnreg is not None and not 16 <= args.maxnreg <= 255:
        parser.error(f"--maxnreg must be 16 to 255, got {args.maxnreg}")
    try:
        tuned = tuned_tiles(args.cache, dtypes, bits)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"--cache: cannot read an autotune cache from {args.cache}: {exc}")
    tool = cuobjdump()
    if tool is None:
        print("SKIP: this Triton bundles no cuobjdump to read registers with")
        return 2

    default_rows, default_warps = default_group_tile(1 << 20, GROUP, interpreted=False)
    rows_out = []
    pipelined = [(tile // GROUP, warps, PIPELINED_TILES) for tile, warps in PIPELINED_CANDIDATE_TILES]
    for dtype in dtypes:
        for width in bits:
            configs = [("default", default_rows, default_warps, 1)]
            if (dtype, width) in tuned:
                rows, warps, tiles, bucket = tuned[dtype, width]
                configs.insert(0, (f"tuned (bucket {bucket})", rows, warps, tiles))
            configs += [("pipelined candidate", *config) for config in pipelined]
            for source, rows, warps, tiles in configs:
                cap = args.maxnreg if source == "pipelined candidate" else None
                registers, spilled = tile_registers(dtype, width, rows, warps, tool, tiles, cap)
                resident, warps_per_sm = residency(registers, warps)
                tile_kb = rows * GROUP * ELEMENT_SIZES[dtype] / 1024
                while_computing = resident * tile_kb if tiles > 1 else 0
                rows_out.append([dtype, width, f"{rows} x {warps} x {tiles}", source, registers, resident,
                                 warps_per_sm, f"{tile_kb:g}", f"{resident * tile_kb:g}", f"{while_computing:g}",
                                 spilled])
    capped = f"; pipelined candidates at most {args.maxnreg} registers" if args.maxnreg is not None else ""
    print(f"Triton {triton.__version__}, sm_90, plain quantize at group size {GROUP}; tuned tiles from "
          f"{args.cache}{capped}\n")
    print(tabulate(rows_out, headers=["dtype", "bits", "rows x warps x tiles", "config from", "registers",
                                      "programs per SM", "warps per SM", "input KB a tile", "input KB per SM",
                                      "KB loading while computing", "spilled bytes"],
                   tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
