#!/usr/bin/env python
"""The torch backend on the CPU: time and peak memory, in chunks (as shipped) and in one piece.

    python benchmarks/bench_torch_backend.py [--elements N] [--repeats K]

On the CPU, ``compress`` packs with the torch references (``backend="auto"``), which work through a
tensor a chunk of groups at a time (kernels/quantize.py, ``torch_chunk_elements``). This prints, side by
side in one run, with chunking as shipped and with every tensor taken in one piece:

  1. quantize and dequantize of one N-element tensor (default 16M): median milliseconds, and the most
     memory the call had allocated at once beyond its input and output, in bytes per element;
  2. the step peak (CPU allocator, above what was allocated when the step began) of the quick
     benchmark's two models, exact and under compress at 4 and 2 bits, as a ratio to exact.

Memory comes from the allocations torch's profiler records (``tritonquant.bench.cpu_peak_bytes``).
Times are this machine's: compare the columns with each other.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from tabulate import tabulate

import tritonquant as tq
from tritonquant.bench import cpu_peak_bytes
from tritonquant.kernels import quantize as quantize_module
from tritonquant.kernels import payload_nbytes, torch_dequantize, torch_quantize
from tritonquant.models import SmallCNN, TinyTransformer, cnn_batch, cnn_loss, lm_batch, lm_loss

GROUP = 256


@contextlib.contextmanager
def one_piece():
    """Chunking off: every tensor is taken whole."""
    saved = quantize_module.TORCH_CHUNK_ELEMENTS, quantize_module.TORCH_CHUNK_MIN_ELEMENTS
    quantize_module.TORCH_CHUNK_ELEMENTS = quantize_module.TORCH_CHUNK_MIN_ELEMENTS = 2**62
    try:
        yield
    finally:
        quantize_module.TORCH_CHUNK_ELEMENTS, quantize_module.TORCH_CHUNK_MIN_ELEMENTS = saved


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def codec_rows(n: int, repeats: int) -> list[list[str]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, generator=g).to(dtype)
        out = torch.empty_like(x)
        for bits in (2, 4, 8):
            for stochastic in (False, True):
                row = [str(dtype).removeprefix("torch."), bits, "stochastic" if stochastic else "nearest"]
                outputs = payload_nbytes(n, bits, GROUP) + (n // GROUP) * 8
                for mode in (contextlib.nullcontext, one_piece):
                    with mode():
                        def pack():
                            return torch_quantize(x, bits, GROUP, False, stochastic, 1, 0)

                        payload, meta = pack()

                        def restore():
                            torch_dequantize(payload, meta, out, bits, GROUP)

                        pack_ms, restore_ms = median_ms(pack, repeats), median_ms(restore, repeats)
                        pack_peak, restore_peak = cpu_peak_bytes(pack), cpu_peak_bytes(restore)
                    row += [f"{pack_ms:.0f}", "n/a" if pack_peak is None else f"{(pack_peak - outputs) / n:.1f}",
                            f"{restore_ms:.0f}", "n/a" if restore_peak is None else f"{restore_peak / n:.1f}"]
                rows.append(row)
    return rows


def step_rows(repeats: int) -> list[list[str]]:
    workloads = [
        ("small cnn fp32 32px, batch 16", SmallCNN(width=16, blocks=2), cnn_batch(16, size=32), cnn_loss),
        ("tiny transformer fp32 seq64, batch 8", TinyTransformer(dim=64, layers=2, seq=64), lm_batch(8, seq=64),
         lm_loss),
    ]
    rows = []
    for name, model, batch, loss_fn in workloads:
        def step(bits: int) -> None:
            with tq.compress(bits=bits) if bits else contextlib.nullcontext():
                loss = loss_fn(model, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)

        row = [name]
        for mode in (contextlib.nullcontext, one_piece):
            with mode():
                step(4)  # warm-up
                exact_peak, exact_ms = cpu_peak_bytes(lambda: step(0)), median_ms(lambda: step(0), repeats)
                for bits in (4, 2):
                    peak = cpu_peak_bytes(lambda: step(bits))
                    ms = median_ms(lambda: step(bits), repeats)
                    ratio = "n/a" if peak is None or not exact_peak else f"{peak / exact_peak:.2f}"
                    row += [ratio, f"{ms / exact_ms:.2f}"]
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=16 * 2**20, help="elements of the codec's tensor (16M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per median (5)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; chunks: an eighth of a tensor, "
          f"{quantize_module.TORCH_CHUNK_MIN_ELEMENTS}..{quantize_module.TORCH_CHUNK_ELEMENTS} elements\n")
    print(f"1. One tensor of {args.elements} elements, groups of {GROUP}: ms, and bytes per element allocated "
          "beyond input and output (quantize) or beyond input (dequantize, into a given output)\n")
    headers = ["dtype", "bits", "rounding", "quantize ms", "B/elt", "dequantize ms", "B/elt",
               "one piece: quantize ms", "B/elt", "dequantize ms", "B/elt"]
    print(tabulate(codec_rows(args.elements, args.repeats), headers=headers, tablefmt="github", disable_numparse=True))
    print("\n2. Training step on the CPU: step peak and step time as ratios to exact training\n")
    headers = ["workload", "4 bits: peak", "time", "2 bits: peak", "time",
               "one piece, 4 bits: peak", "time", "2 bits: peak", "time"]
    print(tabulate(step_rows(args.repeats), headers=headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
