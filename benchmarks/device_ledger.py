#!/usr/bin/env python
"""The device work compress() adds to a training step, counted on the CPU: launches and bytes.

    python benchmarks/device_ledger.py [--workload resnet50|gpt2-small] [--bits B] [--project 64,256]
                                       # exits 2 if this Triton's driver API differs
    python benchmarks/device_ledger.py --workload gpt2-small --size 128 --project 64,256
                                       # the bench's GPT-2 batches 8 and 32 in tokens (gpt2_small),
                                       # minutes instead of hours on a CPU

Why: captured in a CUDA graph, a compressed step runs no Python, and what it costs over exact training
is the device work its hooks add (docs/benchmarks.md). That work can be counted without a GPU. Triton's
driver is replaced by the stand-in (benchmarks/stand_in_driver.py): the launchers run their host code,
kernels are compiled for sm_90, nothing is launched. Every call of a codec kernel (Triton backend) is
recorded, and so is every op that reaches PyTorch's dispatcher inside the pack and unpack hooks (the
torch work the hooks do besides the kernels: weight casts made again, statistics, copies).

Bytes: a kernel call's tensor arguments and results, each counted once (read or written once); a torch
op's tensor inputs and outputs, an in-place output counted again (read, then written). Views and
allocations move nothing and are left out. The step runs at two batch sizes (``--batches``), and each
row's bytes are fitted as a + b * batch (weight casts do not grow with the batch; activations do), then
projected to the batch sizes of ``--project``. The last column divides the bytes by a bandwidth
(``--bandwidth``, default the H200's copy bandwidth measured on 2026-11-29): a floor for the time they
take, which leaves out every launch's fixed cost.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITONQUANT_AUTOTUNE"] = "0"  # nothing to time kernels on

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stand_in_driver  # noqa: E402

stand_in_driver.install_for_cpu_tensors()

import tritonquant as tq  # noqa: E402
from tritonquant import codec  # noqa: E402
from tritonquant.models import (ResNet50Like, TinyTransformer, cnn_batch, cnn_loss, lm_batch,  # noqa: E402
                                lm_loss_as_cuda_autocast_runs_it)
from tritonquant.session import Session  # noqa: E402

H200_COPY_GB_PER_S = 4119  # bench_kernels.py, 2026-11-29: copy_ of 256 MiB, read + write
MIB = 2**20


class FusedDropout(nn.Dropout):
    """nn.Dropout as a GPU runs it: ``native_dropout``, which saves a bool mask. On the CPU nn.Dropout
    multiplies by a scaled random tensor of the input's dtype and saves that instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, self.training)[0]


def gpt2_small() -> TinyTransformer:
    """The bench's GPT-2 small, saving what it saves on a GPU. The dropout inside attention is off: with
    it on, the CPU's attention takes SDPA's math path, which saves the attention probabilities, where a
    GPU's fused attention saves q, k, v, the output and its row statistics (and the random state of its
    dropout), as the CPU's fused attention does without dropout. The dropouts after attention and the
    MLP stay, as ``FusedDropout``. Every saved tensor then grows with batch * sequence: counting at
    sequence 128 and projecting to batches 64 and 256 gives the bench's batches 8 and 32 at sequence
    1024."""
    model = TinyTransformer(vocab=50257, dim=768, heads=12, layers=12, seq=1024, dropout=0.1, tied=True)
    for block in model.blocks:
        block.attn.dropout = 0.0
        block.drop = FusedDropout(block.drop.p)
    return model


# name: (model, batch of (batch size, image size or sequence length), loss, description); the bench's
# workloads (tritonquant/bench.py), under bf16 autocast as it runs them.
WORKLOADS = {
    "resnet50": (ResNet50Like, lambda b, size: cnn_batch(b, size=size, classes=1000), cnn_loss, "ResNet-50, {} px"),
    "gpt2-small": (gpt2_small, lambda b, seq: lm_batch(b, seq=seq, vocab=50257), lm_loss_as_cuda_autocast_runs_it,
                   "GPT-2 small (as on a GPU: gpt2_small), sequence {}"),
}
DEFAULT_SIZES = {"resnet50": 224, "gpt2-small": 1024}
KERNEL_TABLES = {  # the codec's dispatch tables, and what their Triton entries are called here
    "quantize": codec._QUANTIZE, "dequantize": codec._DEQUANTIZE, "pack bool": codec._PACK_BOOL,
    "unpack bool": codec._UNPACK_BOOL, "encode pool indices": codec._ENCODE_POOL,
    "decode pool indices": codec._DECODE_POOL,
}
# Ops that move no data: views, and allocations (the caching allocator's, on a GPU).
NO_DATA = {"view", "_unsafe_view", "expand", "t", "transpose", "permute", "as_strided", "slice", "select",
           "unsqueeze", "squeeze", "alias", "detach", "empty", "empty_strided", "empty_like", "reshape",
           "narrow", "split", "unbind", "_reshape_alias", "lift_fresh"}


