"""Fixed point modulo 2^b (b = 16 or 32 bits): the arithmetic of secure aggregation's masked uploads.

A value x in [-X, X] from one of n parties is encoded as the integer round(x * s) modulo 2^b,
with the scale

    L = floor((2^(b-1) - 1) / n)     the largest |integer| one party may add
    s = floor(L / X)                 so |round(x * s)| <= round(X * s) <= L

and the true sum of the n integers lies in [-n L, n L], inside [-(2^(b-1) - 1), 2^(b-1) - 1]:
the sum modulo 2^b, read as a signed b-bit integer, is the sum itself (no wrap, whatever the
values and their rounding), and dividing it by s gives sum_i x_i within n / (2 s) (each rounding
is at most half a step). Each party's value then has L levels on either side of 0 (the word's
precision): a roster allows no more parties than leave MIN_LEVELS (max_parties).

Masks are uniform b-bit words added modulo 2^b; pairs of opposite masks cancel in the sum.
Integers are held as int64 tensors in [0, 2^b) while computing and stored as int32 or int16
(the same b bits). Pure torch.
"""

from __future__ import annotations

import torch

WORD_BITS = (16, 32)
MODULUS = 2**32  # the 32-bit words' modulus (the default width)
HALF = 2**31
# Every party's value range gets at least this many levels on either side of 0 (8 bits).
MIN_LEVELS = 255
STORED_DTYPES = {16: torch.int16, 32: torch.int32}


def _check_bits(bits: int) -> None:
    if bits not in WORD_BITS:
        raise ValueError(f"fixed-point words are 16 or 32 bits, not {bits}")


def modulus(bits: int = 32) -> int:
    """2^b: what the words are taken modulo."""
    _check_bits(bits)
    return 2**bits


def levels(parties: int, bits: int = 32) -> int:
    """L = floor((2^(b-1) - 1) / parties): the largest |integer| one of `parties` may add."""
    _check_bits(bits)
    if parties < 1:
        raise ValueError("the parties must be at least one")
    return (2 ** (bits - 1) - 1) // parties


def max_parties(bits: int) -> int:
    """The most parties whose sum of b-bit words keeps MIN_LEVELS levels each (16 bits: 128)."""
    _check_bits(bits)
    return (2 ** (bits - 1) - 1) // MIN_LEVELS


def scale_for(clip: float, parties: int, bits: int = 32) -> int:
    """s = floor(L / X), L = levels(parties, bits): the largest scale whose sum cannot wrap."""
    if not clip > 0:
        raise ValueError("the clip must be > 0")
    scale = int(levels(parties, bits) // clip)
    if scale < 1:
        raise ValueError(f"a clip of {clip:g} over {parties} parties leaves no fixed-point precision")
    return scale


def encode(values: torch.Tensor, scale: int, bits: int = 32) -> torch.Tensor:
    """float tensor (any shape) -> int64 words in [0, 2^b): round(x * scale) mod 2^b."""
    integers = torch.round(values.double() * scale).to(torch.int64)
    return torch.remainder(integers, modulus(bits))


def add(words: torch.Tensor, other: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """(words + other) mod 2^b, both int64 in [0, 2^b)."""
    return torch.remainder(words + other, modulus(bits))


def subtract(words: torch.Tensor, other: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """(words - other) mod 2^b, both int64 in [0, 2^b)."""
    return torch.remainder(words - other, modulus(bits))


def decode(words: torch.Tensor, scale: int, bits: int = 32) -> torch.Tensor:
    """int64 words in [0, 2^b) -> float64: the word read as a signed b-bit integer, / scale."""
    return signed(words, bits).double() / scale


def signed(words: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """int64 words in [0, 2^b) -> int64 in [-2^(b-1), 2^(b-1)): the same b bits, signed."""
    half = modulus(bits) // 2
    return torch.where(words >= half, words - 2 * half, words)


def to_stored(words: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """int64 words in [0, 2^b) -> int32 or int16 with the same b bits (what a file stores)."""
    return signed(words, bits).to(STORED_DTYPES[bits])


def from_stored(stored: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """int32 or int16 as stored -> int64 words in [0, 2^b)."""
    return torch.remainder(stored.to(torch.int64), modulus(bits))


# --------------------------------------------------------------------------- a masked total
#
# One nonnegative figure per party (its squared update norm, for FedExP's step) summed under the
# same masks: v in [0, V] is coded as the integer k = round(v / V * K), K = 2^TOTAL_BITS - 1,
# split into limbs of c = b - ceil(log2 n) bits, k = sum_j k_j 2^(c j), 0 <= k_j < 2^c. The n
# parties' limbs j sum to less than n 2^c <= 2^b, so each limb's sum modulo 2^b is its sum; the
# total sum_i k_i = sum_j (sum_i k_ij) 2^(c j) is exact, and sum_i v_i is read back within
# n V / (2 K) (each rounding is at most half a step).

TOTAL_BITS = 53  # a double's precision: the relative step of one party's figure is 2^-53 of V


def limb_bits(parties: int, bits: int = 32) -> int:
    """c = b - ceil(log2 parties): the most bits a limb may hold so that the sum cannot wrap."""
    _check_bits(bits)
    if parties < 1:
        raise ValueError("the parties must be at least one")
    return bits - (parties - 1).bit_length()


def limb_count(parties: int, bits: int = 32) -> int:
    """How many limbs carry TOTAL_BITS bits: ceil(TOTAL_BITS / c)."""
    return -(-TOTAL_BITS // limb_bits(parties, bits))


def encode_total(value: float, bound: float, parties: int, bits: int = 32) -> torch.Tensor:
    """v in [0, bound] -> int64 limbs (limb_count,) in [0, 2^c): k = round(v / bound * K),
    clamped to [0, K] (K = 2^TOTAL_BITS - 1), least significant limb first."""
    if not (bound > 0 and value >= 0):
        raise ValueError(f"a masked total codes a value in [0, bound], got {value} and bound {bound}")
    top = 2**TOTAL_BITS - 1
    integer = min(round(value / bound * top), top)
    width = limb_bits(parties, bits)
    count = limb_count(parties, bits)
    return torch.tensor(
        [(integer >> (width * j)) & ((1 << width) - 1) for j in range(count)], dtype=torch.int64
    )


def decode_total(words: torch.Tensor, bound: float, parties: int, bits: int = 32) -> float:
    """The limbs of `parties` totals summed modulo 2^b (int64 (limb_count,) in [0, 2^b)) ->
    sum_i v_i = (sum_j w_j 2^(c j)) / K * bound."""
    width = limb_bits(parties, bits)
    integer = sum(int(w) << (width * j) for j, w in enumerate(words.tolist()))
    return integer / (2**TOTAL_BITS - 1) * bound
