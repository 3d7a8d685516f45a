"""Activation memory and step time of compress() combined with torch.utils.checkpoint.

    python benchmarks/bench_checkpoint.py            # CUDA if present, else a small CPU version
    python benchmarks/bench_checkpoint.py --layers 8 --batch 8 --steps 5

Configurations, on the built-in transformer (every block alike):
    exact                      no compression, no checkpointing
    checkpoint all             torch.utils.checkpoint around every block (non-reentrant)
    tq-4bit                    compress(bits=4)
    tq-4bit + ckpt half        compress(bits=4) around the model, every other block checkpointed
    tq-4bit + ckpt all         compress(bits=4) around the model, every block checkpointed: only the
                               block inputs are kept, and compressed

"saved MB" is what the autograd graph holds after the forward pass, from byte accounting of every saved
tensor (parameters excluded, each storage once): on a CPU this is the only memory figure. On CUDA the
script also reports peak memory (torch.cuda.max_memory_allocated) over the step. Step time is the
median over --steps steps, forward plus backward. Ratios are to "exact" from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.checkpoint import checkpoint

import tritonquant as tq
from tritonquant.models import TinyTransformer, lm_batch, lm_loss

MB = 2**20


class Checkpointed(nn.Module):
    """Runs ``blocks[i]`` under checkpoint for i in ``which``; the rest of the model unchanged."""

    def __init__(self, model: TinyTransformer, which: set[int]) -> None:
        super().__init__()
        self.model = model
        self.which = which

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed(tokens) + m.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for i, block in enumerate(m.blocks):
            x = checkpoint(block, x, use_reentrant=False) if i in self.which else block(x)
        return m.head(m.norm(x))


class SavedBytes:
    """Counts the bytes of every tensor autograd saves (parameters excluded, each storage once)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.nbytes += storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def configurations(layers: int) -> dict[str, tuple[set[int], int | None]]:
    """name -> (checkpointed block indices, bits or None for no compression)."""
    return {
        "exact": (set(), None),
        "checkpoint all": (set(range(layers)), None),
        "tq-4bit": (set(), 4),
        "tq-4bit + ckpt half": (set(range(0, layers, 2)), 4),
        "tq-4bit + ckpt all": (set(range(layers)), 4),
    }


def measure(model: Checkpointed, batch, bits: int | None, steps: int, device: torch.device) -> dict:
    """Saved bytes after forward, peak CUDA memory and median step time for one configuration."""
    cuda = device.type == "cuda"
    times = []
    saved = peak = 0
    # Step 0 warms up (kernels compiled, launch configs tuned, cuBLAS workspaces made: none of it is the
    # configuration's memory) and is where the saved bytes are read; the peak is step 1's.
    for step in range(steps + 1):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ctx = tq.compress(bits=bits) if bits is not None else SavedBytes()
        with ctx:
            loss = lm_loss(model, batch)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if step == 0:
            saved = ctx.stats.packed_bytes + ctx.stats.passed_bytes if bits is not None else ctx.nbytes
        else:
            times.append(time.perf_counter() - start)
        if step == 1 and cuda:
            peak = torch.cuda.max_memory_allocated()
    return {"saved": saved, "peak": peak, "time": statistics.median(times)}


def smaller_by(exact: dict | None, result: dict, key: str) -> str:
    """How many times less ``result`` has of ``key`` than exact training ("n/a" if exact failed)."""
    return f"{exact[key] / result[key]:.2f}x" if exact else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    big = device.type == "cuda"
    layers = args.layers or (12 if big else 4)
    batch_size = args.batch or 8
    seq = args.seq or (1024 if big else 128)
    dim = args.dim or (768 if big else 128)
    vocab = 8192 if big else 512

    torch.manual_seed(0)
    base = TinyTransformer(vocab=vocab, dim=dim, heads=max(dim // 64, 2), layers=layers, seq=seq, dropout=0.0).to(device)
    batch = lm_batch(batch_size, seq=seq, vocab=vocab, device=device)

    headers = ["config", "saved MB", "smaller by"]
    if big:
        headers += ["peak MB", "peak smaller by"]
    headers += ["step ms", "time vs exact"]
    where = torch.cuda.get_device_name() if big else f"CPU, {torch.get_num_threads()} threads"
    print(f"transformer: layers={layers} dim={dim} seq={seq} batch={batch_size}; {where}; torch {torch.__version__}",
          flush=True)
    rows = []
    results = {}
    for name, (which, bits) in configurations(layers).items():
        try:
            results[name] = r = measure(Checkpointed(base, which), batch, bits, args.steps, device)
        except Exception as exc:  # noqa: BLE001 - one configuration's failure is a row, not the end of the table
            rows.append([name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"]
                        + [""] * (len(headers) - 2))
            print(f"{name}: failed", flush=True)
            if big:
                torch.cuda.empty_cache()
            continue
        exact = results.get("exact")
        row = [name, f"{r['saved'] / MB:.2f}", smaller_by(exact, r, "saved")]
        if big:
            row += [f"{r['peak'] / MB:.0f}", smaller_by(exact, r, "peak")]
        row += [f"{r['time'] * 1e3:.1f}", f"{r['time'] / exact['time']:.2f}" if exact else "n/a"]
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{h} {v}" for h, v in zip(headers[1:], row[1:])), flush=True)
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return 1 if len(results) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
