"""Secret randomness: Poisson sampling and Gaussian noise for DP, mask words for secure aggregation.

A differential-privacy guarantee assumes that nobody can predict which records (or sites)
a step samples, nor the noise it adds. torch's own generator (a Mersenne Twister) is not
built for that, and a seed written into a file would give the noise away. So every draw
comes from a ChaCha20 keystream (the `cryptography` package, i.e. OpenSSL) under a 256-bit
key from os.urandom; nothing about the key is ever written. A known key (`for_tests`)
makes a run reproducible and is for tests only: its noise protects nothing.

From the keystream:
  uniform:  u = (x >> 11 + 1) * 2^-53 for each 64-bit word x, so u is in (0, 1] with 53 bits
  normal:   Box-Muller, z = sqrt(-2 ln u1) * cos(2 pi u2), in float64
  Poisson sampling of n items at rate q: item i is taken when u_i < q (independently)
  32-bit words: the keystream read 4 bytes at a time (little-endian); 16-bit words: 2 bytes
A key derived from a shared secret (trust/agreement.py) gives two parties the same words.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch

_WORD_BYTES = 8
_MAX_BLOCK_WORDS = 2**22  # 32 MiB of keystream per call to OpenSSL


class SecretRandom:
    """A ChaCha20 keystream read as uniforms and normals. One instance per release."""

    def __init__(self, key: bytes | None = None):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("a ChaCha20 key has 32 bytes")
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    @classmethod
    def for_tests(cls, seed: int) -> SecretRandom:
        """A reproducible stream (key = sha256 of the seed). Never for a real release."""
        return cls(hashlib.sha256(f"fedsrd-test-randomness:{seed}".encode()).digest())

    def _words(self, count: int) -> torch.Tensor:
        """(count,) int64 words of the keystream."""
        parts = []
        while count > 0:
            take = min(count, _MAX_BLOCK_WORDS)
            raw = self._stream.update(bytes(take * _WORD_BYTES))
            parts.append(torch.frombuffer(bytearray(raw), dtype=torch.int64))
            count -= take
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def words32(self, count: int) -> torch.Tensor:
        """(count,) int64 holding uniform 32-bit words, in [0, 2^32) (secure aggregation's masks)."""
        return self.words(count, 32)

    def words(self, count: int, bits: int) -> torch.Tensor:
        """(count,) int64 holding uniform `bits`-bit words (16 or 32), in [0, 2^bits): the keystream
        read bits / 8 bytes at a time, little-endian."""
        dtype = {16: torch.int16, 32: torch.int32}[bits]
        parts = []
        while count > 0:
            take = min(count, 2 * _MAX_BLOCK_WORDS)
            raw = self._stream.update(bytes(take * bits // 8))
            parts.append(torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.int64) % 2**bits)
            count -= take
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def uniform(self, count: int) -> torch.Tensor:
        """(count,) float64 uniforms in (0, 1]."""
        if count == 0:
            return torch.empty(0, dtype=torch.float64)
        words = self._words(count)
        top = torch.bitwise_right_shift(words, 11) & ((1 << 53) - 1)  # 53 uniform bits, non-negative
        return (top.double() + 1.0) * 2.0**-53

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        """A float64 tensor of `shape` with independent N(0, std^2) entries (Box-Muller)."""
        count = math.prod(shape)
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs).reshape(2, pairs)
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = 2.0 * math.pi * u[1]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
        return (z * std).reshape(shape)

    def poisson_sample(self, count: int, rate: float) -> list[int]:
        """Indices of `count` items, each kept independently with probability `rate`."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"a sampling rate is in [0, 1], got {rate}")
        if rate == 1.0:
            return list(range(count))
        return torch.nonzero(self.uniform(count) < rate).reshape(-1).tolist()
