"""GPU memory and step time of offload="cpu" against torch.autograd.graph.save_on_cpu.

    python benchmarks/bench_offload.py                 # needs a CUDA device
    python benchmarks/bench_offload.py --layers 12 --batch 8 --seq 1024

Configurations, one training step each on the built-in transformer (bf16 autocast):
    exact                  nothing saved differently
    save_on_cpu            torch.autograd.graph.save_on_cpu(pin_memory=True): raw tensors to the host
    tq-4bit                compress(bits=4): packed tensors stay on the GPU
    tq-4bit offload        compress(bits=4, offload="cpu"): packed tensors to pinned host memory

Reported, each also as a ratio to "exact" from the same run:
    held MB   GPU memory still allocated after the forward pass, minus what was allocated before it:
              the activations the device keeps until backward
    peak MB   torch.cuda.max_memory_allocated over forward and backward
    step ms   median over --steps steps (CUDA events), forward plus backward
On a machine without CUDA the script says so and exits: offloading moves nothing there.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import torch
from tabulate import tabulate

import tritonquant as tq
from tritonquant.models import TinyTransformer, lm_batch, lm_loss

MB = 2**20


def contexts() -> dict:
    return {
        "exact": contextlib.nullcontext,
        "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu(pin_memory=True),
        "tq-4bit": lambda: tq.compress(bits=4),
        "tq-4bit offload": lambda: tq.compress(bits=4, offload="cpu"),
    }


def measure(model: torch.nn.Module, batch, make_ctx, steps: int) -> dict:
    """Held-after-forward and peak GPU bytes (first step after a warm-up) and median step time."""
    times, held, peak = [], 0, 0
    for step in range(steps + 1):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with make_ctx(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model, batch)
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # lets the allocator release payloads whose copies have finished
            held = torch.cuda.memory_allocated() - before
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        if step == 1:
            peak = torch.cuda.max_memory_allocated() - before
        if step >= 1:
            times.append(start.elapsed_time(end))
    # Step 1's timing includes the synchronisation used to read "held"; the median absorbs it.
    return {"held": held, "peak": peak, "time": statistics.median(times)}


def held_ratio(exact_bytes: int, held_bytes: int) -> str:
    """How many times less the configuration holds than exact; "all moved" when it holds under 1 MB."""
    if held_bytes < MB:
        return "all moved"
    return f"{exact_bytes / held_bytes:.1f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_offload: needs a CUDA device (offload='cpu' moves nothing for CPU tensors); skipped.")
        return 0

    device = torch.device("cuda")
    torch.manual_seed(0)
    vocab = 32768
    model = TinyTransformer(vocab=vocab, dim=args.dim, heads=args.dim // 64, layers=args.layers, seq=args.seq,
                            dropout=0.0).to(device)
    batch = lm_batch(args.batch, seq=args.seq, vocab=vocab, device=device)

    print(f"transformer layers={args.layers} dim={args.dim} seq={args.seq} batch={args.batch} bf16; "
          f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    results, rows = {}, []
    for name, make_ctx in contexts().items():
        try:
            results[name] = r = measure(model, batch, make_ctx, args.steps)
        except Exception as exc:  # noqa: BLE001 - one configuration's failure is a row, not the end of the table
            rows.append([name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"] + [""] * 5)
            print(f"{name}: failed", flush=True)
            torch.cuda.empty_cache()
            continue
        exact = results.get("exact")
        rows.append([
            name,
            f"{r['held'] / MB:.0f}", held_ratio(exact["held"], r["held"]) if exact else "n/a",
            f"{r['peak'] / MB:.0f}", f"{exact['peak'] / r['peak']:.2f}x" if exact else "n/a",
            f"{r['time']:.1f}", f"{r['time'] / exact['time']:.2f}" if exact else "n/a",
        ])
        print(f"{name}: held {r['held'] / MB:.0f} MB, peak {r['peak'] / MB:.0f} MB, {r['time']:.1f} ms", flush=True)
    print(tabulate(rows, headers=["config", "held MB", "held smaller by", "peak MB", "peak smaller by",
                                  "step ms", "time vs exact"], tablefmt="github"))
    return 1 if len(results) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
