"""Launch settings shared by every kernel: numerics options and the untuned tile-size heuristic.

All kernels run with ``enable_fp_fusion=False`` so that ``a * b + c`` is rounded twice, as the torch
reference computes it; with fusion on, the compiler may emit FMAs and the backends would differ in the
last bit. The quantize/dequantize launchers get their tile from ``kernels/autotune.py``, which times
candidates per GPU and falls back to ``default_group_tile`` when tuning is off or not worth it.
"""

import os

import triton

BOOL_BLOCK_BYTES = 1024
# Elements one program handles on a GPU, before tuning; the interpreter prefers fewer, larger tiles.
GPU_TILE_ELEMENTS = 4096
INTERPRETER_TILE_ELEMENTS = 1 << 16


def is_interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_options() -> dict:
    return {"enable_fp_fusion": False}


def default_group_tile(n_groups: int, group_size: int, interpreted: bool | None = None) -> tuple[int, int]:
    """(groups per program, num_warps) for the quantize/dequantize kernels, before any tuning.

    ``interpreted`` picks the interpreter's large tile or the GPU tile; None reads TRITON_INTERPRET.
    """
    if interpreted is None:
        interpreted = is_interpreted()
    if interpreted:
        # The interpreter pays per element of a tile, masked or not: shrink tiles to small tensors.
        rows = max(1, INTERPRETER_TILE_ELEMENTS // group_size)
        rows = min(rows, triton.next_power_of_2(max(n_groups, 1)))
    else:
        # On a GPU masked lanes of a small tensor's tile cost nothing measurable, while every distinct
        # ROWS is another compiled specialization: keep the tile fixed per group size.
        rows = max(1, GPU_TILE_ELEMENTS // group_size)
    num_warps = 4 if rows * group_size <= 4096 else 8
    return rows, num_warps
