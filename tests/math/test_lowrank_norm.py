"""product_frobenius_norm against the dense reference."""

from __future__ import annotations

import torch

from fedsrd_cli.math.lowrank import product_frobenius_norm


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
