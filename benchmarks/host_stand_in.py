#!/usr/bin/env python
"""The host's share of compress() without a GPU: Triton kernels compiled for sm_90, launches not run.

    python benchmarks/host_stand_in.py [--repeats N]      # exits 2 if this Triton's driver API differs

Why: step time under compress() was lost on the host, per saved tensor (docs/benchmarks.md), and a GPU
is rarely at hand. Here Triton's active driver is replaced by a stand-in that targets sm_90: kernels
are compiled for real (frontend, optimizer, the bundled ptxas) and every launch returns at once. So
everything a GPU host does in Python is timed: the hooks, the policy, the codec, the launchers,
Triton's dispatch or the direct path, allocations (of CPU memory here). Only the C launcher and the
CUDA calls under it are left out. Figures describe this machine's Python, not a GPU host; compare
them with each other, run by run.

Prints:
  0. host microseconds of one quantize launch, through Triton's dispatch and through the direct path
     (benchmarks/profile_host.py's launch_costs, which the GPU suite's host stage runs too);
  1. host microseconds per saved tensor, pack and unpack: a chain of tanh on a 64K-element bf16 tensor
     under compress(bits=4), minus the same chain without it (profile_host.py's chain_us_per_tensor),
     with direct launches and with Triton's dispatch;
  2. the same hooks timed from inside, with the CPU's caches warm and with 1 or 32 MiB of host memory
     copied between saved tensors (profile_host.py's evicted_cache_rows): in a real step other code
     runs between two hooks;
  3. one ResNet-50 step (bf16 autocast, batch 1, 64 px, so the model's own CPU work stays small) under
     compress(bits=4): the extra forward and backward milliseconds, and the pack and unpack hooks' time per kind
     of saved tensor (packed, reused, kept, weight cast made again in backward, pooling indices).
     min_bytes is set so that what is packed is what a 224 px batch-64 step packs: activations yes,
     per-channel statistics no.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITONQUANT_AUTOTUNE"] = "0"  # no tuning: there is nothing to time kernels on

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stand_in_driver  # noqa: E402

stand_in_driver.install_for_cpu_tensors()  # the compiled kernels' launches are what is timed

import tritonquant as tq  # noqa: E402
from tritonquant import codec  # noqa: E402
from tritonquant.models import ResNet50Like, cnn_batch, cnn_loss  # noqa: E402

from profile_host import (EVICT_HEADERS, HOOK_HEADERS, HookTimer, chain_us_per_tensor, evicted_cache_rows,  # noqa: E402
                          launch_costs, launch_mode)

MIN_BYTES = 12_000  # between the largest per-channel statistics (8 KB) and the smallest activation (16 KB)


def launch_rows() -> list[list[str]]:
    """One quantize launch (64K bf16 elements, 4 bits), through Triton's dispatch and directly."""
    x = torch.randn(1 << 16, dtype=torch.bfloat16)
    payload, meta = codec.kernels.triton_quantize(x, 4, 256, False, False, 0, 0)
    return [[name, f"{us:.1f}"] for name, us in launch_costs(x, payload, meta, torch.device("cpu"))]


def per_tensor_rows(repeats: int) -> list[list[str]]:
    rows = []
    for mode, direct in (("direct launches", True), ("Triton's dispatch", False)):
        with launch_mode(direct):
            figures = [chain_us_per_tensor(torch.device("cpu"), "triton") for _ in range(repeats)]
        rows.append([f"tanh chain, {mode}", f"{statistics.median(f[0] for f in figures):.1f}",
                     f"{statistics.median(f[1] for f in figures):.1f}"])
    return rows


def resnet_step(repeats: int) -> tuple[list[list[str]], list[list[str]]]:
    torch.manual_seed(0)
    model = ResNet50Like()
    batch = cnn_batch(1, size=64, classes=1000)
    timer = HookTimer()

    def step(compressed: bool) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        session = tq.compress(bits=4, backend="triton", min_bytes=MIN_BYTES) if compressed else None
        started = time.perf_counter()
        with timer.timing(session) if session is not None else contextlib.nullcontext():
            with session or contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = cnn_loss(model, batch)
            middle = time.perf_counter()
            loss.backward()
        return middle - started, time.perf_counter() - middle

    for compressed in (False, True, False, True):  # warm-up: compile, allocate
        step(compressed)
    timer = HookTimer()
    extra_forward, extra_backward = [], []
    for _ in range(repeats):
        exact = [step(False) for _ in range(5)]
        compressed = [step(True) for _ in range(5)]
        extra_forward.append(statistics.median(c[0] for c in compressed) - statistics.median(e[0] for e in exact))
        extra_backward.append(statistics.median(c[1] for c in compressed) - statistics.median(e[1] for e in exact))
    forward_ms = statistics.median(extra_forward) * 1e3
    kind_rows = timer.rows()
    pack_ms, unpack_ms = timer.total_ms("pack"), timer.total_ms("unpack")
    step_rows = [["extra forward", f"{forward_ms:.2f}"],
                 ["extra forward: in the pack hook", f"{pack_ms:.2f}"],
                 ["extra forward: the rest (module hooks, session set-up, this timing)", f"{forward_ms - pack_ms:.2f}"],
                 ["extra backward", f"{statistics.median(extra_backward) * 1e3:.2f}"],
                 ["extra backward: in the unpack hook", f"{unpack_ms:.2f}"]]
    return step_rows, kind_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many rounds (default 3)")
    repeats = parser.parse_args().repeats
    torch.set_num_threads(1)
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}; "
          "kernels compiled for sm_90, launches not run\n")
    print(tabulate(launch_rows(), headers=["host us per call", "us"], tablefmt="github", disable_numparse=True))
    print()
    print(tabulate(per_tensor_rows(repeats), headers=["host us per saved tensor", "pack", "unpack"],
                   tablefmt="github", disable_numparse=True))
    print()
    print(tabulate(evicted_cache_rows(torch.device("cpu"), "triton"), headers=EVICT_HEADERS, tablefmt="github",
                   disable_numparse=True))
    step_rows, kind_rows = resnet_step(repeats)
    print("\nResNet-50 step, bf16 autocast, batch 1, 64 px, compress(bits=4), minus the exact step:\n")
    print(tabulate(step_rows, headers=["", "ms"], tablefmt="github", disable_numparse=True))
    print()
    print(tabulate(kind_rows, headers=HOOK_HEADERS, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
