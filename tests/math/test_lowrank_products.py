"""TargetProducts (math.lowrank_products): shared thin products give the solves, misses and
update error bit for bit."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.lowrank import update_a, update_b
from fedsrd_cli.math.lowrank_products import TargetProducts, one_factor_misses, update_error_norms


def _module(seed: int, d_out: int, d_in: int, r: int, k: int, zero_b: bool = False):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(d_out, k, generator=g, dtype=torch.float64)
    right = torch.randn(k, d_in, generator=g, dtype=torch.float64) * 0.1
    b_prev = (
        torch.zeros(d_out, r, dtype=torch.float64)
        if zero_b
        else torch.randn(d_out, r, generator=g, dtype=torch.float64)
    )
    a_prev = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return left, right, b_prev, a_prev


@pytest.mark.parametrize("damping", [1e-3, 0.0])
@pytest.mark.parametrize(
    ("seed", "d_out", "d_in", "r", "k", "zero_b"),
    [(0, 96, 40, 8, 8, False), (1, 24, 130, 6, 24, False), (2, 50, 50, 4, 4, True)],
)
def test_shared_products_give_the_same_bits(seed, d_out, d_in, r, k, zero_b, damping) -> None:
    left, right, b_prev, a_prev = _module(seed, d_out, d_in, r, k, zero_b)
    shared = TargetProducts(left, right, b_prev, a_prev)
    delta_b = update_b(left, right, b_prev, a_prev, damping)
    delta_a = update_a(left, right, b_prev, a_prev, damping)
    assert torch.equal(update_b(left, right, b_prev, a_prev, damping, shared), delta_b)
    assert torch.equal(update_a(left, right, b_prev, a_prev, damping, shared), delta_a)
    misses = one_factor_misses(left, right, b_prev, a_prev, delta_b, delta_a)
    assert one_factor_misses(left, right, b_prev, a_prev, delta_b, delta_a, shared) == misses
    # the update error for every way a broadcast leaves the factors: B sent, A sent, both, neither
    b_next, a_next = b_prev + 0.5 * delta_b, a_prev + 0.5 * delta_a
    for b_after, a_after in ((b_next, a_prev), (b_prev, a_next), (b_next, a_next), (b_prev, a_prev)):
        alone = update_error_norms(left, right, b_prev, a_prev, b_after.clone(), a_after.clone())
        # a factor the broadcast left as it was is passed as the products' own tensor
        assert update_error_norms(left, right, b_prev, a_prev, b_after, a_after, shared) == alone
        assert alone[1] > 0.0


def test_a_product_is_formed_once() -> None:
    left, right, b_prev, a_prev = _module(3, 30, 20, 4, 4)
    shared = TargetProducts(left, right, b_prev, a_prev)
    assert shared.gram_a is shared.gram_a
    delta_b = update_b(left, right, b_prev, a_prev, 1e-3, shared)
    along_b = shared.along_b
    one_factor_misses(left, right, b_prev, a_prev, delta_b, torch.zeros_like(a_prev), shared)
    assert shared.along_b is along_b
