"""broadcast --factor-choice both (steps.both_factors_update) against dense references."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.algorithms.steps import Download, alternating_update, both_factors_update
from fedsrd_cli.config import BroadcastConfig
from fedsrd_cli.errors import UsageError


def _state(seed: int, d_out: int = 40, d_in: int = 56, r: int = 6):
    """A state (B, A) and a rank-r target W = left @ right in which both factors moved."""
    g = torch.Generator().manual_seed(seed)
    b_prev = 0.1 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    a_prev = 0.1 * torch.randn(r, d_in, generator=g, dtype=torch.float64)
    left = b_prev + 0.1 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    right = a_prev + 0.1 * torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return b_prev, a_prev, left, right, g


def _download(keep_b, keep_a, keep_prob: float, fit: str, damping: float = 0.0) -> Download:
    return Download({"B": keep_b, "A": keep_a}.__getitem__, keep_prob, damping, fit, "both")


def _apply(b_prev, a_prev, update):
    after = {"B": b_prev.clone(), "A": a_prev.clone()}
    for factor, delta in update.deltas:
        after[factor] = after[factor] + delta
    return after["B"], after["A"]


def _rows_lstsq(target: torch.Tensor, basis: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Dense reference: row u of x minimises ||x[u, K] basis[K, :] - target[u, :]|| over kept K."""
    x = torch.zeros(target.shape[0], basis.shape[0], dtype=target.dtype)
    for u in range(target.shape[0]):
        kept = keep[u].nonzero().reshape(-1)
        if kept.numel():
            sol = torch.linalg.lstsq(basis[kept].T, target[u].unsqueeze(1)).solution  # (|K|, 1)
            x[u, kept] = sol.reshape(-1)
    return x


@pytest.mark.parametrize("fit", ["lstsq", "dare"])
def test_everything_kept_and_no_damping_delivers_a_rank_r_target_exactly(fit):
    b_prev, a_prev, left, right, _ = _state(0)
    keep_b = torch.ones_like(b_prev, dtype=torch.bool)
    keep_a = torch.ones_like(a_prev, dtype=torch.bool)
    update = both_factors_update(a_prev, b_prev, left, right, _download(keep_b, keep_a, 1.0, fit))
    b_next, a_next = _apply(b_prev, a_prev, update)
    assert [factor for factor, _ in update.deltas] == ["B", "A"]
    torch.testing.assert_close(b_next @ a_next, left @ right, rtol=1e-9, atol=1e-10)


