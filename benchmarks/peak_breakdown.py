#!/usr/bin/env python
"""Where a training step peaks, and what is allocated then: on the CPU, with allocations as on a GPU.

    python benchmarks/peak_breakdown.py                       # GPT-2 small's shape, batch 1
    python benchmarks/peak_breakdown.py --layers 12 --batch 8  # the GPU bench's batch (about 10 GB of RAM)
    python benchmarks/peak_breakdown.py --cuda-autocast-loss   # the loss saving what it saves on a GPU

Why: the peak of a step decides the batch that fits, and a GPU is rarely at hand. Here the built-in
transformer (GPT-2 small's shape by default: 50,257-word vocabulary, tied head, bf16 autocast) runs one
step per method on the CPU. Triton's driver is replaced by the stand-in (benchmarks/stand_in_driver.py),
so compress() packs through the Triton launchers: each packed tensor allocates exactly what the kernels
allocate on a GPU (its payload and metadata; a restore, its output) and no kernel runs. The values
restored are garbage; the allocations are the GPU's. torch's profiler records every allocation
(``tritonquant.bench.allocation_events``, which ``cpu_peak_bytes`` reads too).

For each method (exact, checkpoint around every block, compress at 4 and 2 bits, and both: every block
checkpointed, what is still saved compressed at 4 bits) it prints the peak
above what was allocated when the step began (parameters are not counted), the op that allocated at
that moment, what was allocated at the end of the forward pass, and what was live at the peak, summed by
the op that allocated it. What differs from a GPU: CPU attention and autocast's CPU op lists; the
parameters (about 500 MB for GPT-2 small), which a GPU's figure includes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITONQUANT_AUTOTUNE"] = "0"  # no tuning: there is nothing to time kernels on

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stand_in_driver  # noqa: E402

stand_in_driver.install_for_cpu_tensors()  # the launchers allocate as on a GPU; no kernel runs

import tritonquant as tq  # noqa: E402
from tritonquant.bench import allocation_events, checkpointed_blocks  # noqa: E402
from tritonquant.models import TinyTransformer, lm_batch, lm_loss, lm_loss_as_cuda_autocast_runs_it  # noqa: E402

MB = 2**20
BACKWARD_MARK = "peak_breakdown: backward"
METHODS = ("exact", "checkpoint", "tq-4bit", "tq-2bit", "checkpoint+tq-4bit")


def backward_start(prof) -> int:
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.name == BACKWARD_MARK:
            return event.start_time_ns
        pending.extend(event.children)
    raise RuntimeError("the backward pass was not recorded")


def breakdown(prof) -> dict:
    """Peak, the op at the peak, allocated at the end of forward, and what was live at the peak."""
    events = allocation_events(prof)
    first = events[0][1]
    base = first.total_allocated - first.alloc_size
    backward_at = backward_start(prof)
    live, peak, at_peak, after_forward = {}, -1, None, None
    for when, fields, op in events:
        if after_forward is None and when >= backward_at:
            after_forward = fields.total_allocated - fields.alloc_size - base
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, op)
        else:
            live.pop(fields.ptr, None)
        if fields.total_allocated - base > peak:
            peak, at_peak = fields.total_allocated - base, (op, "forward" if when < backward_at else "backward")
            live_at_peak = dict(live)
    by_op: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for size, op in live_at_peak.values():
        by_op[op] += size
        counts[op] += 1
    return {"peak": peak, "op": at_peak[0], "pass": at_peak[1], "after_forward": after_forward,
            "live": [(op, counts[op], size) for op, size in by_op.most_common()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--top", type=int, default=5, help="ops listed per method (5)")
    parser.add_argument("--cuda-autocast-loss", action="store_true",
                        help="the loss as CUDA autocast runs it: bf16 log-probabilities and a float32 copy for "
                             "nll_loss (CPU autocast runs the whole cross-entropy in float32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyTransformer(vocab=args.vocab, dim=768, heads=12, layers=args.layers, seq=args.seq, dropout=0.0,
                            tied=True)
    batch = lm_batch(args.batch, seq=args.seq, vocab=args.vocab)
    loss_fn = lm_loss_as_cuda_autocast_runs_it if args.cuda_autocast_loss else lm_loss
    loss_note = " (the loss as CUDA autocast runs it)" if args.cuda_autocast_loss else ""
    print(f"transformer: {args.layers} layers, dim 768, vocabulary {args.vocab}, tied head; batch {args.batch} x "
          f"{args.seq}; bf16 autocast on the CPU{loss_note}; launches not run. MB above the step's start.\n")
    summary, details = [], []
    for method in METHODS:
        bits = int(method.split("tq-")[1][0]) if "tq-" in method else None
        session = (lambda: tq.compress(bits=bits, backend="triton")) if bits else contextlib.nullcontext
        model_change = checkpointed_blocks(model) if method.startswith("checkpoint") else contextlib.nullcontext()
        model.zero_grad(set_to_none=True)
        with model_change, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with session(), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, batch)
            with record_function(BACKWARD_MARK):
                loss.backward()
        del loss
        found = breakdown(prof)
        summary.append([method, f"{found['peak'] / MB:.0f}", f"{found['after_forward'] / MB:.0f}",
                        f"{found['pass']}, {found['op']}"])
        for op, count, size in found["live"][:args.top]:
            details.append([method, op, count, f"{size / MB:.1f}"])
        print(f"[{method} done]", file=sys.stderr, flush=True)
    print(tabulate(summary, headers=["method", "peak MB", "after forward MB", "peak in"], tablefmt="github",
                   disable_numparse=True))
    print("\nLive at the peak, by the op that allocated it:\n")
    print(tabulate(details, headers=["method", "allocated by", "tensors", "MB"], tablefmt="github",
                   disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
