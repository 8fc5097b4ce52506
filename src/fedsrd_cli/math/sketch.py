"""A tensor sketch of full-rank updates held as thin factors (Pham and Pagh, KDD 2013).

A site's update D = B' A' - B A is (d_out, d_in) per module; its sketch is k numbers for the
whole model, and the inner product of two sketches estimates <D, D'>_F without bias. With a
count sketch (h_out, s_out) of the rows and (h_in, s_in) of the columns of a module, buckets
h in [0, k) and signs s in {-1, +1}, drawn independently per module,

    TS(D)[b] = sum over (i, j) with (h_out(i) + h_in(j)) mod k = b of s_out(i) s_in(j) D[i, j]

so E <TS(D), TS(D')> = <D, D'>, and the sketch of the model is the sum of its modules'. A thin
product D = sum_t l_t r_t^T sketches without forming D: TS(l r^T) is the circular convolution
of the count sketches C_out(l) and C_in(r), so

    TS(D) = irfft( sum_t rfft(C_out(l_t)) * rfft(C_in(r_t)) )

in O(k' (d_out + d_in) + k' k log k) for k' components. Buckets and signs come from the
portable mixer of math.masks under a public seed, so every site and the coordinator draw the
same ones on any machine. Pure torch; no files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsrd_cli.math.masks import random_bits32

Pair = tuple[torch.Tensor, torch.Tensor]  # (left (d_out, k'), right (k', d_in))


def sketch_hashes(seed: int, name: str, dim: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Count-sketch hashes of `dim` coordinates: buckets (dim,) int64 in [0, width) and signs
    (dim,) float64 in {-1, +1}, from h(j) = random_bits32(seed, name): bucket = h mod width (a
    power of two: h's low bits), sign = +1 when h's top bit is 0, else -1."""
    if width < 2 or width & (width - 1):
        raise ValueError(f"the sketch width must be a power of two >= 2, got {width}")
    bits = random_bits32(seed, name, dim)  # (dim,) uint32 values in int64
    buckets = bits & (width - 1)
    signs = 1.0 - 2.0 * (bits >> 31).double()
    return buckets, signs


def _count_sketch(x: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor, width: int) -> torch.Tensor:
    """x (dim, c) -> (width, c): column-wise C(x)[b] = sum over h(j) = b of s(j) x[j]."""
    out = torch.zeros(width, x.shape[1], dtype=torch.float64)
    return out.index_add_(0, buckets, signs[:, None] * x.double())


def product_sketch(
    pairs: Sequence[Pair],
    out_hashes: tuple[torch.Tensor, torch.Tensor],
    in_hashes: tuple[torch.Tensor, torch.Tensor],
    width: int,
) -> torch.Tensor:
    """TS(sum_j L_j R_j) (width,) float64 for thin pairs L_j (d_out, k_j), R_j (k_j, d_in), with
    one module's row hashes `out_hashes` (d_out) and column hashes `in_hashes` (d_in)."""
    spectrum = torch.zeros(width // 2 + 1, dtype=torch.complex128)
    for left, right in pairs:
        rows = _count_sketch(left, *out_hashes, width)  # (width, k_j)
        cols = _count_sketch(right.mT, *in_hashes, width)  # (width, k_j)
        spectrum += (torch.fft.rfft(rows, dim=0) * torch.fft.rfft(cols, dim=0)).sum(dim=1)
    return torch.fft.irfft(spectrum, n=width)
