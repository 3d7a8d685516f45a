"""Compile every kernel variant for real NVIDIA targets, without a GPU (run as a script).

The interpreter accepts code the compiler rejects (non-constexpr globals, unsupported casts), so the
test suite runs this in a subprocess without TRITON_INTERPRET: Triton's frontend, its optimizer passes
and the bundled ptxas then turn each variant into a cubin for the targets listed below. Prints one
line per variant and exits 1 if any failed.

For sm_90 it also counts, in the machine code (with the nvdisasm and cuobjdump that Triton bundles,
when present), the quantize and dequantize kernels' instructions per element on the main path, the
float-integer conversions among them, and the registers: how the kernels are judged without a GPU
(docs/kernels.md). A quantize variant without the sigma scheme or standardization must not convert per
element (a few conversions per group are fine): conversions issue at 1/8 of the float32 rate on sm_90.

    python tests/kernels/compile_for_gpu.py [--quick]
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritonquant.kernels.bitpack import _pack_bool_kernel, _unpack_bool_kernel  # noqa: E402
from tritonquant.kernels.dequantize import ACTIVATIONS, _dequantize_kernel  # noqa: E402
from tritonquant.kernels.pool_indices import BLOCK_ELEMENTS, _decode_kernel, _encode_kernel  # noqa: E402
from tritonquant.kernels.quantize import SPLIT_FIRST, _quantize_kernel, split_for, threads_per_group  # noqa: E402

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
FLOATS = ("fp32", "fp16", "bf16")
ELEMENT_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}
NUM_WARPS = 4
# Quantize tiles: 16 rows, whose rows 8 threads share, and 32, whose rows 4 share (threads_per_group).
QUANTIZE_ROWS = (16, 32)
RUN_ARGUMENTS = ("run_divisor", "run_stride")


def channel_args(index64: bool) -> dict:
    # The channel divisors as launches pass them: prepared for multiply-high, 64-bit ints
    # (kernels/channels.py), or plain 32-bit ones for 64-bit division (INDEX64).
    kind = "i32" if index64 else "i64"
    return {"channels_ptr": "*fp32", "stride_divisor": kind, "count_divisor": kind}


def variants(quick: bool):
    bits_choices = (1, 2, 4, 8)

    # INDEX64 (channel indices by 64-bit division, for runs of 2**31 elements or more): standardized
    # variants only, at the 16-row tile of whole groups (and in quick mode one of them).
    for bits, sigma, stochastic, standardize, index64, row_channels, runs, even, dtype, rows in itertools.product(
            bits_choices, (False, True), (False, True), (False, True), (False, True), (False, True), (False, True),
            (True, False), FLOATS, QUANTIZE_ROWS):
        if index64 and (not standardize or not even or rows != QUANTIZE_ROWS[0]):
            continue
        # RUNS (strided runs read where they lie: attention's q, k, v): whole groups, not standardized,
        # 16-row tile; in quick mode bf16 at 4 bits, nearest rounding.
        if runs and (not even or standardize or rows != QUANTIZE_ROWS[0]
                     or (quick and (bits != 4 or sigma or stochastic))):
            continue
        # ROW_CHANNELS (statistics read per group, kernels/channels.py): standardized 32-bit runs only.
        if row_channels and (not standardize or index64 or (quick and (dtype != "bf16" or sigma or stochastic))):
            continue
        if quick and (dtype != "bf16" or (sigma and stochastic and bits != 4) or (standardize and bits != 2)
                      or (index64 and (sigma or stochastic))
                      or (not even and (bits != 4 or sigma or stochastic or standardize))
                      or (rows != QUANTIZE_ROWS[0] and (bits != 4 or sigma or stochastic or standardize))):
            continue
        # Without runs, launches pass run_divisor = run_stride = 1, which Triton specializes as constants.
        run_args = {"run_divisor": "i64", "run_stride": "i64"} if runs else dict.fromkeys(RUN_ARGUMENTS, "constexpr")
        signature = {"x_ptr": f"*{dtype}", "payload_ptr": "*u8", "meta_ptr": "*fp32", "n_elements": "i64",
                     "n_groups": "i32", "seed": "i64", "rng_offset": "i64", **channel_args(index64), **run_args,
                     "BITS": "constexpr",
                     "GROUP": "constexpr", "ROWS": "constexpr", "SIGMA": "constexpr", "STOCHASTIC": "constexpr",
                     "STANDARDIZE": "constexpr", "INDEX64": "constexpr", "ROW_CHANNELS": "constexpr",
                     "RUNS": "constexpr", "EVEN": "constexpr", "SPLIT": "constexpr", "SPLIT_FIRST": "constexpr",
                     "EXACT_FMA": "constexpr", "TILES": "constexpr"}
        split = split_for(256, ELEMENT_SIZES[dtype], threads_per_group(rows, NUM_WARPS))
        constants = {"BITS": bits, "GROUP": 256, "ROWS": rows, "SIGMA": sigma, "STOCHASTIC": stochastic,
                     "STANDARDIZE": standardize, "INDEX64": index64, "ROW_CHANNELS": row_channels, "RUNS": runs,
                     "EVEN": even, "SPLIT": split, "SPLIT_FIRST": SPLIT_FIRST, "EXACT_FMA": True, "TILES": 1}
        if not runs:
            constants.update(dict.fromkeys(RUN_ARGUMENTS, 1))
        name = (f"quantize {bits}bit {dtype} sigma={sigma} stochastic={stochastic} standardize={standardize}"
                f"{' index64' if index64 else ''}{' row_channels' if row_channels else ''}{' runs' if runs else ''}"
                f" even={even} rows={rows}")
        yield name, _quantize_kernel, signature, constants
    for bits, standardize, index64, row_channels, even, dtype in itertools.product(
            bits_choices, (False, True), (False, True), (False, True), (True, False), FLOATS):
        # INDEX64 and ROW_CHANNELS: standardized variants only, never together; INDEX64 for whole groups.
        if ((index64 or row_channels) and not standardize) or (index64 and (row_channels or not even)):
            continue
        if quick and ((standardize and bits != 2) or (index64 and dtype != "bf16")
                      or (row_channels and dtype != "bf16")
                      or (not even and (bits != 4 or standardize or dtype != "bf16"))):
            continue
        yield dequantize_variant(bits, dtype, standardize, index64, row_channels, even, "none")
    # The activation epilogue (GELU, SiLU): plain packings, whole groups; quick mode at 4 bits, bf16.
    for bits, dtype, activation in itertools.product(bits_choices, FLOATS, ACTIVATIONS):
        if bits == 1 or (quick and (bits != 4 or dtype != "bf16")):
            continue
        yield dequantize_variant(bits, dtype, False, False, False, True, activation)
    for name, kernel in (("pack bool", _pack_bool_kernel), ("unpack bool", _unpack_bool_kernel)):
        signature = {"src_ptr": "*u8", "dst_ptr": "*u8", "n_elements": "i64", "BLOCK_BYTES": "constexpr"}
        yield name, kernel, signature, {"BLOCK_BYTES": 1024}
    yield from pool_index_variants(quick)


def dequantize_variant(bits: int, dtype: str, standardize: bool, index64: bool, row_channels: bool, even: bool,
                       activation: str):
    """(name, kernel, signature, constants) of one _dequantize_kernel variant."""
    signature = {"payload_ptr": "*u8", "meta_ptr": "*fp32", "out_ptr": f"*{dtype}", "activated_ptr": f"*{dtype}",
                 "n_elements": "i64", "n_groups": "i32", **channel_args(index64), "BITS": "constexpr",
                 "GROUP": "constexpr", "ROWS": "constexpr", "STANDARDIZE": "constexpr", "INDEX64": "constexpr", "ROW_CHANNELS": "constexpr",
                 "HARDWARE_CAST": "constexpr", "EVEN": "constexpr", "ACTIVATION": "constexpr"}
    constants = {"BITS": bits, "GROUP": 256, "ROWS": 16, "STANDARDIZE": standardize, "INDEX64": index64,
                 "ROW_CHANNELS": row_channels, "HARDWARE_CAST": True, "EVEN": even, "ACTIVATION": activation}
    name = (f"dequantize {bits}bit {dtype} standardize={standardize}{' index64' if index64 else ''}"
            f"{' row_channels' if row_channels else ''} even={even}"
            f"{'' if activation == 'none' else ' activation=' + activation}")
    return name, _dequantize_kernel, signature, constants


# Max-pooling windows as the pool-index launchers pass them, padded to 3 dimensions with 1-position
# windows: (kernel, stride, padding, dilation) per dimension, spatial dimensions, bits per code. The
# first is ResNet's stem pool.
POOL_WINDOWS = {
    "2d-k3-s2-p1": ((1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1), 2, 4),
    "1d-k3-s2-p1-d2": ((1, 1, 3), (1, 1, 2), (0, 0, 1), (1, 1, 2), 1, 2),
    "3d-k2": ((2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), 3, 4),
    "2d-k2": ((1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1), 2, 4),
    "2d-k1x2-s1": ((1, 1, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1), 2, 2),
}


def pool_index_variants(quick: bool):
    """The pool-index encode and decode kernels, per window of POOL_WINDOWS."""
    plane = {"n_elements": "i32", "in_size1": "i32", "in_size2": "i32"}
    output = {}
    for d in range(3):
        output.update({f"out_stride_divisor{d}": "i64", f"out_size_divisor{d}": "i64", f"out_size{d}": "i32"})
    for window_name, (kernel_size, stride, padding, dilation, spatial, bits) in POOL_WINDOWS.items():
        if quick and window_name not in ("2d-k3-s2-p1", "1d-k3-s2-p1-d2"):
            continue
        constants = {f"{name}{d}": values[d] for name, values in zip("KSPD", (kernel_size, stride, padding, dilation))
                     for d in range(3)}
        constants.update(SPATIAL=spatial, BITS=bits, BLOCK_BYTES=BLOCK_ELEMENTS // (8 // bits))
        geometry = dict.fromkeys(constants, "constexpr")  # (runtime arguments first, as declared)
        encode = {"indices_ptr": "*i64", "codes_ptr": "*u8", **plane, "in_divisor1": "i64", "in_divisor2": "i64",
                  **output, **geometry}
        decode = {"codes_ptr": "*u8", "out_ptr": "*i64", **plane, **output, **geometry}
        yield f"encode pool indices {window_name} {bits}bit", _encode_kernel, encode, constants
        yield f"decode pool indices {window_name} {bits}bit", _decode_kernel, decode, constants


def aligned(signature: dict) -> dict:
    """The specialization Triton gives pointers that are 16-byte aligned and an n_elements that is a
    multiple of 16, as tensors of whole groups have them: the one whose layout is checked below."""
    runtime = [name for name, kind in signature.items() if kind != "constexpr"]
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(runtime)
            if signature[name].startswith("*") or name in ("n_elements", "run_stride")}


TTGIR_TYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def split_axis_threads(compiled, dtype: str) -> int:
    """Threads of a warp that _quantize_kernel's input load (of ``dtype`` elements) spreads over its
    tile's SPLIT axis.

    1 means each thread holds all SPLIT vectors of its row, as the kernel intends; more means a
    row is shared by a whole warp (``quantize.split_axis_first``). (Standardized variants also load
    their channel statistics over the tile, as 64-bit words: not the load checked here.)
    """
    lines = compiled.asm["ttgir"].splitlines()
    pointer = f"x!tt.ptr<{TTGIR_TYPES[dtype]}>"
    load = next(line for line in lines if "tt.load" in line and pointer in line and line.count("x") >= 3)
    encoding = load.rsplit(", #", 1)[1].split(">", 1)[0]
    definition = next(line for line in lines if line.startswith(f"#{encoding} ="))
    threads = [int(n) for n in definition.split("threadsPerWarp = [", 1)[1].split("]", 1)[0].split(",")]
    return threads[0 if SPLIT_FIRST else 1]


# Conversions between float and integer, and float roundings: 16 per clock per SM on sm_90.
CONVERSIONS = ("F2I", "I2F", "FRND", "I2FP", "F2IP")
MAX_QUANTIZE_CONVERSIONS = 0.1  # per element, for quantize without the sigma scheme or standardization


def _bundled_tool(name: str) -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def _run_on_cubin(tool: str, args: list, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *args, f.name], capture_output=True, text=True, check=True).stdout


def main_path_opcodes(cubin: bytes) -> list[str] | None:
    """Opcodes (predicates and modifiers stripped) from the kernel's start to its last EXIT: the main
    path. Out-of-line slow paths, such as a correctly rounded division's, come after it. None without
    nvdisasm."""
    tool = _bundled_tool("nvdisasm")
    if tool is None:
        return None
    opcodes = []
    for line in _run_on_cubin(tool, ["-c"], cubin).splitlines():
        if line.strip().startswith("/*") and "*/" in line:
            text = line.split("*/", 1)[1].strip().rstrip(" ;")
            if len(text) > 1:
                opcodes.append(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0])
    last_exit = max(i for i, opcode in enumerate(opcodes) if opcode == "EXIT")
    return opcodes[:last_exit + 1]


def registers(cubin: bytes) -> int | None:
    tool = _bundled_tool("cuobjdump")
    if tool is None:
        return None
    match = re.search(r"REG:(\d+)", _run_on_cubin(tool, ["--dump-resource-usage"], cubin))
    return int(match.group(1)) if match else None


def elements_per_program(kernel, constants: dict) -> int:
    if kernel in (_encode_kernel, _decode_kernel):
        return constants["BLOCK_BYTES"] * (8 // constants["BITS"])
    return constants["GROUP"] * constants["ROWS"]


def count(kernel, constants: dict, cubin: bytes) -> tuple[str, bool]:
    """(what to print, whether it is acceptable) for a compiled quantize, dequantize or pool-index variant."""
    opcodes = main_path_opcodes(cubin)
    if opcodes is None:
        return "", True
    per_thread = elements_per_program(kernel, constants) / (32 * NUM_WARPS)  # elements each thread handles
    conversions = sum(opcode in CONVERSIONS for opcode in opcodes) / per_thread
    text = (f"; {len(opcodes) / per_thread:.1f} instructions and {conversions:.2f} conversions per element, "
            f"{registers(cubin)} registers")
    # A few conversions per row are fine (the floor that puts zero on a group's grid): under 0.1 per element.
    must_not_convert = (kernel is _quantize_kernel and not constants["SIGMA"] and not constants["STANDARDIZE"])
    return text, not (must_not_convert and conversions >= MAX_QUANTIZE_CONVERSIONS)


def main() -> int:
    quick = "--quick" in sys.argv
    failures = 0
    for name, kernel, signature, constants in variants(quick):
        for target_name, target in TARGETS.items():
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constants, aligned(signature)), target=target,
                                          options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})
                counts, counts_ok = "", True
                if target_name == "sm90" and kernel in (_quantize_kernel, _dequantize_kernel, _encode_kernel,
                                                        _decode_kernel):
                    counts, counts_ok = count(kernel, constants, compiled.asm["cubin"])
                status = f"ok ({len(compiled.asm['cubin'])} bytes of cubin{counts})"
                dtype = signature["x_ptr"][1:] if kernel is _quantize_kernel else None
                if kernel is _quantize_kernel and constants["SPLIT"] > 1 and split_axis_threads(compiled, dtype) != 1:
                    failures += 1
                    status = (f"FAILED: the input load spreads {split_axis_threads(compiled, dtype)} threads over a "
                              "row's chunks: quantize.split_axis_first is wrong for this Triton")
                elif not counts_ok:
                    failures += 1
                    status = f"FAILED: float-integer conversions on the main path{counts}"
            except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
                failures += 1
                status = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            print(f"{name} [{target_name}]: {status} {time.perf_counter() - start:.1f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
