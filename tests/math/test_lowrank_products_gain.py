"""math.lowrank_products.b_update_gain against the dense map it bounds."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.lowrank import update_b
from fedsrd_cli.math.lowrank_products import b_update_gain


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.1])
@pytest.mark.parametrize("shape", [(4, 32), (8, 20), (1, 5)])
def test_gain_is_the_spectral_norm_of_the_dense_solve(shape, damping):
    generator = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    a[0] *= 0.05  # one weak direction, where the damping matters
    if damping == 0.0:
        k = torch.linalg.pinv(a)  # (d_in, r)
    else:
        lam = damping * float(torch.linalg.matrix_norm(a, 2)) ** 2
        k = a.mT @ torch.linalg.inv(a @ a.mT + lam * torch.eye(shape[0], dtype=torch.float64))
    assert b_update_gain(a, damping) == pytest.approx(float(torch.linalg.matrix_norm(k, 2)), rel=1e-9)


def test_gain_bounds_how_far_update_b_moves_with_its_target():
    """update_b is linear in the target: ||update_b(W + E) - update_b(W)||_F <= ||E||_F * gain."""
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(4, 24, generator=generator, dtype=torch.float64)
    b = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    left, right = (
        torch.randn(16, 6, generator=generator, dtype=torch.float64),
        torch.randn(6, 24, generator=generator, dtype=torch.float64),
    )
    gain = b_update_gain(a, 1e-3)
    for _ in range(20):
        e_left = torch.randn(16, 2, generator=generator, dtype=torch.float64)
        e_right = torch.randn(2, 24, generator=generator, dtype=torch.float64)
        moved = update_b(torch.cat([left, e_left], 1), torch.cat([right, e_right]), b, a, 1e-3) - update_b(
            left, right, b, a, 1e-3
        )
        assert float(moved.norm()) <= float((e_left @ e_right).norm()) * gain * (1 + 1e-9)


def test_a_zero_factor_has_no_gain():
    assert b_update_gain(torch.zeros(4, 8, dtype=torch.float64), 1e-3) == 0.0
