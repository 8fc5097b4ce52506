"""Bit packing and the portable seeded download mask."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fedsrd_cli.math.masks import (
    MASK_CHUNK,
    count_set_bits,
    keep_threshold,
    pack_bits,
    padding_is_clean,
    random_bits32,
    seeded_keep_mask,
    stream_key,
    unpack_bits,
)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_matches_numpy_packbits_and_round_trips(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(mask)
    assert packed.tolist() == np.packbits(mask.numpy()).tolist()
    assert torch.equal(unpack_bits(packed, n), mask)
    assert padding_is_clean(packed, n)


def test_padding_bits_are_detected():
    packed = pack_bits(torch.tensor([True, False, True]))
    assert not padding_is_clean(packed | 1, 3)


def _mix32_reference(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def _reference_bits(seed: int, name: str, n: int) -> list[int]:
    """The generator as docs/format.md specifies it, in plain Python integers."""
    key = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    k0, k1 = int.from_bytes(key[0:4], "little"), int.from_bytes(key[4:8], "little")
    return [_mix32_reference(_mix32_reference(j ^ k0) ^ k1) for j in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2**62 + 12345])
def test_random_bits_match_the_plain_python_specification(seed):
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    bits = random_bits32(seed, name, 2000)
    assert bits.tolist() == _reference_bits(seed, name, 2000)


def test_random_bits_known_vector():
    """Pinned output: a change here breaks every broadcast already written."""
    assert random_bits32(42, "x.lora_A.weight", 6).tolist() == _reference_bits(42, "x.lora_A.weight", 6)
    assert random_bits32(0, "m.lora_B.weight", 4).tolist() == [
        1015226817,
        3451191005,
        3583346670,
        947692311,
    ]


def test_seeded_mask_keeps_about_one_minus_p_and_depends_on_name_and_seed():
    shape = (256, 64)
    mask = seeded_keep_mask(7, "a.lora_B.weight", shape, 0.8)
    assert mask.shape == shape
    assert abs(mask.float().mean().item() - 0.2) < 0.01
    assert not torch.equal(mask, seeded_keep_mask(8, "a.lora_B.weight", shape, 0.8))
    assert not torch.equal(mask, seeded_keep_mask(7, "b.lora_B.weight", shape, 0.8))
    assert torch.equal(mask, seeded_keep_mask(7, "a.lora_B.weight", shape, 0.8))


def test_zero_sparsity_keeps_everything():
    assert keep_threshold(0.0) == 2**32
    assert bool(seeded_keep_mask(3, "n", (10, 10), 0.0).all())


def test_count_set_bits_matches_unpacked_sum():
    mask = torch.rand(1003, generator=torch.Generator().manual_seed(9)) < 0.4
    assert count_set_bits(pack_bits(mask)) == int(mask.sum())


@pytest.mark.parametrize("numel", [MASK_CHUNK - 1, MASK_CHUNK, 2 * MASK_CHUNK + 7])
def test_masks_drawn_in_chunks_match_the_specification_across_chunk_edges(numel):
    name = "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"
    k0, k1 = stream_key(5, name)
    edges = [0, 1, MASK_CHUNK - 1, MASK_CHUNK, MASK_CHUNK + 1, 2 * MASK_CHUNK, numel - 1]
    probes = sorted({j for j in edges if 0 <= j < numel})
    bits = random_bits32(5, name, numel)
    assert bits.shape == (numel,)
    assert [int(bits[j]) for j in probes] == [_mix32_reference(_mix32_reference(j ^ k0) ^ k1) for j in probes]
    threshold = keep_threshold(0.8)
    mask = seeded_keep_mask(5, name, (numel,), 0.8)
    assert torch.equal(mask, bits < threshold)
