"""The one-factor download's solves: ridge damping, least squares on kept elements, error norms."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.lowrank import masked_update_a, masked_update_b, update_a, update_b
from fedsrd_cli.math.lowrank_products import update_error_norms


def _problem(seed: int, d_out: int = 30, d_in: int = 20, r: int = 5, k: int = 10):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(d_out, k, generator=g, dtype=torch.float64)
    right = torch.randn(k, d_in, generator=g, dtype=torch.float64)
    b_prev = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    a_prev = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return left, right, b_prev, a_prev, left @ right - b_prev @ a_prev


def _ill_conditioned(x: torch.Tensor, condition: float) -> torch.Tensor:
    """x with its singular values replaced by a geometric range from 1 down to 1/condition."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), s.numel(), dtype=x.dtype)
    return u @ torch.diag(s) @ vh


def _ridge_right(delta_w: torch.Tensor, x: torch.Tensor, damping: float) -> torch.Tensor:
    """Dense reference: dW X^T (X X^T + lam I)^-1, lam = damping sigma_max(X)^2."""
    lam = damping * torch.linalg.matrix_norm(x, 2) ** 2
    return delta_w @ x.T @ torch.linalg.inv(x @ x.T + lam * torch.eye(x.shape[0], dtype=x.dtype))


@pytest.mark.parametrize("damping", [1e-4, 1e-3, 1e-2, 0.5])
def test_damped_updates_match_the_dense_ridge_solution(damping):
    left, right, b_prev, a_prev, delta_w = _problem(0)
    torch.testing.assert_close(
        update_b(left, right, b_prev, a_prev, damping),
        _ridge_right(delta_w, a_prev, damping),
        rtol=1e-9,
        atol=0,
    )
    torch.testing.assert_close(
        update_a(left, right, b_prev, a_prev, damping),
        _ridge_right(delta_w.T, b_prev.T, damping).T,
        rtol=1e-9,
        atol=0,
    )


def test_damping_zero_is_the_exact_pseudo_inverse_bit_for_bit():
    left, right, b_prev, a_prev, _ = _problem(1)
    a_pinv, b_pinv = torch.linalg.pinv(a_prev), torch.linalg.pinv(b_prev)
    assert torch.equal(
        update_b(left, right, b_prev, a_prev, 0.0), left @ (right @ a_pinv) - b_prev @ (a_prev @ a_pinv)
    )
    assert torch.equal(
        update_a(left, right, b_prev, a_prev, 0.0), (b_pinv @ left) @ right - (b_pinv @ b_prev) @ a_prev
    )


def test_damped_update_stays_bounded_when_the_inverted_factor_has_condition_1e6_or_more():
    left, right, b_prev, a_prev, _ = _problem(2)
    for condition in (1e6, 1e9):
        a_bad = _ill_conditioned(a_prev, condition)
        b_bad = _ill_conditioned(b_prev, condition)
        assert torch.linalg.cond(a_bad) >= condition / 2
        delta_w = left @ right - b_prev @ a_bad
        exact = update_b(left, right, b_prev, a_bad, 0.0)
        damping = 1e-3
        damped = update_b(left, right, b_prev, a_bad, damping)
        # Ridge: every direction is scaled by sigma / (sigma^2 + lam) <= 1 / (2 sqrt(lam)).
        lam = damping * torch.linalg.matrix_norm(a_bad, 2) ** 2
        bound = torch.linalg.matrix_norm(delta_w) / (2 * lam.sqrt())
        assert torch.linalg.matrix_norm(damped) <= bound * (1 + 1e-9)
        assert torch.linalg.matrix_norm(exact) > 1e3 * torch.linalg.matrix_norm(damped)
        delta_w = left @ right - b_bad @ a_prev
        damped_a = update_a(left, right, b_bad, a_prev, damping)
        lam = damping * torch.linalg.matrix_norm(b_bad, 2) ** 2
        assert torch.linalg.matrix_norm(damped_a) <= torch.linalg.matrix_norm(delta_w) / (2 * lam.sqrt()) * (
            1 + 1e-9
        )


def test_zero_factor_gives_a_zero_update_damped_or_not():
    left, right, b_prev, a_prev, _ = _problem(3)
    zero_b = torch.zeros_like(b_prev)
    for damping in (0.0, 1e-3):
        assert not update_a(left, right, zero_b, a_prev, damping).any()
        assert not update_b(left, right, b_prev, torch.zeros_like(a_prev), damping).any()


