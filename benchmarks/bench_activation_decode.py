#!/usr/bin/env python
"""GELU and SiLU computed as their input is decoded, against a decode followed by torch's activation.

    python benchmarks/bench_activation_decode.py [--out DIR]     # CUDA; without it, the torch path on the CPU

With ``recompute_activations`` (the default), the backward of the layer after a GELU or SiLU restores
the activation's output from the packing of the activation's input, and the activation's own backward
restores that input right after: on the Triton backend one kernel writes both (kernels/dequantize.py,
``ACTIVATION``). Its count says it is bound by instructions for the GELUs (docs/kernels.md), so its
bytes alone do not say how fast it runs. This times, for GPT-2 small's MLP activations (3072 values a
token, bf16, packed at 4 bits) at 8192 and 32768 tokens (batches 8 and 32 of 1024 tokens):

    decode          the dequantize kernel alone
    decode + torch  the dequantize kernel, then torch's activation of its output (the unfused way)
    fused           the dequantize kernel writing the activation too

and a copy of the fused kernel's own bytes (codes and group metadata read, two bf16 tensors written).
On a CUDA device the times are medians of Triton's do_bench; without one, the torch path alone runs
(torch_dequantize, then torch's activation) on 256 tokens, timed with time.perf_counter and labelled as
CPU figures.

Writes activation_decode.md to --out, else $OUT, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tabulate import tabulate

from tritonquant.kernels import ACTIVATIONS, torch_activation, torch_dequantize, torch_quantize, triton_dequantize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from one_callable import copy_ms, cpu_ms, gpu_ms, write_result  # noqa: E402

HIDDEN, BITS, GROUP = 3072, 4, 256
GPU_TOKENS = (8192, 32768)
CPU_TOKENS = (256,)


def fused_nbytes(n: int) -> int:
    """Bytes the fused kernel must move for n bf16 elements: codes and (base, step) per group read, the
    decoded tensor and its activation written."""
    return n * BITS // 8 + -(-n // GROUP) * 8 + 2 * n * 2


def rows_for(tokens: int, device: torch.device, on_gpu: bool) -> list[list[str]]:
    n = tokens * HIDDEN
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    payload, meta = torch_quantize(x, BITS, GROUP, False, False, 0, 0)
    out, activated = torch.empty_like(x), torch.empty_like(x)
    moved = fused_nbytes(n)
    copy = copy_ms(moved, device, gpu_ms) if on_gpu else None
    rows = []
    for activation in ACTIVATIONS:
        row = [activation, tokens, f"{n / 1e6:.1f}"]
        if not on_gpu:
            def unfused_reference() -> None:
                torch_dequantize(payload, meta, out, BITS, GROUP)
                torch_activation(out, activation)

            rows.append(row + [f"{cpu_ms(unfused_reference):.3f}"])
            continue

        def decode() -> None:
            triton_dequantize(payload, meta, out, BITS, GROUP)

        def decode_then_torch() -> None:
            triton_dequantize(payload, meta, out, BITS, GROUP)
            torch_activation(out, activation)

        def fused() -> None:
            triton_dequantize(payload, meta, out, BITS, GROUP, activation=activation, activated=activated)

        decode_ms, unfused_ms, fused_ms = gpu_ms(decode), gpu_ms(decode_then_torch), gpu_ms(fused)
        rows.append(row + [f"{decode_ms:.3f}", f"{unfused_ms:.3f}", f"{fused_ms:.3f}", f"{unfused_ms / fused_ms:.2f}x",
                           f"{moved / (fused_ms * 1e6):.0f}", f"{copy:.3f}", f"{copy / fused_ms:.0%}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    headers = ["activation", "tokens", "M elements"]
    if on_gpu:
        headers += ["decode ms", "decode + torch ms", "fused ms", "fused speed-up", "fused GB/s",
                    "copy ms, same bytes", "fused vs copy"]
    else:
        headers += ["torch_dequantize + torch ms"]
    rows = [row for tokens in (GPU_TOKENS if on_gpu else CPU_TOKENS) for row in rows_for(tokens, device, on_gpu)]
    where = torch.cuda.get_device_name() if on_gpu else "CPU (the torch path only; no GPU figures)"
    text = (f"# GELU and SiLU computed as their input is decoded: {where}\n\ntorch {torch.__version__}; "
            f"[tokens, {HIDDEN}] bf16 at {BITS} bits; GB/s: the fused kernel's bytes (codes and metadata read, "
            f"two bf16 tensors written) over its time\n\n"
            + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n")
    print(text)
    write_result(text, "activation_decode.md", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
