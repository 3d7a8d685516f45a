#!/usr/bin/env python
"""Max-pooling indices as window positions: the Triton kernels against their torch references.

    python benchmarks/bench_pool_indices.py [--out DIR]     # CUDA; without it, the references on the CPU

ResNet-50's stem pool (3x3, stride 2, padding 1, on 112 x 112 planes of 64 channels) saves one int64
index per output element: 51 million of them at batch 256. The pack hook encodes them into 4-bit window
positions and the unpack hook decodes them (kernels/pool_indices.py). This times both, per batch size,
for the Triton kernels and for the torch references they replaced (about 20 elementwise ops each way),
and a copy of the kernel's own bytes. GB/s counts the bytes the kernel must move: 8 per index plus the
codes. On a CUDA device the times are medians of Triton's do_bench; without one, the references alone
run on small batches, timed with time.perf_counter and labelled as CPU figures.

Writes pool_indices.md to --out, else $OUT, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from tabulate import tabulate

from tritonquant.kernels.bitpack import packed_codes_nbytes
from tritonquant.kernels.pool_indices import (PoolWindows, torch_decode_pool_indices, torch_encode_pool_indices,
                                              triton_decode_pool_indices, triton_encode_pool_indices)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from one_callable import copy_ms, cpu_ms, gpu_ms, write_result  # noqa: E402

STEM = dict(kernel_size=3, stride=2, padding=1)
STEM_WINDOWS = PoolWindows((112, 112), (3, 3), (2, 2), (1, 1), (1, 1))
GPU_BATCHES = (64, 256)
CPU_BATCHES = (1, 2)


def stem_indices(batch: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, 64, 112, 112, device=device, dtype=torch.bfloat16)
    return F.max_pool2d(x, **STEM, return_indices=True)[1]


def rows_for(batch: int, device: torch.device, on_gpu: bool) -> list[list[str]]:
    indices = stem_indices(batch, device)
    codes = torch_encode_pool_indices(indices, STEM_WINDOWS)
    out = torch.empty_like(indices)
    moved = indices.numel() * 8 + packed_codes_nbytes(indices.numel(), STEM_WINDOWS.bits)
    timer = gpu_ms if on_gpu else cpu_ms
    impls = {
        "encode": {"torch": lambda: torch_encode_pool_indices(indices, STEM_WINDOWS),
                   "triton": lambda: triton_encode_pool_indices(indices, STEM_WINDOWS)},
        "decode": {"torch": lambda: torch_decode_pool_indices(codes, STEM_WINDOWS, out),
                   "triton": lambda: triton_decode_pool_indices(codes, STEM_WINDOWS, out)},
    }
    copy = copy_ms(moved, device, gpu_ms) if on_gpu else None
    rows = []
    for kind, fns in impls.items():
        torch_ms = timer(fns["torch"])
        row = [kind, batch, f"{indices.numel() / 1e6:.1f}", f"{torch_ms:.3f}", f"{moved / (torch_ms * 1e6):.3g}"]
        if on_gpu:
            triton_ms = timer(fns["triton"])
            row += [f"{triton_ms:.3f}", f"{moved / (triton_ms * 1e6):.3g}", f"{torch_ms / triton_ms:.1f}x",
                    f"{copy:.3f}", f"{copy / triton_ms:.0%}"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    headers = ["", "batch", "M indices", "torch ms", "torch GB/s"]
    if on_gpu:
        headers += ["triton ms", "triton GB/s", "speed-up", "copy ms, same bytes", "triton vs copy"]
    rows = [row for batch in (GPU_BATCHES if on_gpu else CPU_BATCHES) for row in rows_for(batch, device, on_gpu)]
    where = torch.cuda.get_device_name() if on_gpu else "CPU (torch references only; no GPU figures)"
    text = (f"# Max-pooling indices, ResNet-50 stem pool: {where}\n\ntorch {torch.__version__}; GB/s: the kernel's "
            f"bytes (int64 indices and 4-bit codes) over the time\n\n"
            + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n")
    print(text)
    write_result(text, "pool_indices.md", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