def tensor_bytes(*trees) -> dict[int, int]:
    """{id: bytes} of the distinct tensors in ``trees``."""
    return {id(t): t.numel() * t.element_size() for t in tree_leaves(trees) if isinstance(t, torch.Tensor)}


class Ledger(TorchDispatchMode):
    """Counts, per row (``where``, name): calls and bytes moved."""

    def __init__(self) -> None:
        super().__init__()
        self.where: str | None = None  # "pack hook", "unpack hook", or None: the model's own work
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.where is not None and name not in NO_DATA:
            inputs = tensor_bytes(args, kwargs)
            outputs = tensor_bytes(out)
            moved = sum(inputs.values()) + sum(b for i, b in outputs.items() if i not in inputs or name.endswith("_"))
            self.record((f"torch, {self.where}", name), moved)
        return out

    def record(self, row: tuple[str, str], moved: int) -> None:
        self.calls[row] += 1
        self.bytes[row] += moved

    def inside(self, where: str, hook):
        def hooked(*args):
            outer, self.where = self.where, where
            try:
                return hook(*args)
            finally:
                self.where = outer
        return hooked


@contextlib.contextmanager
def kernel_calls_counted(ledger: Ledger):
    """Route the Triton entries of the codec's tables through ``ledger`` (their own ops unrecorded).

    The stand-in launches nothing, so restored tensors would hold whatever memory held. Pooling indices
    are set to 0 (``stand_in_driver.prepare_codec``); restored floats and bools are set to 0 here, as
    garbage floats (denormals, NaNs) slow the CPU's backward many times over."""
    originals = {name: table["triton"] for name, table in KERNEL_TABLES.items()}
    # The tensors the launcher writes: ``out``, and a dequantize's ``activated`` (codec._decode_stored).
    restored_arguments = {"dequantize": (2, 8), "unpack bool": (1,)}

    def counted(name, kernel, *args):
        with _disable_current_modes():
            out = kernel(*args)
            for index in restored_arguments.get(name, ()):
                if index < len(args) and isinstance(args[index], torch.Tensor):
                    args[index].zero_()
        if name == "dequantize" and len(args) > 7 and args[7] is not None:
            name = f"dequantize + {args[7]}"
        ledger.record(("Triton", name), sum({**tensor_bytes(args), **tensor_bytes(out)}.values()))
        return out

    # A kind's later packings and restores launch from what its first call prepared, past the tables.
    quantize_repeated, dequantize_repeated = codec.quantize_repeated, codec.dequantize_repeated

    def quantize_repeated_counted(x, prepared):
        with _disable_current_modes():
            out = quantize_repeated(x, prepared)
        if out is not None:
            ledger.record(("Triton", "quantize"), sum({**tensor_bytes(x), **tensor_bytes(out)}.values()))
        return out

    def dequantize_repeated_counted(payload, meta, out, prepared):
        with _disable_current_modes():
            launched = dequantize_repeated(payload, meta, out, prepared)
            if launched:
                out.zero_()
        if launched:
            ledger.record(("Triton", "dequantize"), sum(tensor_bytes(payload, meta, out).values()))
        return launched

    for name, table in KERNEL_TABLES.items():
        table["triton"] = functools.partial(counted, name, originals[name])
    codec.quantize_repeated, codec.dequantize_repeated = quantize_repeated_counted, dequantize_repeated_counted
    try:
        yield
    finally:
        for name, table in KERNEL_TABLES.items():
            table["triton"] = originals[name]
        codec.quantize_repeated, codec.dequantize_repeated = quantize_repeated, dequantize_repeated


