"""math.sketch: the tensor sketch of thin products, against the dense definition and in
expectation."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.sketch import product_sketch, sketch_hashes


def _dense_sketch(matrix: torch.Tensor, out_hashes, in_hashes, width: int) -> torch.Tensor:
    """TS(M)[b] = sum over (h_out(i) + h_in(j)) mod k = b of s_out(i) s_in(j) M[i, j], by loops."""
    (h_out, s_out), (h_in, s_in) = out_hashes, in_hashes
    out = torch.zeros(width, dtype=torch.float64)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            out[(int(h_out[i]) + int(h_in[j])) % width] += float(s_out[i] * s_in[j]) * float(matrix[i, j])
    return out


def _pairs(gen: torch.Generator, d_out: int, d_in: int, rank: int):
    b, a = (
        torch.randn(d_out, rank, generator=gen, dtype=torch.float64),
        torch.randn(rank, d_in, generator=gen, dtype=torch.float64),
    )
    b2, a2 = b + 0.1 * torch.randn_like(b), a + 0.1 * torch.randn_like(a)
    return [(b2, a2), (-b, a)], b2 @ a2 - b @ a  # D = B' A' - B A, and its dense form


def test_the_sketch_of_thin_factors_is_the_dense_definition():
    gen = torch.Generator().manual_seed(0)
    pairs, dense = _pairs(gen, 9, 7, 3)
    width = 16
    out_h, in_h = sketch_hashes(5, "m.out", 9, width), sketch_hashes(5, "m.in", 7, width)
    torch.testing.assert_close(
        product_sketch(pairs, out_h, in_h, width), _dense_sketch(dense, out_h, in_h, width)
    )


def test_hashes_are_portable_and_well_formed():
    buckets, signs = sketch_hashes(123, "layers.0.q_proj.out", 1000, 64)
    again = sketch_hashes(123, "layers.0.q_proj.out", 1000, 64)
    assert torch.equal(buckets, again[0]) and torch.equal(signs, again[1])
    assert int(buckets.min()) >= 0 and int(buckets.max()) < 64
    assert set(signs.tolist()) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 0.1  # balanced signs
    assert not torch.equal(buckets, sketch_hashes(124, "layers.0.q_proj.out", 1000, 64)[0])
    with pytest.raises(ValueError):
        sketch_hashes(1, "x", 10, 48)


def test_sketch_inner_products_estimate_the_frobenius_inner_product_without_bias():
    gen = torch.Generator().manual_seed(1)
    pairs_x, x = _pairs(gen, 40, 30, 4)
    shared = x.clone()
    pairs_y = [
        *pairs_x,
        (
            torch.randn(40, 2, generator=gen, dtype=torch.float64) * 0.05,
            torch.randn(2, 30, generator=gen, dtype=torch.float64),
        ),
    ]
    y = shared + pairs_y[-1][0] @ pairs_y[-1][1]
    truth = float((x * y).sum())
    width, draws = 256, 200
    estimates = []
    for seed in range(draws):
        out_h, in_h = sketch_hashes(seed, "out", 40, width), sketch_hashes(seed, "in", 30, width)
        estimates.append(
            float(product_sketch(pairs_x, out_h, in_h, width) @ product_sketch(pairs_y, out_h, in_h, width))
        )
    mean = sum(estimates) / draws
    spread = (sum((e - mean) ** 2 for e in estimates) / (draws - 1)) ** 0.5
    # the mean of 200 draws lies within 4 standard errors of the truth
    assert abs(mean - truth) < 4 * spread / draws**0.5
    # and one draw's error is of the order the tensor sketch's variance bound allows
    bound = ((truth**2 + float(x.pow(2).sum()) * float(y.pow(2).sum())) * 3 / width) ** 0.5
    assert spread < bound
