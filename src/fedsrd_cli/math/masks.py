"""Masks: 1-bit packing and the portable random download mask.

Bit packing (docs/format.md, "Sparse tensors"): a boolean mask of n elements,
flattened row-major, becomes ceil(n / 8) bytes; element i is bit (7 - i % 8) of
byte i // 8 (most significant bit first, as numpy.packbits does); pad bits are 0.

Download mask (docs/format.md, "Seeded masks"): element j (row-major index) of
tensor NAME is kept when h(j) < T, where
    key      = sha256(f"{seed}:{NAME}".encode("utf-8"))
    k0, k1   = little-endian uint32 of key[0:4] and key[4:8]
    h(j)     = mix32(mix32(j XOR k0) XOR k1)
    mix32(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
               (all arithmetic modulo 2^32)
    T        = floor((1 - p) * 2^32)   (float64), p = download sparsity in [0, 1)
Only integer operations, so every machine, language and torch version gets the
same bits. Pure torch; no files.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into bytes, most significant bit first.

    mask: (...) bool with n elements -> (ceil(n / 8),) uint8
    byte[i // 8] has bit (7 - i % 8) set iff mask.flatten()[i].
    """
    flat = mask.reshape(-1).to(torch.uint8)
    n = flat.numel()
    padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8)
    padded[:n] = flat
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: (ceil(numel / 8),) uint8 -> (numel,) bool."""
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS) != 0  # (bytes, 8)
    return bits.reshape(-1)[:numel]


def padding_is_clean(packed: torch.Tensor, numel: int) -> bool:
    """True when the pad bits after element numel - 1 (all in the last byte) are zero."""
    pad = packed.numel() * 8 - numel
    if pad == 0 or packed.numel() == 0:
        return True
    return int(packed.reshape(-1)[-1]) & ((1 << pad) - 1) == 0


_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


def count_set_bits(packed: torch.Tensor) -> int:
    """Number of set bits in a (bytes,) uint8 tensor, via a 256-entry table (no unpacking)."""
    return int(_POPCOUNT[packed.reshape(-1).long()].sum())


def _mul32_(x: torch.Tensor, const: int) -> torch.Tensor:
    """x = (x * const) mod 2^32 in place, for int64 tensors holding values < 2^32, without overflow."""
    lo = const & _MASK16
    hi = const >> 16
    # x * lo < 2^48 and ((x * hi) mod 2^16) << 16 < 2^32: nothing leaves int64.
    high = (x * hi).bitwise_and_(_MASK16).bitwise_left_shift_(16)
    return x.mul_(lo).add_(high).bitwise_and_(_MASK32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 in place (a mask's millions of elements: in-place steps allocate one temporary, not ten)."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, _MUL1)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, _MUL2)
    return x.bitwise_xor_(x >> 16)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (bijective), on int64 tensors holding uint32 values.

    x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16 (mod 2^32)
    """
    return _mix32_(x.clone())


def text_seed(text: str) -> int:
    """sha256(text) read as a 60-bit integer (its first 15 hex digits): every seed derived from
    public names and hashes (upload masks, randomized sketches, update sketches)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def stream_key(seed: int, name: str) -> tuple[int, int]:
    """The two 32-bit keys of tensor NAME's mask: sha256(f"{seed}:{name}")[0:8], little-endian."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


# Masks are drawn this many elements at a time: the mixer's dozen passes over a chunk stay in
# the cache (a whole factor's int64 hashes, 4 MB for 8192 x 64, do not), and a chunk is small
# enough to run on one thread, which a busy machine does not stall. The bits are the same.
MASK_CHUNK = 2**15


def _bits_into(out: torch.Tensor, start: int, k0: int, k1: int) -> torch.Tensor:
    """out (c,) int64 := h(j) for j = start .. start + c - 1, in place."""
    torch.arange(start, start + out.numel(), dtype=torch.int64, out=out).bitwise_xor_(k0)  # j ^ k0
    return _mix32_(_mix32_(out).bitwise_xor_(k1))  # mix32(mix32(j ^ k0) ^ k1)


def random_bits32(seed: int, name: str, numel: int) -> torch.Tensor:
    """h(j) for j = 0 .. numel-1: (numel,) int64 holding uint32 values (MASK_CHUNK at a time)."""
    if numel >= 2**32:
        raise ValueError("seeded masks address at most 2^32 elements per tensor")
    k0, k1 = stream_key(seed, name)
    bits = torch.empty(numel, dtype=torch.int64)
    for start in range(0, numel, MASK_CHUNK):
        _bits_into(bits[start : start + MASK_CHUNK], start, k0, k1)
    return bits


def keep_threshold(drop_prob: float) -> int:
    """T = floor((1 - p) * 2^32): element j is kept iff h(j) < T."""
    return math.floor((1.0 - drop_prob) * 4294967296.0)


def seeded_keep_mask(seed: int, name: str, shape: tuple[int, ...], drop_prob: float) -> torch.Tensor:
    """The download mask of tensor NAME: each element kept with probability 1 - p.

    -> bool tensor of `shape`; mask.flatten()[j] = h(j) < floor((1 - p) * 2^32).
    Drawn MASK_CHUNK elements at a time, so only one chunk's hashes exist at once.
    """
    numel = math.prod(shape)
    if numel >= 2**32:
        raise ValueError("seeded masks address at most 2^32 elements per tensor")
    k0, k1 = stream_key(seed, name)
    threshold = keep_threshold(drop_prob)
    mask = torch.empty(numel, dtype=torch.bool)
    bits = torch.empty(min(numel, MASK_CHUNK), dtype=torch.int64)
    for start in range(0, numel, MASK_CHUNK):
        chunk = bits[: min(MASK_CHUNK, numel - start)]
        torch.lt(_bits_into(chunk, start, k0, k1), threshold, out=mask[start : start + chunk.numel()])
    return mask.reshape(shape)


def count_kept(seed: int, name: str, numel: int, drop_prob: float, chunk: int = 2**15) -> int:
    """seeded_keep_mask(seed, name, (numel,), drop_prob).sum(), in chunks of `chunk` elements.

    Memory is O(chunk) whatever numel is: h(j) is computed for j in [start, start + chunk).
    """
    if numel >= 2**32:
        raise ValueError("seeded masks address at most 2^32 elements per tensor")
    k0, k1 = stream_key(seed, name)
    threshold = keep_threshold(drop_prob)
    kept = 0
    for start in range(0, numel, chunk):
        x = torch.arange(start, min(numel, start + chunk), dtype=torch.int64).bitwise_xor_(k0)
        kept += int((_mix32_(_mix32_(x).bitwise_xor_(k1)) < threshold).sum())
    return kept
