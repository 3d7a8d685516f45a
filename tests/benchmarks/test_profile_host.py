"""benchmarks/profile_host.py: the hooks' host time with the CPU's caches warm and evicted."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import profile_host  # noqa: E402


def test_evicting_caches_is_the_identity_and_copies_its_buffer_both_ways():
    x = torch.randn(6, requires_grad=True)
    source, target = torch.arange(256, dtype=torch.int32).to(torch.uint8), torch.zeros(256, dtype=torch.uint8)
    y = profile_host.EvictHostCaches.apply(x * 2, source, target)
    assert torch.equal(y, x * 2) and torch.equal(target, source)
    target.zero_()
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    assert torch.equal(target, source)  # (copied again in backward: the unpack hooks run there)


def test_hook_times_count_every_saved_tensor_of_the_chain(monkeypatch):
    monkeypatch.setattr(profile_host, "EVICT_CHAIN_LENGTH", 4)
    monkeypatch.setattr(profile_host, "EVICT_ROUNDS", 2)
    monkeypatch.setattr(profile_host, "SMALL_ELEMENTS", 1024)
    calls = {"pack": 0, "unpack": 0}
    mean_us = profile_host.HookTimer.mean_us

    def counting_mean_us(timer, hook):
        calls[hook] = sum(n for (name, _), n in timer.calls.items() if name == hook)
        return mean_us(timer, hook)

    monkeypatch.setattr(profile_host.HookTimer, "mean_us", counting_mean_us)
    pack, unpack = profile_host.hook_us_with_evicted_caches(torch.device("cpu"), "torch", 4096)
    # Timed rounds only (the first warms up): each tanh of the chain saves its output once, packed.
    assert calls == {"pack": 2 * 4, "unpack": 2 * 4}
    assert pack > 0 and unpack > 0


def test_mean_us_divides_the_time_of_every_kind_by_its_calls():
    timer = profile_host.HookTimer()
    timer.seconds.update({("pack", "Packed"): 3e-3, ("pack", "Kept"): 1e-3, ("unpack", "Packed"): 2e-3})
    timer.calls.update({("pack", "Packed"): 10, ("pack", "Kept"): 30, ("unpack", "Packed"): 10})
    assert timer.mean_us("pack") == pytest.approx(100.0)
    assert timer.mean_us("unpack") == pytest.approx(200.0)
