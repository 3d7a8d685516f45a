import pytest
import torch
import triton
import triton.language as tl

from tritonquant.kernels.philox import (DITHER_ROUNDS, torch_dither4, torch_philox4x32, torch_philox_uniform,
                                        torch_philox_uniform4)


@triton.jit
def _rand_kernel(out_ptr, seed, first_counter, N: tl.constexpr):
    counters = tl.arange(0, N).to(tl.int64) + first_counter
    tl.store(out_ptr + tl.arange(0, N), tl.rand(seed, counters))


@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 7, 2**63 - 1], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("first_counter", [0, 2**31 - 3, 2**33 + 1], ids=lambda c: f"from{c}")
def test_torch_philox_matches_tl_rand(seed, first_counter, device):
    out = torch.empty(128, device=device)
    _rand_kernel[(1,)](out, seed, first_counter, N=128)
    counters = torch.arange(128, device=device, dtype=torch.int64) + first_counter
    assert torch.equal(out, torch_philox_uniform(seed, counters))


@triton.jit
def _rand4x_kernel(out_ptr, seed, first_counter, N: tl.constexpr):
    counters = tl.arange(0, N).to(tl.int64) + first_counter
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    tl.store(out_ptr + tl.arange(0, N) * 4, u0)
    tl.store(out_ptr + tl.arange(0, N) * 4 + 1, u1)
    tl.store(out_ptr + tl.arange(0, N) * 4 + 2, u2)
    tl.store(out_ptr + tl.arange(0, N) * 4 + 3, u3)


@pytest.mark.parametrize("seed", [0, 2**40 + 7, 2**63 - 1], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("first_counter", [0, 2**33 + 1], ids=lambda c: f"from{c}")
def test_torch_philox_words_match_tl_rand4x(seed, first_counter, device):
    out = torch.empty(128, 4, device=device)
    _rand4x_kernel[(1,)](out, seed, first_counter, N=128)
    counters = torch.arange(128, device=device, dtype=torch.int64) + first_counter
    assert torch.equal(out, torch_philox_uniform4(seed, counters))


@triton.jit
def _randint4x_kernel(out_ptr, seed, first_counter, N: tl.constexpr, ROUNDS: tl.constexpr):
    counters = tl.arange(0, N).to(tl.int64) + first_counter
    w0, w1, w2, w3 = tl.randint4x(seed, counters, ROUNDS)
    tl.store(out_ptr + tl.arange(0, N) * 4, w0.to(tl.int64))
    tl.store(out_ptr + tl.arange(0, N) * 4 + 1, w1.to(tl.int64))
    tl.store(out_ptr + tl.arange(0, N) * 4 + 2, w2.to(tl.int64))
    tl.store(out_ptr + tl.arange(0, N) * 4 + 3, w3.to(tl.int64))


@pytest.mark.parametrize("rounds", [DITHER_ROUNDS, 10], ids=lambda r: f"{r}rounds")
@pytest.mark.parametrize("seed", [0, 2**40 + 7, 2**63 - 1], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("first_counter", [0, 2**33 + 1], ids=lambda c: f"from{c}")
def test_torch_philox_words_match_tl_randint4x(seed, first_counter, rounds, device):
    out = torch.empty(128, 4, dtype=torch.int64, device=device)
    _randint4x_kernel[(1,)](out, seed, first_counter, N=128, ROUNDS=rounds)
    counters = torch.arange(128, device=device, dtype=torch.int64) + first_counter
    assert torch.equal(out, torch_philox4x32(seed, counters, rounds))


def test_dithers_fill_minus_half_to_half_uniformly():
    v = torch_dither4(11, torch.arange(50_000, dtype=torch.int64)).reshape(-1)
    assert v.min() >= -0.5 and v.max() < 0.5
    counts = torch.histc(v, bins=10, min=-0.5, max=0.5)
    # Each decile holds 20000 +/- 141 (binomial sd); 5 sd is a loose, non-flaky bound.
    assert (counts - 20_000).abs().max() < 5 * 141
    # 23 random mantissa bits: every value is a multiple of 2**-23.
    assert torch.equal(v * 2**23, (v * 2**23).round())


def test_dither_stream_golden_values():
    # Pins the stochastic-rounding stream (docs/format.md: Philox4x32 with 7 rounds, word w -> the float
    # of bits (w >> 9) | 0x3F800000, minus 1.5). Any change to it (rounds, key, word order, mapping)
    # changes every stochastic payload. Obtained by running torch_dither4(12345, torch.arange(2)) when
    # this test was written (its words match tl.randint4x, tested above); written as multiples of 2**-23.
    dithers = torch_dither4(12345, torch.arange(2, dtype=torch.int64)) * 2**23
    assert dithers.tolist() == [[-4010545.0, -3949810.0, 3893619.0, -2201860.0],
                                [1088213.0, 2605551.0, 1108120.0, -2230450.0]]


def test_uniforms_lie_in_unit_interval_and_look_uniform():
    u = torch_philox_uniform(7, torch.arange(200_000, dtype=torch.int64))
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    # Each decile holds 20000 +/- 141 (binomial sd); 5 sd is a loose, non-flaky bound.
    assert (counts - 20_000).abs().max() < 5 * 141


def test_different_seeds_give_different_streams():
    counters = torch.arange(64, dtype=torch.int64)
    assert not torch.equal(torch_philox_uniform(1, counters), torch_philox_uniform(2, counters))
