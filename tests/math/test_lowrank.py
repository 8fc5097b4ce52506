"""Thin-factor SVD and decomposition against dense references."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.lowrank import (
    balanced_truncation,
    choose_factor,
    gram_basis,
    is_rank_deficient,
    product_svd,
    randomized_svd,
    stack_factors,
    truncate_product,
    update_a,
    update_b,
)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y)).item()


def _clients(m: int, d_out: int, d_in: int, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for _ in range(m)]
    as_ = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for _ in range(m)]
    return bs, as_


def test_stack_factors_gives_the_weighted_sum_of_products():
    bs, as_ = _clients(3, 10, 12, 2, 0)
    w = [0.2, 0.3, 0.5]
    left, right = stack_factors(bs, as_, w)
    dense = sum(wi * b @ a for wi, b, a in zip(w, bs, as_, strict=True))
    assert left.shape == (10, 6) and right.shape == (6, 12)
    assert _rel(left @ right, dense) < 1e-12


@pytest.mark.parametrize(("d_out", "d_in"), [(40, 30), (30, 40), (8, 50)])
def test_product_svd_matches_dense_svd(d_out, d_in):
    bs, as_ = _clients(4, d_out, d_in, 3, 1)
    left, right = stack_factors(bs, as_, [0.25] * 4)
    u, s, vh = product_svd(left, right)
    dense = left @ right
    s_ref = torch.linalg.svdvals(dense)
    assert torch.allclose(s, s_ref[: s.numel()], rtol=1e-10, atol=1e-10)
    assert _rel(u @ torch.diag(s) @ vh, dense) < 1e-10


def test_truncate_product_matches_dense_truncated_svd():
    bs, as_ = _clients(3, 50, 40, 4, 2)
    left, right = stack_factors(bs, as_, [1 / 3] * 3)
    t_left, t_right = truncate_product(left, right, 4)
    u, s, vh = torch.linalg.svd(left @ right, full_matrices=False)
    reference = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert t_left.shape == (50, 4) and t_right.shape == (4, 40)
    assert _rel(t_left @ t_right, reference) < 1e-10


def test_balanced_truncation_splits_the_truncated_svd_evenly():
    bs, as_ = _clients(3, 50, 40, 4, 2)
    left, right = stack_factors(bs, as_, [0.2, 0.3, 0.5])
    new_b, new_a = balanced_truncation(left, right, 4)
    u, s, vh = torch.linalg.svd(left @ right, full_matrices=False)
    assert new_b.shape == (50, 4) and new_a.shape == (4, 40)
    assert _rel(new_b @ new_a, u[:, :4] @ torch.diag(s[:4]) @ vh[:4]) < 1e-10
    assert torch.allclose(new_b.T @ new_b, torch.diag(s[:4]), atol=1e-9)
    assert torch.allclose(new_a @ new_a.T, torch.diag(s[:4]), atol=1e-9)


def test_balanced_truncation_pads_to_the_rank_when_w_has_lower_rank():
    bs, as_ = _clients(1, 6, 9, 2, 3)  # W has rank 2; ask for 5
    new_b, new_a = balanced_truncation(bs[0], as_[0], 5)
    assert new_b.shape == (6, 5) and new_a.shape == (5, 9)
    assert _rel(new_b @ new_a, bs[0] @ as_[0]) < 1e-10
    assert not new_b[:, 2:].any() and not new_a[2:].any()


def test_update_b_and_update_a_match_dense_pinv():
    g = torch.Generator().manual_seed(3)
    b_prev = torch.randn(30, 4, generator=g, dtype=torch.float64)
    a_prev = torch.randn(4, 20, generator=g, dtype=torch.float64)
    left = torch.randn(30, 6, generator=g, dtype=torch.float64)
    right = torch.randn(6, 20, generator=g, dtype=torch.float64)
    delta_w = left @ right - b_prev @ a_prev
    assert _rel(update_b(left, right, b_prev, a_prev), delta_w @ torch.linalg.pinv(a_prev)) < 1e-10
    assert _rel(update_a(left, right, b_prev, a_prev), torch.linalg.pinv(b_prev) @ delta_w) < 1e-10


def test_choose_factor_alternates_and_falls_back_on_rank_deficiency():
    g = torch.Generator().manual_seed(4)
    b = torch.randn(10, 3, generator=g, dtype=torch.float64)
    a = torch.randn(3, 12, generator=g, dtype=torch.float64)
    assert choose_factor(1, b, a) == "B"
    assert choose_factor(2, b, a) == "A"
    assert choose_factor(3, b, a) == "B"
    zero_b = torch.zeros(10, 3, dtype=torch.float64)
    assert is_rank_deficient(zero_b)
    assert choose_factor(2, zero_b, a) == "B"  # pinv(0) would discard the round
    deficient_a = a.clone()
    deficient_a[2] = deficient_a[0]
    assert choose_factor(1, b, deficient_a) == "A"
    assert choose_factor(1, zero_b, deficient_a) == "B"  # both deficient: keep the schedule


def test_gram_basis_spans_the_columns_and_drops_null_directions():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 6, generator=g, dtype=torch.float64
    )
    v, sigma = gram_basis(x)  # x has rank 3 of 6 columns
    q = x @ v / sigma
    assert v.shape == (6, 3) and sigma.shape == (3,)
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(sigma, torch.linalg.svdvals(x)[:3], rtol=1e-10)
    assert _rel(q @ torch.diag(sigma) @ v.T, x) < 1e-10
    assert gram_basis(torch.zeros(5, 4, dtype=torch.float64))[1].numel() == 0


def test_product_svd_of_zero_factors_is_empty_and_truncate_pads_with_zeros():
    u, s, vh = product_svd(torch.zeros(7, 4, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64))
    assert s.numel() == 0 and u.shape == (7, 0) and vh.shape == (0, 5)
    left, right = truncate_product(
        torch.zeros(7, 4, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64), 3
    )
    assert left.shape == (7, 3) and right.shape == (3, 5) and not left.any() and not right.any()


def test_product_svd_resolves_an_update_that_is_small_against_the_state():
    """Clients' factors that differ by 1e-5 of the shared state (near-collinear stacked columns):
    the truncation still matches the dense one to 1e-8 of the update, not of W."""
    g = torch.Generator().manual_seed(6)
    b = torch.randn(60, 4, generator=g, dtype=torch.float64)
    a = torch.randn(4, 50, generator=g, dtype=torch.float64)
    bs = [b + 1e-5 * torch.randn(60, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    as_ = [a + 1e-5 * torch.randn(4, 50, generator=g, dtype=torch.float64) for _ in range(5)]
    left, right = stack_factors(bs, as_, [0.2] * 5)
    u, s, vh = torch.linalg.svd(left @ right)
    reference = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    t_left, t_right = truncate_product(left, right, 4)
    update = torch.linalg.matrix_norm(reference - b @ a)
    assert (torch.linalg.matrix_norm(t_left @ t_right - reference) / update).item() < 1e-8


@pytest.mark.parametrize("power_iterations", [0, 2])
def test_randomized_svd_matches_the_dense_truncated_svd_of_a_decaying_spectrum(power_iterations):
    g = torch.Generator().manual_seed(7)
    u0, _ = torch.linalg.qr(torch.randn(80, 30, generator=g, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(70, 30, generator=g, dtype=torch.float64))
    spectrum = 0.5 ** torch.arange(30, dtype=torch.float64)  # sigma_{j+1} / sigma_j = 1/2
    w = u0 @ torch.diag(spectrum) @ v0.T  # (80, 70)
    u, s, vh = randomized_svd(lambda x: w @ x, lambda y: w.T @ y, (80, 70), 4, 14, power_iterations, 0)
    assert u.shape == (80, 4) and s.shape == (4,) and vh.shape == (4, 70)
    reference = u0[:, :4] @ torch.diag(spectrum[:4]) @ v0[:, :4].T
    optimum = torch.linalg.matrix_norm(w - reference)
    ours = torch.linalg.matrix_norm(w - u @ torch.diag(s) @ vh)
    assert (ours / optimum).item() < (1.0 + 1e-3 if power_iterations == 0 else 1.0 + 1e-9)
    assert torch.allclose(u.T @ u, torch.eye(4, dtype=torch.float64), atol=1e-10)
    again = randomized_svd(lambda x: w @ x, lambda y: w.T @ y, (80, 70), 4, 14, power_iterations, 0)
    assert torch.equal(again[1], s)  # same seed, same result
