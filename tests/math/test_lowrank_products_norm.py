"""math.lowrank_products: product_frobenius_norm, one_factor_misses, product_inner and
update_error_norms against dense references."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.lowrank_products import (
    one_factor_misses,
    product_frobenius_norm,
    product_inner,
    update_error_norms,
)


def test_matches_dense_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    for d_out, k, d_in in ((7, 3, 5), (40, 8, 33), (1, 1, 1), (16, 12, 4)):
        left = torch.randn(d_out, k, generator=generator, dtype=torch.float64)
        right = torch.randn(k, d_in, generator=generator, dtype=torch.float64)
        dense = torch.linalg.matrix_norm(left @ right)
        assert torch.allclose(product_frobenius_norm(left, right), dense, rtol=1e-12)


def test_update_of_a_lora_pair_and_zero() -> None:
    generator = torch.Generator().manual_seed(1)
    b, a = torch.randn(20, 4, generator=generator).double(), torch.randn(4, 30, generator=generator).double()
    b_new, a_new = b + 0.1 * torch.randn_like(b), a + 0.1 * torch.randn_like(a)
    left, right = torch.cat([b_new, -b], 1), torch.cat([a_new, a], 0)
    dense = torch.linalg.matrix_norm(b_new @ a_new - b @ a)
    assert torch.allclose(product_frobenius_norm(left, right), dense, rtol=1e-10)
    assert float(product_frobenius_norm(torch.cat([b, -b], 1), torch.cat([a, a], 0))) < 1e-6


def test_one_factor_misses_match_the_dense_residuals():
    g = torch.Generator().manual_seed(3)
    left = torch.randn(30, 6, generator=g, dtype=torch.float64)
    right = torch.randn(6, 20, generator=g, dtype=torch.float64)
    b_prev = torch.randn(30, 3, generator=g, dtype=torch.float64)
    a_prev = torch.randn(3, 20, generator=g, dtype=torch.float64)
    delta_b = torch.randn(30, 3, generator=g, dtype=torch.float64)
    delta_a = torch.randn(3, 20, generator=g, dtype=torch.float64)
    w = left @ right
    miss_b, miss_a = one_factor_misses(left, right, b_prev, a_prev, delta_b, delta_a)
    assert miss_b == pytest.approx(
        float(torch.linalg.matrix_norm((b_prev + delta_b) @ a_prev - w)), rel=1e-10
    )
    assert miss_a == pytest.approx(
        float(torch.linalg.matrix_norm(b_prev @ (a_prev + delta_a) - w)), rel=1e-10
    )
    # W = B_prev A_prev and no update: nothing to miss (up to the cancellation of squares)
    zero_b, zero_a = torch.zeros_like(b_prev), torch.zeros_like(a_prev)
    assert one_factor_misses(b_prev, a_prev, b_prev, a_prev, zero_b, zero_a) == pytest.approx(
        (0.0, 0.0), abs=1e-6
    )


def test_product_inner_matches_the_dense_inner_product():
    generator = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    xs = [(rand(7, 2), rand(2, 9)), (rand(7, 3), rand(3, 9))]
    ys = [(rand(7, 4), rand(4, 9))]
    dense_x = sum(x @ y for x, y in xs)
    dense_y = sum(u @ v for u, v in ys)
    assert product_inner(xs, ys) == pytest.approx(float((dense_x * dense_y).sum()), rel=1e-12)
    assert product_inner(xs, xs) == pytest.approx(float(dense_x.norm()) ** 2, rel=1e-12)


def test_update_error_norms_match_dense_norms():
    g = torch.Generator().manual_seed(10)
    left = torch.randn(30, 10, generator=g, dtype=torch.float64)
    right = torch.randn(10, 20, generator=g, dtype=torch.float64)
    b_prev = torch.randn(30, 5, generator=g, dtype=torch.float64)
    a_prev = torch.randn(5, 20, generator=g, dtype=torch.float64)
    delta_w = left @ right - b_prev @ a_prev
    b_next = b_prev + 0.1 * torch.randn(b_prev.shape, generator=g, dtype=torch.float64)
    a_next = a_prev + 0.1 * torch.randn(a_prev.shape, generator=g, dtype=torch.float64)
    miss, target = update_error_norms(left, right, b_prev, a_prev, b_next, a_next)
    assert miss == pytest.approx(float(torch.linalg.matrix_norm(b_next @ a_next - left @ right)), rel=1e-10)
    assert target == pytest.approx(float(torch.linalg.matrix_norm(delta_w)), rel=1e-10)
    unchanged = update_error_norms(left, right, b_prev, a_prev, b_prev, a_prev)
    assert unchanged[0] == pytest.approx(unchanged[1], rel=1e-10)  # nothing sent: error 1
