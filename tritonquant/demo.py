"""``python -m tritonquant demo``: what the codec does to a real activation tensor."""

from __future__ import annotations

import torch
from tabulate import tabulate

from .codec import dequantize, quantize


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
    images = torch.nn.functional.avg_pool2d(torch.randn(16, 3, 32, 32, generator=gen), 3, 1)
    conv = torch.nn.Conv2d(3, 64, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
        pre = torch.nn.functional.batch_norm(conv(images), None, None, training=True)
    return pre.relu().to(device)


def codec_table(x: torch.Tensor) -> str:
    rows = []
    for scheme in ("minmax", "sigma"):
        for bits in (8, 4, 2, 1):
            packed = quantize(x, bits=bits, scheme=scheme)
            x_hat = dequantize(packed)
            err = (x_hat - x).float()
            rows.append([
                scheme, bits, packed.raw_nbytes / 2**20, packed.nbytes / 2**20, packed.raw_nbytes / packed.nbytes,
                err.abs().max().item(), (err.norm() / x.float().norm()).item(),
                "yes" if torch.equal(x_hat > 0, x > 0) else "no",
            ])
    headers = ["scheme", "bits", "raw MB", "packed MB", "ratio", "max |err|", "rel. L2 err", "ReLU mask exact"]
    return tabulate(rows, headers=headers, floatfmt=".4g")


def run_demo(device: str = "auto", steps: int = 3) -> int:
    dev = pick_device(device)
    x = realistic_activation(dev)
    print(f"Activation: conv -> BN -> ReLU output, shape {tuple(x.shape)}, {x.dtype}, on {dev}\n")
    print(codec_table(x))
    return 0
