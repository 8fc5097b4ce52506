"""math.quantize against a plain per-block reference and exhaustive packing checks."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.quantize import (
    BLOCK,
    block_count,
    dequantize_blocks,
    pack_int4,
    quantize_blocks,
    unpack_int4,
)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
def test_quantize_matches_a_per_block_reference_and_errs_by_at_most_half_a_step(bits, n):
    g = torch.Generator().manual_seed(n + bits)
    values = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)  # blocks of very different scale
    codes, scales = quantize_blocks(values, bits)
    top = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.shape == (n,)
    assert scales.dtype == torch.float32 and scales.shape == (block_count(n),)
    for j in range(block_count(n)):
        block = values[j * BLOCK : (j + 1) * BLOCK]
        scale = float(block.abs().max()) / top
        assert float(scales[j]) == pytest.approx(scale, rel=1e-6)
        expected = torch.round(block / scales[j]).clamp(-top, top)
        assert torch.equal(codes[j * BLOCK : (j + 1) * BLOCK].float(), expected)
    restored = dequantize_blocks(codes, scales)
    step = scales.repeat_interleave(BLOCK)[:n]
    assert bool(((restored - values).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all())
    assert int(codes.abs().max()) == top  # each block's largest value uses the full range


def test_zero_blocks_have_zero_scale_and_codes():
    values = torch.cat([torch.zeros(BLOCK), torch.tensor([0.7, -0.2])])
    codes, scales = quantize_blocks(values, 4)
    assert float(scales[0]) == 0.0 and not codes[:BLOCK].any()
    assert codes[BLOCK:].tolist() == [7, -2]  # scale 0.1
    assert not dequantize_blocks(codes, scales)[:BLOCK].any()


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16])
def test_int4_packing_round_trips_every_code(n):
    codes = (torch.arange(n) % 15 - 7).to(torch.int8)  # every code in [-7, 7]
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_int4(packed, n), codes)
    if n:
        assert int(packed[0]) & 0x0F == int(codes[0]) + 8  # the first code in the low nibble


def test_unpack_refuses_bytes_pack_never_writes():
    with pytest.raises(ValueError, match="is 0"):
        unpack_int4(torch.tensor([0x10], dtype=torch.uint8), 2)  # low nibble 0
    with pytest.raises(ValueError, match="last nibble"):
        unpack_int4(torch.tensor([0x99], dtype=torch.uint8), 1)  # odd count, high nibble used
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(torch.tensor([0x99, 0x99], dtype=torch.uint8), 1)
