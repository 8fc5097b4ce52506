"""Fixed point modulo 2^b (math/fixedpoint.py): the sum of the parties' words never wraps, at the
most parties a word width allows, and decodes to the plain integer sum."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math import fixedpoint
from fedsrd_cli.trust.roster import MAX_SITES


@pytest.mark.parametrize("bits", [16, 32])
def test_the_sum_at_the_extremes_of_the_most_parties_does_not_wrap(bits):
    parties = min(fixedpoint.max_parties(bits), MAX_SITES)  # the most a roster of this width allows
    clip = 0.37  # not a power of two: X * s is not a whole number
    scale = fixedpoint.scale_for(clip, parties, bits)
    assert parties * fixedpoint.levels(parties, bits) <= 2 ** (bits - 1) - 1
    assert fixedpoint.levels(parties, bits) >= fixedpoint.MIN_LEVELS
    for sign in (1.0, -1.0):
        values = torch.full((parties, 3), sign * clip, dtype=torch.float64)  # every party at +-X
        values[:, 1] *= 0.999999  # just inside, rounding up where it can
        values[:, 2] = sign * (torch.arange(parties) % 7 + 0.5).double() / 7 * clip
        words = fixedpoint.encode(values, scale, bits)  # (parties, 3)
        total = words[0]
        for row in words[1:]:
            total = fixedpoint.add(total, row, bits)
        plain = torch.round(values * scale).to(torch.int64).sum(dim=0)  # the integer sum, no modulus
        assert torch.equal(fixedpoint.signed(total, bits), plain)  # read back without a wrap
        decoded = fixedpoint.decode(total, scale, bits)
        assert float((decoded - values.sum(dim=0)).abs().max()) <= parties / (2 * scale) + 1e-12


def test_sixteen_bits_hold_128_parties_and_no_more():
    assert fixedpoint.max_parties(16) == 128
    assert fixedpoint.levels(128, 16) == 255
    assert fixedpoint.levels(129, 16) < fixedpoint.MIN_LEVELS


@pytest.mark.parametrize("bits", [16, 32])
def test_stored_words_round_trip_and_masks_cancel(bits):
    gen = torch.Generator().manual_seed(0)
    modulus = fixedpoint.modulus(bits)
    words = torch.randint(0, modulus, (1000,), generator=gen, dtype=torch.int64)
    stored = fixedpoint.to_stored(words, bits)
    assert stored.dtype == fixedpoint.STORED_DTYPES[bits]
    assert torch.equal(fixedpoint.from_stored(stored, bits), words)
    mask = torch.randint(0, modulus, (1000,), generator=gen, dtype=torch.int64)
    masked = fixedpoint.add(words, mask, bits)
    assert torch.equal(fixedpoint.subtract(masked, mask, bits), words)


def test_no_precision_is_refused():
    with pytest.raises(ValueError, match="no fixed-point precision"):
        fixedpoint.scale_for(1e6, 128, 16)
    with pytest.raises(ValueError, match="16 or 32"):
        fixedpoint.levels(4, 24)


def test_two_sites_at_plus_x_of_one_half_do_not_wrap():
    """The scale before 2026-12-07, floor((2^31 - 1) / (n X)), gave X s = 2^30 - 0.5 here, which
    rounds to 2^30: two sites at +X summed to 2^31 and read back as -2^31."""
    scale = fixedpoint.scale_for(0.5, 2, 32)
    words = fixedpoint.encode(torch.tensor([0.5, 0.5], dtype=torch.float64), scale, 32)
    total = fixedpoint.add(words[0], words[1], 32)
    assert float(fixedpoint.decode(total, scale, 32)) == pytest.approx(1.0, abs=1 / scale)


@pytest.mark.parametrize(("parties", "bits"), [(2, 16), (3, 16), (128, 16), (2, 32), (MAX_SITES, 32)])
def test_masked_totals_at_their_bound_sum_without_wrapping(parties, bits):
    """Every party at the bound V: each limb's sum stays below 2^b, so the modular sum is the sum,
    and the total reads back as n V."""
    width, count = fixedpoint.limb_bits(parties, bits), fixedpoint.limb_count(parties, bits)
    assert width * count >= fixedpoint.TOTAL_BITS and parties * 2**width <= 2**bits
    limbs = fixedpoint.encode_total(2.5, 2.5, parties, bits)
    assert limbs.shape == (count,) and int(limbs.max()) < 2**width
    plain = limbs * parties  # the limbs' sums as plain integers
    assert int(plain.max()) < 2**bits
    total = torch.remainder(plain, fixedpoint.modulus(bits))  # what summing the words gives
    assert torch.equal(total, plain)
    assert fixedpoint.decode_total(total, 2.5, parties, bits) == pytest.approx(parties * 2.5, rel=1e-15)


@pytest.mark.parametrize("bits", [16, 32])
def test_masked_totals_decode_to_the_float_sum_under_masks(bits):
    gen = torch.Generator().manual_seed(1)
    parties, bound = 5, 40.0
    values = (torch.rand(parties, generator=gen, dtype=torch.float64) * bound).tolist()
    modulus = fixedpoint.modulus(bits)
    masks = torch.randint(0, modulus, (parties - 1, fixedpoint.limb_count(parties, bits)), generator=gen)
    total = torch.zeros(fixedpoint.limb_count(parties, bits), dtype=torch.int64)
    for i, value in enumerate(values):
        words = fixedpoint.encode_total(value, bound, parties, bits)
        if i < parties - 1:  # pairwise masks of a chain: party i adds m_i, party i + 1 takes it off
            words = fixedpoint.add(words, masks[i], bits)
        if i > 0:
            words = fixedpoint.subtract(words, masks[i - 1], bits)
        total = fixedpoint.add(total, words, bits)
    step = bound / (2**fixedpoint.TOTAL_BITS - 1)
    assert abs(fixedpoint.decode_total(total, bound, parties, bits) - sum(values)) <= parties * step
    with pytest.raises(ValueError, match="in \\[0, bound\\]"):
        fixedpoint.encode_total(-1.0, bound, parties, bits)
