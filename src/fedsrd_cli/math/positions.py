"""Coded positions: a sparse boolean mask as Golomb-Rice coded gaps (docs/format.md, "Coded positions").

A mask of n elements, flattened row-major, keeps the c positions p_0 < p_1 < ... < p_{c-1}.
Its gaps are g_0 = p_0 and g_j = p_j - p_{j-1} - 1 (j >= 1), all >= 0. With the Rice
parameter k (0 <= k <= 31), gap g splits into the quotient q = g >> k and the remainder
r = g & (2^k - 1). The stream is two sections, bits packed most significant bit first:

    remainders: r_0, r_1, ..., r_{c-1}, each in exactly k bits, most significant bit first
    quotients:  for each j in order, q_j zero bits then a one bit (unary, "1" ends a run)

followed by zero bits up to a whole byte, so the stream is ceil((c k + sum_j (q_j + 1)) / 8)
bytes. Every Rice codeword is there, only stored as two sections: a reader finds all c
quotients at once from the positions of the one bits in the second section.

The writer's k is the smallest k in [0, 31] that minimises the stream's length in bits,
L(k) = c (k + 1) + sum_j (g_j >> k) (0 for an empty mask). L is convex in k
(L(k + 1) - L(k) = c - sum_j ceil((g_j >> k) / 2) never decreases), so the search walks up
from k = 0 and stops at the first k whose successor is not shorter.

The stored tensor `X.positions` is one byte k, then the stream. A writer stores it only
when it is strictly shorter than the 1-bit bitmap `X.mask` (ceil(n / 8) bytes), which
bounds what a reader decodes by the layout: at most n bits, c from the values' length.

Pure torch; no files.
"""

from __future__ import annotations

import math

import torch

from fedsrd_cli.math.masks import pack_bits, unpack_bits

MAX_RICE_K = 31


class PositionCodeError(ValueError):
    """A coded position stream that no writer following docs/format.md could have produced."""


def kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """Row-major indices of the set elements: mask (...) bool with n elements -> (c,) int64, increasing."""
    return mask.reshape(-1).nonzero().reshape(-1)


def position_gaps(positions: torch.Tensor) -> torch.Tensor:
    """(c,) increasing int64 positions -> (c,) int64 gaps: g_0 = p_0, g_j = p_j - p_{j-1} - 1."""
    previous = torch.cat([torch.tensor([-1], dtype=torch.int64), positions[:-1]])
    return positions - previous - 1


def rice_bits(gaps: torch.Tensor, k: int) -> int:
    """Stream length in bits (no padding) of (c,) int64 gaps with parameter k: c (k + 1) + sum(g >> k)."""
    return gaps.numel() * (k + 1) + int((gaps >> k).sum())


def rice_parameter(gaps: torch.Tensor) -> int:
    """The smallest k in [0, MAX_RICE_K] minimising rice_bits(gaps, k); 0 for no gaps.

    rice_bits is convex in k, so the first k whose successor is not shorter is the minimum.
    """
    k, best = 0, rice_bits(gaps, 0)
    while gaps.numel() and k < MAX_RICE_K:
        longer = rice_bits(gaps, k + 1)
        if longer >= best:
            break
        k, best = k + 1, longer
    return k