def ledger_of_step(workload: str, batch_size: int, size: int, bits: int) -> Ledger:
    """One compressed training step of ``workload`` at ``batch_size`` (images of ``size`` px, or sequences
    of ``size`` tokens), its hooks' device work counted."""
    make_model, make_batch, loss_fn, _ = WORKLOADS[workload]
    torch.manual_seed(0)
    model, batch = make_model(), make_batch(batch_size, size)
    ledger = Ledger()
    session = tq.compress(bits=bits, backend="triton")
    session._pack = ledger.inside("pack hook", session._pack)
    # (The unpack hook is the class's: the hooks a block pushes call Session._unpack, not the block's.)
    unpack = Session._unpack
    Session._unpack = staticmethod(ledger.inside("unpack hook", unpack))
    try:
        with kernel_calls_counted(ledger), ledger:
            with session, torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, batch)
            loss.backward()
    finally:
        Session._unpack = staticmethod(unpack)
    # Every packing goes through one of the counted launches: a packing the ledger did not see would be
    # device work left out of the table.
    counted = ledger.calls[("Triton", "quantize")] + ledger.calls[("Triton", "pack bool")]
    if counted != session.stats.packed_tensors:
        raise RuntimeError(f"the ledger counted {counted} packing launches, the session made "
                           f"{session.stats.packed_tensors} packings")
    return ledger


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="resnet50")
    parser.add_argument("--bits", type=int, default=4, choices=(1, 2, 4, 8))
    parser.add_argument("--size", type=int, help="image size in px, or sequence length (default: the bench's, "
                                                 f"{DEFAULT_SIZES})")
    parser.add_argument("--batches", default="2,4",
                        help="the two batch sizes counted (default 2,4: at batch 1 ResNet-50's last stage falls "
                             "below min_bytes)")
    parser.add_argument("--project", default="64,256", help="batch sizes to project the bytes to (default 64,256)")
    parser.add_argument("--bandwidth", type=float, default=H200_COPY_GB_PER_S,
                        help=f"GB/s for the time floor (default {H200_COPY_GB_PER_S}, the H200's copy bandwidth)")
    args = parser.parse_args()
    try:
        projected = [int(b) for b in args.project.split(",")]
        counted = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches and --project take comma-separated ints, got {args.batches!r}, {args.project!r}")
    if len(counted) != 2 or not 0 < counted[0] < counted[1]:
        parser.error(f"--batches must be two increasing positive batch sizes, got {args.batches!r}")
    if not projected or min(projected) < 1:
        parser.error(f"--project must be positive batch sizes, got {args.project!r}")
    size = args.size or DEFAULT_SIZES[args.workload]
    small, large = (ledger_of_step(args.workload, b, size, args.bits) for b in counted)
    if small.calls != large.calls:
        print(f"note: the calls per step differ between batches {counted[0]} and {counted[1]} (a tensor crossed "
              f"min_bytes); the projection counts those of batch {counted[1]}")

    def projection(row) -> list[float]:
        per_sample = (large.bytes[row] - small.bytes.get(row, 0)) / (counted[1] - counted[0])
        fixed = large.bytes[row] - per_sample * counted[1]
        return [(fixed + per_sample * b) / MIB for b in projected]

    rows, totals = [], [0.0] * (len(projected) + 1)
    for row in sorted(large.calls, key=lambda r: -projection(r)[-1]):
        sizes = projection(row)
        floor_ms = sizes[-1] * MIB / (args.bandwidth * 1e9) * 1e3
        for i, value in enumerate([*sizes, floor_ms]):
            totals[i] += value
        rows.append([*row, large.calls[row], *(f"{s:.1f}" for s in sizes), f"{floor_ms:.3f}"])
    rows.append(["total", "", sum(large.calls.values()), *(f"{t:.1f}" for t in totals[:-1]), f"{totals[-1]:.3f}"])
    _, _, _, description = WORKLOADS[args.workload]
    print(f"{description.format(size)}, bf16 autocast, compress(bits={args.bits}): device work the hooks add per step "
          f"(counted at batches {counted[0]} and {counted[1]} on the CPU; torch {torch.__version__})\n")
    headers = ["where", "what", "calls per step", *(f"MiB at batch {b}" for b in projected),
               f"ms at {args.bandwidth:.0f} GB/s, batch {projected[-1]}"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