def _row_reference(
    target: torch.Tensor, against: torch.Tensor, keep: torch.Tensor, lam: float
) -> torch.Tensor:
    """Row u: argmin over x supported on keep[u] of ||x against - target[u]||^2 + lam ||x||^2,
    by torch.linalg.lstsq on the augmented dense system."""
    out = torch.zeros(target.shape[0], against.shape[0], dtype=target.dtype)
    for u in range(target.shape[0]):
        k = keep[u]
        n = int(k.sum())
        if n == 0:
            continue
        system = torch.cat([against[k].T, lam**0.5 * torch.eye(n, dtype=target.dtype)])
        side = torch.cat([target[u], torch.zeros(n, dtype=target.dtype)])
        out[u, k] = torch.linalg.lstsq(system, side[:, None]).solution[:, 0]
    return out


@pytest.mark.parametrize("damping", [0.0, 1e-3, 1e-1])
@pytest.mark.parametrize("keep_prob", [0.2, 0.5, 1.0])
def test_masked_updates_match_a_row_by_row_dense_least_squares(damping, keep_prob):
    left, right, b_prev, a_prev, delta_w = _problem(4, r=6)
    g = torch.Generator().manual_seed(5)
    keep_b = torch.rand(b_prev.shape, generator=g) < keep_prob
    keep_a = torch.rand(a_prev.shape, generator=g) < keep_prob
    lam_a = damping * float(torch.linalg.matrix_norm(a_prev, 2) ** 2)
    lam_b = damping * float(torch.linalg.matrix_norm(b_prev, 2) ** 2)
    got_b = masked_update_b(left, right, b_prev, a_prev, keep_b, damping)
    got_a = masked_update_a(left, right, b_prev, a_prev, keep_a, damping)
    torch.testing.assert_close(got_b, _row_reference(delta_w, a_prev, keep_b, lam_a), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(
        got_a, _row_reference(delta_w.T, b_prev.T, keep_a.T, lam_b).T, rtol=1e-7, atol=1e-10
    )
    assert not got_b[~keep_b].any() and not got_a[~keep_a].any()


def test_masked_update_with_everything_kept_is_the_whole_least_squares_update():
    left, right, b_prev, a_prev, _ = _problem(6)
    for damping in (0.0, 1e-3):
        everything_b = torch.ones(b_prev.shape, dtype=torch.bool)
        everything_a = torch.ones(a_prev.shape, dtype=torch.bool)
        torch.testing.assert_close(
            masked_update_b(left, right, b_prev, a_prev, everything_b, damping),
            update_b(left, right, b_prev, a_prev, damping),
            rtol=1e-8,
            atol=1e-10,
        )
        torch.testing.assert_close(
            masked_update_a(left, right, b_prev, a_prev, everything_a, damping),
            update_a(left, right, b_prev, a_prev, damping),
            rtol=1e-8,
            atol=1e-10,
        )


@pytest.mark.parametrize("condition", [1.0, 1e6])
def test_masked_update_never_lands_farther_from_the_target_than_sending_nothing(condition):
    left, right, b_prev, a_prev, _ = _problem(7)
    a_used = a_prev if condition == 1.0 else _ill_conditioned(a_prev, condition)
    g = torch.Generator().manual_seed(8)
    for trial in range(5):
        keep = torch.rand(b_prev.shape, generator=g) < 0.2
        for damping in (0.0, 1e-3):
            delta = masked_update_b(left, right, b_prev, a_used, keep, damping)
            miss, target = update_error_norms(left, right, b_prev, a_used, b_prev + delta, a_used)
            assert miss <= target * (1 + 1e-9), (trial, damping)


def test_masked_update_rows_without_a_kept_element_and_singular_blocks():
    left, right, b_prev, _, _ = _problem(9, r=4)
    a_rank_one = torch.outer(
        torch.ones(4, dtype=torch.float64), torch.linspace(-1, 1, 20, dtype=torch.float64)
    )
    keep = torch.ones(b_prev.shape, dtype=torch.bool)
    keep[0] = False  # a row that keeps nothing
    delta = masked_update_b(left, right, b_prev, a_rank_one, keep, 0.0)  # every kept block is singular
    assert torch.isfinite(delta).all() and not delta[0].any()
    miss, target = update_error_norms(left, right, b_prev, a_rank_one, b_prev + delta, a_rank_one)
    assert miss <= target * (1 + 1e-9)
