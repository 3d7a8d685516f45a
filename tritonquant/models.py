"""Built-in workloads for the demo, the benchmarks and the tests.

They cover what people train: the CNNs (``SmallCNN``, ``DigitsCNN``, ``ResNet50Like``) have
convolutions, BatchNorm, ReLU, max-pool and (but ``DigitsCNN``) residual connections;
``TinyTransformer`` has embeddings, LayerNorm and RMSNorm, attention through
``scaled_dot_product_attention``, GELU and SiLU MLPs, dropout and softmax cross-entropy.
Sizes are parameters, so the same classes serve a CPU demo and a GPU benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class SmallCNN(nn.Module):
    """[batch, 3, H, W] images -> [batch, classes] logits."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class DigitsCNN(nn.Module):
    """[batch, 1, 8, 8] images (scikit-learn's digits) -> [batch, 10] logits; conv/BN/ReLU/max-pool."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), each with BatchNorm, ReLU after the sum."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.shortcut(x) + self.bn3(self.conv3(y)))


class ResNet50Like(nn.Module):
    """ResNet-50's layout (stages of 3, 4, 6, 3 bottlenecks, widths 64..512, 25.6M parameters at 1000
    classes): [batch, 3, H, W] -> [batch, classes]. ``blocks`` lists the bottlenecks for checkpointing."""

    def __init__(self, classes: int = 1000, stages: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, in_channels = [], 64
        for stage, depth in enumerate(stages):
            width = 64 * 2**stage
            for i in range(depth):
                blocks.append(Bottleneck(in_channels, width, stride=2 if i == 0 and stage > 0 else 1))
                in_channels = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, gated: bool) -> None:
        super().__init__()
        # Alternate LayerNorm/GELU (GPT-2 style) and RMSNorm/SiLU (LLaMA style) blocks.
        self.norm1 = nn.RMSNorm(dim) if gated else nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.RMSNorm(dim) if gated else nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU() if gated else nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyTransformer(nn.Module):
    """[batch, seq] token ids (int64) -> [batch, seq, vocab] logits; causal language model.

    ``TinyTransformer(vocab=50257, dim=768, heads=12, layers=12, seq=1024, tied=True)`` has GPT-2
    small's shape (124M parameters)."""

    def __init__(self, vocab: int = 128, dim: int = 64, heads: int = 4, layers: int = 2, seq: int = 64,
                 dropout: float = 0.1, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, dropout, gated=i % 2 == 1) for i in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:  # GPT-2 shares the output projection with the token embedding
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        return self.head(self.norm(self.blocks(x)))


def cnn_batch(batch: int, size: int = 32, classes: int = 10, seed: int = 0, device="cpu"):
    """Smooth random images and labels that depend on them (so the loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    images = F.avg_pool2d(torch.randn(batch, 3, size + 2, size + 2, generator=g), 3, 1)
    labels = (images[:, 0].mean(dim=(1, 2)) * 40).long().clamp(-(classes // 2), classes // 2 - 1) + classes // 2
    return images.to(device), labels.to(device)


def lm_batch(batch: int, seq: int = 64, vocab: int = 128, seed: int = 0, device="cpu"):
    """Token sequences with structure (each token mostly follows from the previous one) and their targets."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, 4, (batch, seq + 1), generator=g)
    tokens = steps.cumsum(dim=1) % vocab
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def cnn_loss(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    tokens, targets = batch
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss_as_cuda_autocast_runs_it(model: nn.Module, batch) -> torch.Tensor:
    """``lm_loss`` written out as CUDA autocast runs it, for CPU runs that count what a GPU step saves:
    log_softmax in the logits' dtype (bf16), which saves its output, and nll_loss, which CUDA autocast
    runs in float32, on a float32 copy, which it saves too. CPU autocast runs the whole cross-entropy in
    float32 and saves one float32 tensor."""
    tokens, targets = batch
    logits = model(tokens)
    with torch.autocast(logits.device.type, enabled=False):
        log_probs = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        return F.nll_loss(log_probs.float(), targets.reshape(-1))
