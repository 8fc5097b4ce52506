"""Block-wise absmax quantization of a broadcast's kept values (int8, int4). Pure torch.

A broadcast that sends both factors densely carries r (d_out + d_in) values per module; in
4 bits that is about as many bytes as a one-factor broadcast at download sparsity 0.5 in
bf16, with an error of a few percent of each value instead of the mask's (docs/algorithms.md,
"Few, long rounds").

Values (n,) are cut into consecutive blocks of BLOCK (the last one shorter). Block j has
    scale_j = max_i |v_i| / qmax        (qmax = 2^(bits-1) - 1: 127 for int8, 7 for int4)
    code_i  = round(v_i / scale_j)      in [-qmax, qmax] (round half to even, torch.round)
    v'_i    = code_i * scale_j          (dequantized, float32)
so |v'_i - v_i| <= scale_j / 2 and an all-zero block has scale 0 and codes 0. int4 codes are
packed two per byte, the first in the low nibble, each stored as code + 8 (1..15; 0 unused).
"""

from __future__ import annotations

import math

import torch

BLOCK = 64
QUANTIZED_BITS = {"int8": 8, "int4": 4}


def qmax(bits: int) -> int:
    """The largest code magnitude of a signed `bits`-bit code: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


def block_count(n: int) -> int:
    """Blocks of BLOCK values that n values fill (the last one may be shorter)."""
    return math.ceil(n / BLOCK)


def quantize_blocks(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values (n,) float -> (codes (n,) int8 in [-qmax, qmax], scales (ceil(n / BLOCK),) float32).

    scale_j = max |v| over block j, / qmax; code = round(v / scale_j), 0 where scale_j = 0.
    Computed in float32, so dequantize_blocks(codes, scales) is what every reader computes.
    """
    n = values.numel()
    top = qmax(bits)
    flat = values.reshape(-1).float()
    padded = torch.zeros(block_count(n) * BLOCK, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.reshape(-1, BLOCK)  # (blocks, BLOCK)
    scales = blocks.abs().amax(dim=1) / top  # (blocks,)
    safe = torch.where(scales > 0, scales, torch.ones((), dtype=torch.float32))
    codes = torch.round(blocks / safe[:, None]).clamp(-top, top)
    codes = torch.where(scales[:, None] > 0, codes, torch.zeros((), dtype=torch.float32))
    return codes.reshape(-1)[:n].to(torch.int8), scales


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes (n,) int8, scales (ceil(n / BLOCK),) float32 -> values (n,) float32 = code * scale."""
    n = codes.numel()
    per_value = scales.float().repeat_interleave(BLOCK)[:n]  # (n,)
    return codes.float() * per_value


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes (n,) int8 in [-7, 7] -> (ceil(n / 2),) uint8: byte k = (c_2k + 8) | (c_2k+1 + 8) << 4.

    An odd n leaves the last byte's high nibble 0 (no code is stored as 0).
    """
    n = codes.numel()
    shifted = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)  # (n,) in 1..15
    padded = torch.zeros(2 * math.ceil(n / 2), dtype=torch.uint8)
    padded[:n] = shifted
    pairs = padded.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n / 2),) uint8 from pack_int4 -> codes (n,) int8 in [-7, 7].

    Raises ValueError when a nibble holds 0 (never written) or the byte count does not fit n.
    """
    if packed.numel() != math.ceil(n / 2):
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} 4-bit codes")
    low = (packed & 0x0F).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    nibbles = torch.stack((low, high), dim=1).reshape(-1)  # (2 ceil(n / 2),)
    if n % 2 == 1 and int(nibbles[-1]) != 0:
        raise ValueError("the unused last nibble is not 0")
    used = nibbles[:n]
    if bool((used == 0).any()):
        raise ValueError("a 4-bit code is 0, which pack_int4 never writes")
    return (used - 8).to(torch.int8)
