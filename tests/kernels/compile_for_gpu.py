"""Compile every kernel variant for real NVIDIA targets, without a GPU (run as a script).

The interpreter accepts code the compiler rejects (non-constexpr globals, unsupported casts), so the
test suite runs this in a subprocess without TRITON_INTERPRET: Triton's frontend, its optimizer passes
and the bundled ptxas then turn each variant into a cubin for the targets listed below. Prints one
line per variant and exits 1 if any failed.

    python tests/kernels/compile_for_gpu.py [--quick]
"""

import itertools
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritonquant.kernels.bitpack import _pack_bool_kernel, _unpack_bool_kernel  # noqa: E402
from tritonquant.kernels.dequantize import _dequantize_kernel  # noqa: E402
from tritonquant.kernels.quantize import SPLIT_FIRST, _quantize_kernel, split_for, threads_per_group  # noqa: E402

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
FLOATS = ("fp32", "fp16", "bf16")
ELEMENT_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}
NUM_WARPS = 4
# Quantize tiles: 16 rows, whose rows 8 threads share, and 32, whose rows 4 share (threads_per_group).
QUANTIZE_ROWS = (16, 32)


def variants(quick: bool):
    bits_choices = (1, 2, 4, 8)
    channel_args = {"channels_ptr": "*fp32", "channel_stride": "i32", "n_channels": "i32"}
    for bits, sigma, stochastic, standardize, even, dtype, rows in itertools.product(
            bits_choices, (False, True), (False, True), (False, True), (True, False), FLOATS, QUANTIZE_ROWS):
        if quick and (dtype != "bf16" or (sigma and stochastic and bits != 4) or (standardize and bits != 2)
                      or (not even and (bits != 4 or sigma or stochastic or standardize))
                      or (rows != QUANTIZE_ROWS[0] and (bits != 4 or sigma or stochastic or standardize))):
            continue
        signature = {"x_ptr": f"*{dtype}", "payload_ptr": "*u8", "meta_ptr": "*fp32", "n_elements": "i64",
                     "n_groups": "i32", "seed": "i64", "rng_offset": "i64", **channel_args, "BITS": "constexpr",
                     "GROUP": "constexpr", "ROWS": "constexpr", "SIGMA": "constexpr", "STOCHASTIC": "constexpr",
                     "STANDARDIZE": "constexpr", "EVEN": "constexpr", "SPLIT": "constexpr",
                     "SPLIT_FIRST": "constexpr"}
        split = split_for(256, ELEMENT_SIZES[dtype], threads_per_group(rows, NUM_WARPS))
        constants = {"BITS": bits, "GROUP": 256, "ROWS": rows, "SIGMA": sigma, "STOCHASTIC": stochastic,
                     "STANDARDIZE": standardize, "EVEN": even, "SPLIT": split, "SPLIT_FIRST": SPLIT_FIRST}
        name = (f"quantize {bits}bit {dtype} sigma={sigma} stochastic={stochastic} standardize={standardize} "
                f"even={even} rows={rows}")
        yield name, _quantize_kernel, signature, constants
    for bits, standardize, even, dtype in itertools.product(bits_choices, (False, True), (True, False), FLOATS):
        if quick and ((standardize and bits != 2) or (not even and (bits != 4 or standardize or dtype != "bf16"))):
            continue
        signature = {"payload_ptr": "*u8", "meta_ptr": "*fp32", "out_ptr": f"*{dtype}", "n_elements": "i64",
                     "n_groups": "i32", **channel_args, "BITS": "constexpr", "GROUP": "constexpr",
                     "ROWS": "constexpr", "STANDARDIZE": "constexpr", "HARDWARE_CAST": "constexpr",
                     "EVEN": "constexpr"}
        constants = {"BITS": bits, "GROUP": 256, "ROWS": 16, "STANDARDIZE": standardize, "HARDWARE_CAST": True,
                     "EVEN": even}
        name = f"dequantize {bits}bit {dtype} standardize={standardize} even={even}"
        yield name, _dequantize_kernel, signature, constants
    for name, kernel in (("pack bool", _pack_bool_kernel), ("unpack bool", _unpack_bool_kernel)):
        signature = {"src_ptr": "*u8", "dst_ptr": "*u8", "n_elements": "i64", "BLOCK_BYTES": "constexpr"}
        yield name, kernel, signature, {"BLOCK_BYTES": 1024}




def aligned(signature: dict) -> dict:
    """The specialization Triton gives pointers that are 16-byte aligned and an n_elements that is a
    multiple of 16, as tensors of whole groups have them: the one whose layout is checked below."""
    runtime = [name for name, kind in signature.items() if kind != "constexpr"]
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(runtime)
            if signature[name].startswith("*") or name == "n_elements"}


def split_axis_threads(compiled) -> int:
    """Threads of a warp that _quantize_kernel's input load spreads over its tile's SPLIT axis.

    1 means each thread holds all SPLIT vectors of its row, as the kernel intends; more means a
    row is shared by a whole warp (``quantize.split_axis_first``).
    """
    lines = compiled.asm["ttgir"].splitlines()
    load = next(line for line in lines if "tt.load" in line and "x!tt.ptr<" in line and line.count("x") >= 3)
    encoding = load.rsplit(", #", 1)[1].split(">", 1)[0]
    definition = next(line for line in lines if line.startswith(f"#{encoding} ="))
    threads = [int(n) for n in definition.split("threadsPerWarp = [", 1)[1].split("]", 1)[0].split(",")]
    return threads[0 if SPLIT_FIRST else 1]


def main() -> int:
    quick = "--quick" in sys.argv
    failures = 0
    for name, kernel, signature, constants in variants(quick):
        for target_name, target in TARGETS.items():
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constants, aligned(signature)), target=target,
                                          options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})
                status = f"ok ({len(compiled.asm['cubin'])} bytes of cubin)"
                if kernel is _quantize_kernel and constants["SPLIT"] > 1 and split_axis_threads(compiled) != 1:
                    failures += 1
                    status = (f"FAILED: the input load spreads {split_axis_threads(compiled)} threads over a row's "
                              "chunks: quantize.split_axis_first is wrong for this Triton")
            except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
                failures += 1
                status = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            print(f"{name} [{target_name}]: {status} {time.perf_counter() - start:.1f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
