"""Golden bytes pin the packed layout: codes least-significant bits first (docs/format.md)."""

import pytest
import torch

from tritonquant.kernels.bitpack import (
    torch_pack_bool,
    torch_pack_codes,
    torch_unpack_bool,
    torch_unpack_codes,
    triton_pack_bool,
    triton_unpack_bool,
)

GOLDEN_CODES = [
    # bits, codes, packed bytes
    (1, [1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [0b00001101, 0b01111111]),
    (2, [0, 1, 2, 3, 3, 2, 1, 0], [0b11100100, 0b00011011]),
    (4, [0x3, 0xA, 0xF, 0x0], [0xA3, 0x0F]),
    (8, [7, 200], [7, 200]),
]


@pytest.mark.parametrize("bits, codes, expected", GOLDEN_CODES, ids=[f"{g[0]}bit" for g in GOLDEN_CODES])
def test_pack_codes_golden_bytes(bits, codes, expected):
    packed = torch_pack_codes(torch.tensor(codes, dtype=torch.uint8), bits)
    assert packed.tolist() == expected
    assert torch_unpack_codes(packed, bits).tolist() == codes


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 8 * 1024 + 3], ids=lambda n: f"n{n}")
def test_bool_pack_roundtrip_and_backends_agree(n, device):
    g = torch.Generator().manual_seed(n)
    x = (torch.rand(n, generator=g) > 0.5).to(device)
    packed = triton_pack_bool(x)
    assert torch.equal(packed, torch_pack_bool(x))
    assert packed.numel() == (n + 7) // 8
    out_triton = torch.full((n,), True, device=device)
    out_torch = torch.full((n,), True, device=device)
    triton_unpack_bool(packed, out_triton)
    torch_unpack_bool(packed, out_torch)
    assert torch.equal(out_triton, x) and torch.equal(out_torch, x)


def test_bool_golden_bytes(device):
    x = torch.tensor([True, False, True, True, False, False, False, False, True, True], device=device)
    assert triton_pack_bool(x).tolist() == [0b00001101, 0b00000011]