def rice_stream(gaps: torch.Tensor, k: int) -> torch.Tensor:
    """The two-section stream of (c,) int64 gaps >= 0 with parameter k -> (ceil(L / 8),) uint8.

    Bits [0, c k): the remainders, k bits each, most significant first; then, for each gap,
    q_j zeros and a one; zero padding to a whole byte. Packed as pack_bits packs masks.
    """
    count = gaps.numel()
    quotients = gaps >> k
    remainder_bits = count * k
    bits = torch.zeros(remainder_bits + int(quotients.sum()) + count, dtype=torch.uint8)
    if remainder_bits:
        shifts = torch.arange(k - 1, -1, -1, dtype=torch.int64)  # (k,): MSB first
        remainders = gaps & ((1 << k) - 1)
        bits[:remainder_bits] = ((remainders.reshape(-1, 1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    if count:
        ends = remainder_bits + torch.cumsum(quotients + 1, dim=0) - 1  # the one bit ending run j
        bits[ends] = 1
    return pack_bits(bits)


def encode_positions(mask: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Code a mask's kept positions: mask (...) bool -> (k, stream (bytes,) uint8).

    k = rice_parameter(gaps) and stream = rice_stream(gaps, k), gaps of the row-major
    positions of mask's set elements (see the module docstring).
    """
    gaps = position_gaps(kept_positions(mask))
    k = rice_parameter(gaps)
    return k, rice_stream(gaps, k)


def decode_positions(data: torch.Tensor, k: int, numel: int, count: int) -> torch.Tensor:
    """Inverse of encode_positions: (bytes,) uint8 stream -> (numel,) bool mask with `count` set.

    The mask of decode_position_indices' positions (which validates the stream first).
    """
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[decode_position_indices(data, k, numel, count)] = True
    return mask


def decode_position_indices(data: torch.Tensor, k: int, numel: int, count: int) -> torch.Tensor:
    """The kept positions a stream codes: (bytes,) uint8 -> (count,) int64, increasing, < numel.

    Validates everything (PositionCodeError, one line): k in [0, 31], count in [0, numel],
    a stream long enough for count remainders, exactly count one bits in the quotient
    section (fewer: it ends early; more: another count), nothing but zero padding (fewer
    than 8 bits) after the last one, no quotient above (numel - 1) >> k, and a last
    position below numel. Memory: O(16 * bytes + 8 * count * (k + 2)) for the stream and
    the codewords, whatever the stream holds, and nothing of size numel.
    """
    if not 0 <= k <= MAX_RICE_K:
        raise PositionCodeError(f"Rice parameter k = {k} is outside [0, {MAX_RICE_K}]")
    if not 0 <= count <= numel:
        raise PositionCodeError(f"{count} kept positions cannot fit {numel} elements")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise PositionCodeError(f"the stream must be 1-D uint8, not {data.dtype} {list(data.shape)}")
    stream_bits = data.numel() * 8
    remainder_bits = count * k
    if remainder_bits > stream_bits:
        raise PositionCodeError(
            f"the stream ends early: {stream_bits} bits cannot hold {count} remainders of {k} bits"
        )
    bits = unpack_bits(data, stream_bits)  # (stream_bits,) bool
    unary = bits[remainder_bits:]
    runs = int(unary.sum())
    if runs < count:
        raise PositionCodeError(f"the stream ends early: {runs} of {count} gaps are complete")
    if runs > count:
        raise PositionCodeError(f"the stream codes {runs} positions, but {count} values are stored")
    ends = unary.nonzero().reshape(-1)  # (count,) the one bit ending each quotient's run
    used = remainder_bits + (int(ends[-1]) + 1 if count else 0)
    if data.numel() != math.ceil(used / 8):
        raise PositionCodeError(
            f"{data.numel() * 8 - used} bits follow the last codeword (at most 7 bits of padding allowed)"
        )
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    previous = torch.cat([torch.tensor([-1], dtype=torch.int64), ends[:-1]])
    quotients = ends - previous - 1  # (count,)
    longest = int(quotients.max())
    if longest > (numel - 1) >> k:
        raise PositionCodeError(
            f"a unary run of {longest} is longer than possible (gaps below {numel} allow {(numel - 1) >> k})"
        )
    if k:
        weights = torch.tensor([1 << (k - 1 - i) for i in range(k)], dtype=torch.int64)  # (k,)
        remainders = (bits[:remainder_bits].reshape(count, k).to(torch.int64) * weights).sum(dim=1)
    else:
        remainders = torch.zeros(count, dtype=torch.int64)
    # p_last = sum_j (g_j + 1) - 1, in Python integers: no int64 overflow whatever the stream holds.
    last = (int(quotients.sum()) << k) + int(remainders.sum()) + count - 1
    if last >= numel:
        raise PositionCodeError(f"position {last} is past the tensor's {numel} elements")
    return torch.cumsum((quotients << k) + remainders + 1, dim=0) - 1  # every partial sum <= last


# --------------------------------------------------------------------------- the stored tensors


def positions_tensor(mask: torch.Tensor) -> torch.Tensor:
    """X.positions of a mask: (1 + stream bytes,) uint8, byte 0 = k, then encode_positions' stream."""
    k, stream = encode_positions(mask)
    return _with_parameter(k, stream)


def _with_parameter(k: int, stream: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.tensor([k], dtype=torch.uint8), stream])


def read_positions_tensor(stored: torch.Tensor, numel: int, count: int) -> torch.Tensor:
    """The positions an X.positions tensor codes: (1 + stream bytes,) uint8 -> (count,) int64.

    Inverse of positions_tensor up to the mask (PositionCodeError if bad). The tensor must
    be shorter than the bitmap, ceil(numel / 8) bytes (writers store the smaller), so
    decoding never reads more than numel bits.
    """
    if stored.dtype != torch.uint8 or stored.dim() != 1:
        raise PositionCodeError(f"positions must be 1-D uint8, not {stored.dtype} {list(stored.shape)}")
    if not 1 <= stored.numel() < math.ceil(numel / 8):
        raise PositionCodeError(
            f"{stored.numel()} bytes of positions for {numel} elements: must be 1 to"
            f" {math.ceil(numel / 8) - 1} bytes (shorter than the {math.ceil(numel / 8)}-byte bitmap)"
        )
    return decode_position_indices(stored[1:], int(stored[0]), numel, count)


def store_mask(kept: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """The smaller stored form of an upload's mask: (True, X.positions) or (False, X.mask).

    kept: (...) bool with n elements. The coded positions (positions_tensor) when they are
    strictly shorter than the bitmap's ceil(n / 8) bytes, else the bitmap (pack_bits), as before.
    The caller names the tensor (files.naming.positions_key or mask_key).
    """
    gaps = position_gaps(kept_positions(kept))
    k = rice_parameter(gaps)
    if 1 + math.ceil(rice_bits(gaps, k) / 8) < math.ceil(kept.numel() / 8):
        return True, _with_parameter(k, rice_stream(gaps, k))
    return False, pack_bits(kept)
