"""torch.utils.checkpoint around and inside compress(), reentrant and non-reentrant.

What happens (docs/integrations/checkpoint.md):
- checkpoint inside a compress block: the checkpoint's own saved-tensor hooks are innermost, so nothing
  inside a checkpointed block is packed (it is recomputed); the block's input is saved through
  compress's hooks and packed, and backward recomputes the block from the restored input.
- compress inside a checkpointed function: non-reentrant, compress's hooks are innermost and pack what
  the block saves (nothing is left to recompute); reentrant, the forward runs without grad and the
  recomputation happens during backward, where everything passes through: gradients are exact.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import tritonquant as tq
from tritonquant.models import TinyTransformer, lm_batch, lm_loss

# Cosine similarity of the full gradient with exact training, measured on this model (torch 2.13, CPU):
# every other block checkpointed, the rest compressed: 8 bits 0.99998, 4 bits 0.9919 (both modes).
AGREEMENT = {8: 0.9999, 4: 0.98}


class PartlyCheckpointed(nn.Module):
    """TinyTransformer whose blocks listed in ``checkpointed`` run under torch.utils.checkpoint."""

    def __init__(self, checkpointed: set[int], use_reentrant: bool, layers: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyTransformer(vocab=64, dim=32, heads=2, layers=layers, seq=16, dropout=0.0)
        self.checkpointed = checkpointed
        self.use_reentrant = use_reentrant

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed(tokens) + m.pos(torch.arange(tokens.shape[1]))
        for i, block in enumerate(m.blocks):
            x = checkpoint(block, x, use_reentrant=self.use_reentrant) if i in self.checkpointed else block(x)
        return m.head(m.norm(x))


def flat_grads(model: nn.Module, ctx, batch) -> torch.Tensor:
    model.zero_grad()
    with ctx:
        loss = lm_loss(model, batch)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("bits", sorted(AGREEMENT, reverse=True), ids=lambda b: f"{b}bit")
def test_checkpointed_blocks_inside_compress(bits, use_reentrant):
    batch = lm_batch(4, seq=16, vocab=64)
    model = PartlyCheckpointed({0, 2}, use_reentrant)
    exact = flat_grads(model, contextlib.nullcontext(), batch)
    # Checkpointing alone changes nothing numerically.
    model.checkpointed = set()
    torch.testing.assert_close(flat_grads(model, contextlib.nullcontext(), batch), exact, rtol=1e-5, atol=1e-7)
    model.checkpointed = {0, 2}

    session = tq.compress(bits=bits, min_bytes=0)
    packed = flat_grads(model, session, batch)
    assert cosine(packed, exact) >= AGREEMENT[bits]
    rows = session.stats.modules
    inside = lambda block: [r for name, r in rows.items() if name.startswith(f"model.blocks.{block}.")]  # noqa: E731
    # Checkpointed blocks keep nothing of their own (recomputed in backward); the others are packed.
    assert sum(r.packed_tensors + r.passed_tensors for r in inside(0) + inside(2)) == 0
    assert all(sum(r.packed_tensors for r in inside(b)) > 0 for b in (1, 3))
    # Each checkpointed block's input is saved by the checkpoint itself, through compress's hooks (in
    # the root module's row). torch 2.11's non-reentrant checkpoint saved one tensor more than 2.13's.
    assert rows["PartlyCheckpointed"].packed_tensors >= 2


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_everything_checkpointed_packs_only_block_inputs_and_head(use_reentrant):
    batch = lm_batch(4, seq=16, vocab=64)
    model = PartlyCheckpointed({0, 1, 2, 3}, use_reentrant)
    exact = flat_grads(model, contextlib.nullcontext(), batch)
    session = tq.compress(bits=8, min_bytes=0)
    packed = flat_grads(model, session, batch)
    assert cosine(packed, exact) >= AGREEMENT[8]
    block_rows = [r for name, r in session.stats.modules.items() if ".blocks." in name]
    assert all(r.packed_tensors == 0 for r in block_rows)
    assert session.stats.modules["model.head"].packed_tensors == 1  # the final norm's output


class CompressedBlock:
    """One transformer block run inside a fresh ``compress(bits)`` block per call (sessions kept)."""

    def __init__(self, bits: int) -> None:
        self.block = TinyTransformer(vocab=64, dim=32, heads=2, layers=1, seq=16, dropout=0.0).blocks[0]
        self.bits = bits
        self.sessions: list = []

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        session = tq.compress(bits=self.bits, min_bytes=0)
        self.sessions.append(session)
        with session:
            return self.block(y)

    def grads(self, fn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input gradient, first MLP weight gradient) of ``fn(x).square().sum()``."""
        self.block.zero_grad()
        xi = x.clone().requires_grad_()
        fn(xi).square().sum().backward()
        return xi.grad, self.block.mlp[0].weight.grad.clone()


def test_compress_inside_non_reentrant_checkpoint_packs_instead_of_recomputing():
    compressed, x = CompressedBlock(bits=4), torch.randn(4, 16, 32)
    exact = compressed.grads(compressed.block, x)
    got = compressed.grads(lambda y: checkpoint(compressed, y, use_reentrant=False), x)
    assert len(compressed.sessions) == 1, "nothing was recomputed: compress packed what the checkpoint would have"
    assert compressed.sessions[0].stats.packed_tensors > 0
    for e, g in zip(exact, got):
        assert not torch.equal(e, g)  # the 4-bit approximation is visible ...
        assert cosine(e.flatten(), g.flatten()) > 0.99  # ... and small (measured 0.997)


def test_compress_inside_reentrant_checkpoint_is_exact():
    compressed, x = CompressedBlock(bits=2), torch.randn(4, 16, 32)
    exact = compressed.grads(compressed.block, x)
    got = compressed.grads(lambda y: checkpoint(compressed, y, use_reentrant=True), x)
    forward, recompute = compressed.sessions
    assert forward.stats.packed_tensors == 0 and forward.stats.passed_tensors == 0  # ran under no_grad
    assert recompute.stats.packed_tensors == 0 and recompute.stats.passed_by_reason["backward"] > 0
    for e, g in zip(exact, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