def test_lstsq_matches_two_dense_masked_least_squares_steps():
    b_prev, a_prev, left, right, g = _state(1)
    keep_b = torch.rand(b_prev.shape, generator=g) < 0.4
    keep_a = torch.rand(a_prev.shape, generator=g) < 0.4
    update = both_factors_update(a_prev, b_prev, left, right, _download(keep_b, keep_a, 0.4, "lstsq"))
    delta_b, delta_a = (delta for _, delta in update.deltas)
    target = left @ right  # (d_out, d_in), the dense reference's only large matrix
    ref_b = _rows_lstsq(target - b_prev @ a_prev, a_prev, keep_b)
    b_next = b_prev + ref_b
    ref_a = _rows_lstsq((target - b_next @ a_prev).T, b_next.T, keep_a.T).T
    torch.testing.assert_close(delta_b, ref_b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(delta_a, ref_a, rtol=1e-8, atol=1e-10)
    assert not delta_b[~keep_b].any() and not delta_a[~keep_a].any()


@pytest.mark.parametrize("keep_prob", [0.2, 0.5])
def test_lstsq_both_lands_no_farther_than_b_alone_nor_than_sending_nothing(keep_prob):
    for seed in range(5):
        b_prev, a_prev, left, right, g = _state(10 + seed)
        keep_b = torch.rand(b_prev.shape, generator=g) < keep_prob
        keep_a = torch.rand(a_prev.shape, generator=g) < keep_prob
        target = left @ right
        before = float((b_prev @ a_prev - target).norm())
        download = _download(keep_b, keep_a, keep_prob, "lstsq", damping=1e-3)
        b_both, a_both = _apply(b_prev, a_prev, both_factors_update(a_prev, b_prev, left, right, download))
        one = Download(download.keep, keep_prob, 1e-3, "lstsq", "b")
        b_one, a_one = _apply(b_prev, a_prev, alternating_update("m", 2, a_prev, b_prev, left, right, one))
        miss_both = float((b_both @ a_both - target).norm())
        miss_one = float((b_one @ a_one - target).norm())
        assert miss_both <= miss_one * (1 + 1e-9) <= before * (1 + 1e-9)
        assert miss_both < miss_one  # the A step reaches what no B update can


def test_dare_rescales_each_step_and_the_a_step_sees_the_sent_b():
    b_prev, a_prev, left, right, g = _state(2)
    keep_b = torch.rand(b_prev.shape, generator=g) < 0.5
    keep_a = torch.rand(a_prev.shape, generator=g) < 0.5
    update = both_factors_update(a_prev, b_prev, left, right, _download(keep_b, keep_a, 0.5, "dare"))
    delta_b, delta_a = (delta for _, delta in update.deltas)
    target = left @ right
    whole_b = (target - b_prev @ a_prev) @ torch.linalg.pinv(a_prev)
    torch.testing.assert_close(delta_b, torch.where(keep_b, whole_b / 0.5, 0.0), rtol=1e-8, atol=1e-10)
    b_next = b_prev + delta_b
    whole_a = torch.linalg.pinv(b_next) @ (target - b_next @ a_prev)
    torch.testing.assert_close(delta_a, torch.where(keep_a, whole_a / 0.5, 0.0), rtol=1e-8, atol=1e-10)


def test_alternating_update_routes_both_to_the_two_step_download():
    b_prev, a_prev, left, right, g = _state(3)
    keep_b = torch.rand(b_prev.shape, generator=g) < 0.3
    keep_a = torch.rand(a_prev.shape, generator=g) < 0.3
    download = _download(keep_b, keep_a, 0.3, "lstsq", damping=1e-3)
    routed = alternating_update("m", 5, a_prev, b_prev, left, right, download)
    direct = both_factors_update(a_prev, b_prev, left, right, download)
    for (f1, d1), (f2, d2) in zip(routed.deltas, direct.deltas, strict=True):
        assert f1 == f2 and torch.equal(d1, d2)
    assert not routed.fell_back


def test_broadcast_config_accepts_both_and_names_the_choices_when_wrong():
    assert BroadcastConfig(factor_choice="both").factor_choice == "both"
    with pytest.raises(UsageError, match="'fit', 'parity', 'b', 'both'"):
        BroadcastConfig(factor_choice="neither")


def test_align_factors_matches_the_dense_least_squares_sweep_and_keeps_the_clients_scale():
    from fedsrd_cli.math.lowrank import align_factors

    g = torch.Generator().manual_seed(7)
    d_out, d_in, r = 30, 44, 5
    mean_b = 0.05 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    mean_a = 0.2 * torch.randn(r, d_in, generator=g, dtype=torch.float64)
    w = (mean_b + 0.01 * torch.randn(d_out, r, generator=g, dtype=torch.float64)) @ (
        mean_a + 0.05 * torch.randn(r, d_in, generator=g, dtype=torch.float64)
    )  # (d_out, d_in), rank r
    u, s, vh = torch.linalg.svd(w)
    left, right = u[:, :r] * s[:r], vh[:r]  # the truncated SVD's scale: all of W in `left`
    damping = 1e-3
    b_new, a_new = align_factors(left, right, mean_b, mean_a, damping)
    gram_a = mean_a @ mean_a.T
    lam_a = damping * float(torch.linalg.eigvalsh(gram_a)[-1])
    eye = torch.eye(r, dtype=torch.float64)
    ref_b = mean_b + (w - mean_b @ mean_a) @ mean_a.T @ torch.linalg.inv(gram_a + lam_a * eye)
    gram_b = ref_b.T @ ref_b
    lam_b = damping * float(torch.linalg.eigvalsh(gram_b)[-1])
    ref_a = mean_a + torch.linalg.inv(gram_b + lam_b * eye) @ ref_b.T @ (w - ref_b @ mean_a)
    torch.testing.assert_close(b_new, ref_b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a_new, ref_a, rtol=1e-9, atol=1e-12)
    exact_b, exact_a = align_factors(left, right, mean_b, mean_a, 0.0)
    torch.testing.assert_close(exact_b @ exact_a, w, rtol=1e-8, atol=1e-10)  # rank r: W itself
    assert float((exact_b - mean_b).norm()) < 0.5 * float(mean_b.norm())  # near the clients' B
    assert float((exact_a - mean_a).norm()) < 0.5 * float(mean_a.norm())
    # ... which the SVD's factors of the same W are not
    assert float((left - mean_b).norm()) > 2 * float((exact_b - mean_b).norm())
    assert float((right - mean_a).norm()) > 2 * float((exact_a - mean_a).norm())


def test_aligned_two_factor_download_with_nothing_masked_lands_on_the_aggregate_factors():
    b_prev, a_prev, left, right, _ = _state(4)
    keep_b = torch.ones_like(b_prev, dtype=torch.bool)
    keep_a = torch.ones_like(a_prev, dtype=torch.bool)
    aligned = Download({"B": keep_b, "A": keep_a}.__getitem__, 1.0, 0.0, "lstsq", "both", aligned=True)
    update = both_factors_update(a_prev, b_prev, left, right, aligned)
    b_next, a_next = _apply(b_prev, a_prev, update)
    torch.testing.assert_close(b_next, left, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a_next, right, rtol=1e-9, atol=1e-12)


def test_align_is_refused_where_there_is_no_full_rank_aggregate():
    from fedsrd_cli.config import AggregateConfig
    from fedsrd_cli.privacy.ledger import OrganisationDp

    assert AggregateConfig(method="fedsrd-e", align=True).align
    with pytest.raises(UsageError, match="--align-factors refactors"):
        AggregateConfig(method="fedavg", align=True)
    with pytest.raises(UsageError, match="not with organisation-level DP"):
        AggregateConfig(
            method="fedsrd-e", align=True, organisation_dp=OrganisationDp(0.1, 1.0, 1.0, 1e-3, 4, 4)
        )
