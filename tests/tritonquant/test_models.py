"""tritonquant.models: the loss written out as CUDA autocast runs it, for CPU counts of a GPU step."""

import pytest
import torch

from tritonquant.models import TinyTransformer, lm_batch, lm_loss, lm_loss_as_cuda_autocast_runs_it

VOCAB = 512


def saved_by_the_loss(loss_fn, device: str) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each tensor of batch x sequence x vocabulary values that the loss saves, under
    bf16 autocast on ``device``; a tensor saved by two ops, once."""
    torch.manual_seed(0)
    model = TinyTransformer(vocab=VOCAB, dim=32, heads=2, layers=1, seq=16).to(device)
    batch = lm_batch(4, seq=16, vocab=VOCAB, device=device)
    saved = {}

    def pack(t):
        if t.numel() == 4 * 16 * VOCAB:
            saved.setdefault(t.data_ptr(), (t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=torch.bfloat16):
        loss_fn(model, batch).backward()
    return list(saved.values())


def test_the_written_out_loss_saves_bf16_log_probabilities_and_a_float32_copy():
    """On the CPU, where autocast runs the whole cross-entropy in float32 (one float32 tensor saved)."""
    assert saved_by_the_loss(lm_loss, "cpu") == [(torch.float32, (64, VOCAB))]
    assert saved_by_the_loss(lm_loss_as_cuda_autocast_runs_it, "cpu") == [
        (torch.bfloat16, (64, VOCAB)), (torch.float32, (64, VOCAB))]


def test_the_written_out_loss_is_the_cross_entropy_to_bf16_precision():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=VOCAB, dim=32, heads=2, layers=1, seq=16)
    batch = lm_batch(4, seq=16, vocab=VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact, written_out = lm_loss(model, batch), lm_loss_as_cuda_autocast_runs_it(model, batch)
    assert written_out.dtype == torch.float32
    torch.testing.assert_close(written_out, exact, rtol=2**-7, atol=0)  # (bf16 log-probabilities)


@pytest.mark.gpu
def test_cuda_autocast_saves_what_the_written_out_loss_saves_on_the_cpu():
    assert saved_by_the_loss(lm_loss, "cuda") == saved_by_the_loss(lm_loss_as_cuda_autocast_runs_it, "cpu")
