"""Coded positions (math/positions.py) against a plain-Python reading of docs/format.md."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsrd_cli.math.masks import pack_bits
from fedsrd_cli.math.positions import (
    MAX_RICE_K,
    PositionCodeError,
    decode_positions,
    encode_positions,
    position_gaps,
    positions_tensor,
    read_positions_tensor,
    rice_bits,
    rice_parameter,
    store_mask,
)

# --------------------------------------------------------------------------- the reference


def reference_encode(positions: list[int]) -> tuple[int, bytes]:
    """docs/format.md, "Coded positions", bit by bit: (k, stream) of increasing positions."""
    gaps = [p - (positions[j - 1] if j else -1) - 1 for j, p in enumerate(positions)]
    lengths = [len(gaps) * (k + 1) + sum(g >> k for g in gaps) for k in range(MAX_RICE_K + 1)]
    k = lengths.index(min(lengths))  # the smallest k of minimal length
    bits: list[int] = []
    for g in gaps:
        bits += [(g & ((1 << k) - 1)) >> (k - 1 - i) & 1 for i in range(k)]
    for g in gaps:
        bits += [0] * (g >> k) + [1]
    bits += [0] * (-len(bits) % 8)
    return k, bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def reference_decode(data: bytes, k: int, numel: int, count: int) -> list[int] | None:
    """The positions a stream codes, or None where a reader must refuse it."""
    if not 0 <= k <= MAX_RICE_K or not 0 <= count <= numel:
        return None
    bits = [(byte >> (7 - i)) & 1 for byte in data for i in range(8)]
    at = 0
    remainders = []
    for _ in range(count):
        if at + k > len(bits):
            return None  # ends early
        remainders.append(int("".join(map(str, bits[at : at + k])) or "0", 2))
        at += k
    positions, previous = [], -1
    for r in remainders:
        q = 0
        while True:
            if at >= len(bits):
                return None  # ends early
            at += 1
            if bits[at - 1]:
                break
            q += 1
        previous += (q << k) + r + 1
        if previous >= numel:
            return None  # past the end
        positions.append(previous)
    if len(bits) - at >= 8 or any(bits[at:]):
        return None  # more than padding, or padding that is not zero
    return positions


def reference_read(stored: bytes, numel: int, count: int) -> list[int] | None:
    """X.positions: byte k, then the stream; shorter than the ceil(numel / 8)-byte bitmap."""
    if not 1 <= len(stored) < math.ceil(numel / 8):
        return None
    return reference_decode(stored[1:], stored[0], numel, count)


def _mask(numel: int, positions: list[int]) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    return mask


def _random_mask(numel: int, density: float, seed: int) -> torch.Tensor:
    return torch.rand(numel, generator=torch.Generator().manual_seed(seed)) < density


# --------------------------------------------------------------------------- known vector and round trips


def test_known_vector():
    """Pinned (docs/format.md): a change here breaks every upload already written."""
    mask = _mask(64, [3, 4, 17, 40, 41, 63]).reshape(8, 8)
    k, stream = encode_positions(mask)
    assert k == 3
    assert bytes(stream.tolist()) == bytes.fromhex("626174c8")
    assert positions_tensor(mask).tolist() == [0x03, 0x62, 0x61, 0x74, 0xC8]
    assert store_mask(mask)[1].tolist() == [0x03, 0x62, 0x61, 0x74, 0xC8]
    assert reference_encode([3, 4, 17, 40, 41, 63]) == (3, bytes.fromhex("626174c8"))
    assert reference_read(bytes.fromhex("03626174c8"), 64, 6) == [3, 4, 17, 40, 41, 63]
    assert read_positions_tensor(positions_tensor(mask), 64, 6).tolist() == [3, 4, 17, 40, 41, 63]


@pytest.mark.parametrize(
    ("numel", "density"),
    [(1, 0.0), (1, 1.0), (9, 0.5), (128, 0.15), (1000, 0.04), (4096, 0.001), (5000, 0.6), (3000, 1.0)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_code_matches_the_reference_and_round_trips(numel, density, seed):
    mask = _random_mask(numel, density, seed)
    positions = mask.nonzero().reshape(-1).tolist()
    k, stream = encode_positions(mask)
    assert (k, bytes(stream.tolist())) == reference_encode(positions)
    assert reference_decode(bytes(stream.tolist()), k, numel, len(positions)) == positions
    assert torch.equal(decode_positions(stream, k, numel, len(positions)), mask)


@pytest.mark.parametrize(
    "positions",
    [[], [0], [4999], [0, 4999], list(range(5000)), [2**20 - 1], [5, 2**20 - 1]],
)
def test_edge_masks_round_trip(positions):
    numel = max(5000, positions[-1] + 1 if positions else 0)
    mask = _mask(numel, positions)
    k, stream = encode_positions(mask)
    assert (k, bytes(stream.tolist())) == reference_encode(positions)
    assert torch.equal(decode_positions(stream, k, numel, len(positions)), mask)


def test_one_position_far_out_takes_a_large_k():
    gaps = position_gaps(torch.tensor([2**31 - 2]))  # one kept element, the last of 2^31 - 1
    k = rice_parameter(gaps)
    assert k == 30 and rice_bits(gaps, k) == 32  # 30 remainder bits, then q = 1: "01" (k = 31 ties)


def test_rice_parameter_is_the_smallest_minimiser():
    generator = torch.Generator().manual_seed(3)
    for trial in range(40):
        numel = int(torch.randint(1, 20000, (1,), generator=generator))
        density = float(torch.rand(1, generator=generator)) ** 3
        gaps = position_gaps(_random_mask(numel, density, trial).nonzero().reshape(-1))
        lengths = [rice_bits(gaps, k) for k in range(MAX_RICE_K + 1)]
        assert rice_parameter(gaps) == lengths.index(min(lengths))


# --------------------------------------------------------------------------- the stored form


@pytest.mark.parametrize(("numel", "density"), [(8, 0.1), (64, 0.5), (4096, 0.04), (4096, 0.5), (100, 0.0)])
def test_store_mask_keeps_the_smaller_form(numel, density):
    mask = _random_mask(numel, density, 5)
    coded, stored = store_mask(mask)
    bitmap = math.ceil(numel / 8)
    assert coded == (positions_tensor(mask).numel() < bitmap)
    assert torch.equal(stored, positions_tensor(mask) if coded else pack_bits(mask))


def test_sparse_masks_cost_near_their_entropy():
    numel, density = 2**19, 0.04
    mask = _random_mask(numel, density, 7)
    entropy_bits = numel * -(density * math.log2(density) + (1 - density) * math.log2(1 - density))
    coded_bits = 8 * positions_tensor(mask).numel()
    assert coded_bits < 1.03 * entropy_bits  # and the bitmap is 1 / 0.242 = 4.1x the entropy


# --------------------------------------------------------------------------- refusals


def _stream(numel: int = 1000, density: float = 0.05, seed: int = 0) -> tuple[int, torch.Tensor, int]:
    mask = _random_mask(numel, density, seed)
    k, stream = encode_positions(mask)
    return k, stream, int(mask.sum())


def _refused(data: torch.Tensor, k: int, numel: int, count: int, words: str) -> None:
    with pytest.raises(PositionCodeError, match=words) as caught:
        decode_positions(data, k, numel, count)
    assert "\n" not in str(caught.value)
    assert reference_decode(bytes(data.tolist()), k, numel, count) is None


def test_k_out_of_range_is_refused():
    k, stream, count = _stream()
    _refused(stream, 32, 1000, count, "outside")
    _refused(stream, -1, 1000, count, "outside")


def test_a_stream_that_ends_early_is_refused():
    k, stream, count = _stream()
    _refused(stream[:-2], k, 1000, count, "ends early")
    _refused(stream[: count * k // 8 - 1], k, 1000, count, "ends early")  # not even the remainders
    _refused(stream, k, 1000, count + 1, "ends early")


def test_more_positions_than_values_is_refused():
    k, stream, count = _stream()
    _refused(stream, k, 1000, count - 1, "codes")


def test_trailing_bytes_or_bits_are_refused():
    k, stream, count = _stream()
    _refused(torch.cat([stream, torch.zeros(1, dtype=torch.uint8)]), k, 1000, count, "bits follow")
    last = stream.clone()
    assert last[-1] & 1 == 0  # a pad bit (a used last bit would be a run's closing one)
    last[-1] |= 1
    _refused(last, k, 1000, count, "codes")


def test_a_position_past_numel_is_refused():
    mask = _mask(1000, [10, 990])
    k, stream = encode_positions(mask)
    _refused(stream, k, 990, 2, "past")
    _refused(stream, k, 989, 2, "past|longer than possible")


def test_unary_runs_longer_than_possible_are_refused():
    # k = 0, one gap of 20 zeros: q = 20 > numel - 1 = 9
    data = torch.tensor(pack_bits(torch.tensor([0] * 20 + [1], dtype=torch.bool)).tolist(), dtype=torch.uint8)
    _refused(data, 0, 10, 1, "longer than possible")


def test_count_above_numel_is_refused():
    _refused(torch.zeros(0, dtype=torch.uint8), 0, 4, 5, "cannot fit")


def test_stored_positions_must_be_shorter_than_the_bitmap():
    mask = _mask(64, [3, 4, 17, 40, 41, 63])
    stored = positions_tensor(mask)
    with pytest.raises(PositionCodeError, match="shorter than"):
        read_positions_tensor(stored, 40, 6)  # a 5-byte bitmap: 5 bytes of positions are refused
    with pytest.raises(PositionCodeError, match="shorter than"):
        read_positions_tensor(torch.zeros(0, dtype=torch.uint8), 64, 0)
    assert reference_read(bytes(stored.tolist()), 40, 6) is None


# --------------------------------------------------------------------------- fuzzing against the reference

FUZZ = settings(max_examples=300, deadline=2000, derandomize=True)


def _agrees(data: bytes, k: int, numel: int, count: int) -> None:
    """The torch decoder accepts exactly what the reference accepts, with the same positions."""
    expected = reference_decode(data, k, numel, count)
    try:
        mask = decode_positions(torch.tensor(list(data), dtype=torch.uint8), k, numel, count)
    except PositionCodeError:
        assert expected is None
        return
    assert expected is not None
    assert mask.nonzero().reshape(-1).tolist() == expected


@FUZZ
@given(
    numel=st.integers(1, 600),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=3),
    cut=st.integers(-2, 2),
    dk=st.integers(-2, 2),
    dcount=st.integers(-2, 2),
    dnumel=st.integers(-3, 3),
)
def test_corrupted_streams_are_refused_or_decoded_as_the_reference_does(
    numel, density, seed, flips, cut, dk, dcount, dnumel
):
    mask = _random_mask(numel, density, seed)
    k, stream = encode_positions(mask)
    raw = bytearray(stream.tolist())
    for at, bit in flips:
        if raw:
            raw[at % len(raw)] ^= 1 << bit
    raw = raw[: len(raw) + cut] if cut < 0 else raw + bytes(cut)
    _agrees(bytes(raw), k + dk, max(1, numel + dnumel), max(0, int(mask.sum()) + dcount))


@FUZZ
@given(
    data=st.binary(max_size=40),
    k=st.integers(-1, 33),
    numel=st.integers(1, 400),
    count=st.integers(0, 60),
)
def test_arbitrary_bytes_are_refused_or_decoded_as_the_reference_does(data, k, numel, count):
    _agrees(data, k, numel, count)
