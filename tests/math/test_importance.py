"""Upload sparsification math against plain loops and torch/numpy references."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.math.importance import (
    adaptive_ratio,
    importance_a,
    importance_b,
    keep_mask,
    l1_rescale,
    pearson_kurtosis,
    quantile,
    sparsify_delta,
)


def test_importance_b_matches_elementwise_definition():
    g = torch.Generator().manual_seed(0)
    delta_b, a_prev = torch.randn(5, 3, generator=g), torch.randn(3, 7, generator=g)
    scores = importance_b(delta_b, a_prev)
    for u in range(5):
        for v in range(3):
            expected = abs(delta_b[u, v].item()) * math.sqrt(sum(x * x for x in a_prev[v].tolist()))
            assert scores[u, v].item() == pytest.approx(expected, rel=1e-5)


def test_importance_a_matches_elementwise_definition():
    g = torch.Generator().manual_seed(1)
    delta_a, b_new = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    scores = importance_a(delta_a, b_new)
    for u in range(3):
        for v in range(7):
            expected = abs(delta_a[u, v].item()) * math.sqrt(sum(x * x for x in b_new[:, u].tolist()))
            assert scores[u, v].item() == pytest.approx(expected, rel=1e-5)


def test_importance_bounds_the_full_rank_error():
    """Dropping one element of dB changes dW = dB A + B' dA by at most its score (Cauchy-Schwarz)."""
    g = torch.Generator().manual_seed(2)
    a_prev, delta_b = torch.randn(4, 9, generator=g), torch.randn(6, 4, generator=g)
    scores = importance_b(delta_b, a_prev)
    full = delta_b @ a_prev
    for u, v in [(0, 0), (3, 2), (5, 3)]:
        pruned = delta_b.clone()
        pruned[u, v] = 0
        err = torch.linalg.matrix_norm(full - pruned @ a_prev).item()
        assert err == pytest.approx(scores[u, v].item(), rel=1e-5)


def test_pearson_kurtosis_matches_moment_formula():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 10.0, -4.0])
    values = x.tolist()
    mu = sum(values) / len(values)
    m2 = sum((v - mu) ** 2 for v in values) / len(values)
    m4 = sum((v - mu) ** 4 for v in values) / len(values)
    assert pearson_kurtosis(x) == pytest.approx(m4 / m2**2, rel=1e-12)


def test_pearson_kurtosis_of_a_normal_sample_is_about_three():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3))
    assert pearson_kurtosis(x) == pytest.approx(3.0, abs=0.05)


def test_pearson_kurtosis_of_constant_is_nan():
    assert math.isnan(pearson_kurtosis(torch.ones(10)))


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (3.0, 0.85 + 0.1 * math.log(3.0)),  # below the cap: 0.85 + 0.1099
        (0.5, 0.85),  # k < 1 counts as 1
        (50.0, 0.85 + 0.11),  # capped
        (float("nan"), 0.85),
    ],
)
def test_adaptive_ratio_follows_the_formula(k, expected):
    assert adaptive_ratio(k, 0.85, 0.1, 0.11) == pytest.approx(expected)


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.85, 0.9137, 0.96, 1.0])
def test_quantile_matches_torch_quantile(q):
    x = torch.randn(1001, generator=torch.Generator().manual_seed(4)).double()
    assert quantile(x, q) == pytest.approx(torch.quantile(x, q).item(), rel=1e-12, abs=1e-12)


def test_keep_mask_keeps_exactly_the_elements_above_the_quantile():
    scores = torch.rand(40, 25, generator=torch.Generator().manual_seed(5))
    kept = keep_mask(scores, 0.9)
    threshold = torch.quantile(scores.double().flatten(), 0.9).item()
    assert torch.equal(kept, scores.double() > threshold)
    assert int(kept.sum()) == 100  # 1000 elements, linear interpolation: 99.9 above -> 100 kept


def test_l1_rescale_restores_the_l1_norm():
    delta = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    kept = torch.tensor([[False, False], [True, True]])
    out = l1_rescale(delta, kept)
    assert out.abs().sum().item() == pytest.approx(10.0)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [3.0, -4.0]]) * (10 / 7))


def test_sparsify_delta_uses_the_kurtosis_ratio_and_the_quantile():
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(64, 8, generator=g) * (torch.rand(64, 8, generator=g) < 0.3)
    a_prev = torch.randn(8, 32, generator=g)
    scores = importance_b(delta, a_prev)
    pruned, kept, ratio = sparsify_delta(delta, scores, 0.85, 0.1, 0.11, rescale=False)
    k = pearson_kurtosis(scores)
    assert ratio == pytest.approx(0.85 + min(0.11, 0.1 * math.log(max(k, 1.0))))
    threshold = torch.quantile(scores.double().flatten(), ratio).item()
    assert torch.equal(kept, scores.double() > threshold)
    assert torch.equal(pruned, torch.where(kept, delta, torch.zeros_like(delta)))
    rescaled, _, _ = sparsify_delta(delta, scores, 0.85, 0.1, 0.11, rescale=True)
    assert rescaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
