"""``python -m tritonquant demo``: the main job, on built-in workloads.

1. What the codec does to one real activation tensor (size, ratio, error, ReLU mask).
2. For a CNN and a transformer: a few training steps exact and compressed at 8, 4 and 2 bits from the
   same initial weights, with the gradient agreement with exact training, the bytes saved, the step's
   peak memory, and the per-module report of the 4-bit run.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from .bench import cpu_peak_bytes
from .codec import dequantize, quantize
from .models import SmallCNN, TinyTransformer, cnn_batch, cnn_loss, lm_batch, lm_loss
from .session import compress

DEMO_BITS = (8, 4, 2)
MB = 2**20


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda'; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def realistic_activation(device: torch.device) -> torch.Tensor:
    """Output of conv -> batch norm -> ReLU on a batch of smooth random images: [16, 64, 28, 28] fp32."""
    gen = torch.Generator().manual_seed(0)
    images = F.avg_pool2d(torch.randn(16, 3, 32, 32, generator=gen), 3, 1)
    conv = torch.nn.Conv2d(3, 64, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
        pre = F.batch_norm(conv(images), None, None, training=True)
    return pre.relu().to(device)


def codec_table(x: torch.Tensor) -> str:
    rows = []
    for scheme in ("minmax", "sigma"):
        for bits in (8, 4, 2, 1):
            packed = quantize(x, bits=bits, scheme=scheme)
            x_hat = dequantize(packed)
            err = (x_hat - x).float()
            rows.append([
                scheme, bits, packed.raw_nbytes / MB, packed.nbytes / MB, packed.raw_nbytes / packed.nbytes,
                err.abs().max().item(), (err.norm() / x.float().norm()).item(),
                "yes" if torch.equal(x_hat > 0, x > 0) else "no",
            ])
    headers = ["scheme", "bits", "raw MB", "packed MB", "ratio", "max |err|", "rel. L2 err", "ReLU mask exact"]
    return tabulate(rows, headers=headers, floatfmt=".4g")


def _workloads(device: torch.device) -> dict:
    big = device.type == "cuda"
    return {
        "CNN (conv, BN, ReLU, max-pool, residual)": (
            lambda: SmallCNN(width=64 if big else 16, blocks=4 if big else 2),
            cnn_loss,
            lambda step: cnn_batch(128 if big else 16, seed=step, device=device),
        ),
        "transformer (LayerNorm/RMSNorm, SDPA, GELU/SiLU, dropout)": (
            lambda: TinyTransformer(dim=256 if big else 64, layers=4 if big else 2, seq=128 if big else 64),
            lm_loss,
            lambda step: lm_batch(32 if big else 8, seq=128 if big else 64, seed=step, device=device),
        ),
    }


def _gradient(model, loss_fn, batch, context) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in every run
    with context:
        loss = loss_fn(model, batch)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _step_peak(step, device: torch.device) -> tuple[torch.Tensor, int | None]:
    """(what ``step()`` returns, the most memory allocated at once while it ran beyond what was allocated
    before it; None where that cannot be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = step()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    results = []
    peak = cpu_peak_bytes(lambda: results.append(step()))
    return results[0], peak


def _peak_cells(peak: int | None, exact_peak: int | None) -> list[str]:
    if peak is None:
        return ["n/a", "-"]
    return [f"{peak / MB:.2f}", f"{peak / exact_peak:.2f}" if exact_peak else "-"]


def _train(model, loss_fn, make_batch, steps, session_factory) -> tuple[float, float]:
    """Train ``steps`` SGD steps; returns (last loss, seconds per step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = torch.tensor(float("nan"))
    start = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        with session_factory():
            loss = loss_fn(model, make_batch(step))
        loss.backward()
        opt.step()
    elapsed = (time.perf_counter() - start) / max(steps, 1)
    return loss.item(), elapsed


def _progress(message: str) -> None:
    """One line on stderr per finished configuration: the tables come at the end of each workload."""
    print(message, file=sys.stderr, flush=True)


def training_comparison(device: torch.device, steps: int) -> str:
    out = []
    for name, (make_model, loss_fn, make_batch) in _workloads(device).items():
        short = name.split(" (")[0]
        started = time.perf_counter()
        torch.manual_seed(0)
        initial = make_model().to(device)
        batch = make_batch(0)
        # Warm-up at every width measured below: the first step's allocations, and on a GPU the launch
        # configs each width tunes at first use (its candidates' buffers), which the step peak must leave out.
        for bits in DEMO_BITS:
            _gradient(initial, loss_fn, batch, compress(bits=bits))
        exact_grad, exact_peak = _step_peak(lambda: _gradient(initial, loss_fn, batch, contextlib.nullcontext()),
                                            device)
        exact_loss, exact_time = _train(copy.deepcopy(initial), loss_fn, make_batch, steps, contextlib.nullcontext)
        _progress(f"  {short}: exact done ({time.perf_counter() - started:.0f} s)")
        rows = [["exact", "-", "-", "-", "-", *_peak_cells(exact_peak, exact_peak), f"{exact_loss:.4f}",
                 f"{exact_time * 1e3:.1f}"]]
        report = ""
        for bits in DEMO_BITS:
            session = compress(bits=bits)
            grad, peak = _step_peak(lambda: _gradient(initial, loss_fn, batch, session), device)
            cosine = F.cosine_similarity(exact_grad, grad, dim=0).item()
            rel_err = ((grad - exact_grad).norm() / exact_grad.norm()).item()
            loss, seconds = _train(copy.deepcopy(initial), loss_fn, make_batch, steps, lambda: compress(bits=bits))
            rows.append([
                f"{bits}-bit", f"{cosine:.4f}", f"{rel_err:.4f}", f"{session.stats.raw_bytes / MB:.2f}",
                f"{session.stats.ratio:.2f}x", *_peak_cells(peak, exact_peak), f"{loss:.4f}", f"{seconds * 1e3:.1f}",
            ])
            if bits == 4:
                report = session.report()
            _progress(f"  {short}: {bits}-bit done ({time.perf_counter() - started:.0f} s)")
        headers = ["training", "grad cosine", "rel. grad err", "activations MB", "packed ratio", "step peak MB",
                   "x exact", f"loss after {steps} steps", "ms / step"]
        out.append(f"== {name} ==\n" + tabulate(rows, headers=headers, disable_numparse=True))
        out.append(f"Saved tensors of one 4-bit step, per module:\n{report}\n")
    return "\n\n".join(out)


def run_demo(device: str = "auto", steps: int = 3) -> int:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = pick_device(device)
    x = realistic_activation(dev)
    print(f"tritonquant demo on {dev} (kernels: {'Triton' if dev.type == 'cuda' else 'torch reference'})\n")
    print(f"1. One activation: conv -> BN -> ReLU output, shape {tuple(x.shape)}, {x.dtype}\n")
    print(codec_table(x))
    print(f"\n2. Training, exact vs compressed, from the same initial weights ({steps} steps each)\n")
    print(training_comparison(dev, steps))
    return 0
