"""Fixed point modulo 2^32: the arithmetic of secure aggregation's masked uploads.

A value x in [-X, X] is encoded as the integer round(x * s) modulo 2^32, with the scale

    s = floor((2^31 - 1) / (n X))

for a sum of n such values: the true sum of the integers then lies in [-(2^31 - 1), 2^31 - 1],
so the sum modulo 2^32, read as a signed 32-bit integer, is the sum itself, and dividing it by s
gives sum_i x_i within n / (2 s) (each rounding is at most half a step). Masks are uniform words
added modulo 2^32; pairs of opposite masks cancel in the sum. Integers are held as int64 tensors
in [0, 2^32) while computing and stored as int32 (the same 32 bits). Pure torch.
"""

from __future__ import annotations

import torch

MODULUS = 2**32
HALF = 2**31


def scale_for(clip: float, parties: int) -> int:
    """s = floor((2^31 - 1) / (parties * clip)): the largest scale whose sum cannot wrap."""
    if not clip > 0 or parties < 1:
        raise ValueError("the clip must be > 0 and the parties at least one")
    scale = int((HALF - 1) // (parties * clip))
    if scale < 1:
        raise ValueError(f"a clip of {clip:g} over {parties} parties leaves no fixed-point precision")
    return scale


def encode(values: torch.Tensor, scale: int) -> torch.Tensor:
    """float tensor (any shape) -> int64 words in [0, 2^32): round(x * scale) mod 2^32."""
    integers = torch.round(values.double() * scale).to(torch.int64)
    return torch.remainder(integers, MODULUS)


def add(words: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(words + other) mod 2^32, both int64 in [0, 2^32)."""
    return torch.remainder(words + other, MODULUS)


def subtract(words: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(words - other) mod 2^32, both int64 in [0, 2^32)."""
    return torch.remainder(words - other, MODULUS)


def decode(words: torch.Tensor, scale: int) -> torch.Tensor:
    """int64 words in [0, 2^32) -> float64: the word read as a signed 32-bit integer, / scale."""
    signed = torch.where(words >= HALF, words - MODULUS, words)
    return signed.double() / scale


def to_stored(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same 32 bits (what a file stores)."""
    return torch.where(words >= HALF, words - MODULUS, words).to(torch.int32)


def from_stored(stored: torch.Tensor) -> torch.Tensor:
    """int32 as stored -> int64 words in [0, 2^32)."""
    return torch.remainder(stored.to(torch.int64), MODULUS)
