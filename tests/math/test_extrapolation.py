"""math.extrapolation: FedExP's step and the mean update's norm from reconstructions, against
plain dense computations."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.math.extrapolation import fedexp_step, mean_update_sq_estimate


def _dense_fedexp(updates: list[torch.Tensor], weights: list[float], cap: float) -> float:
    mean = sum(w * d for w, d in zip(weights, updates, strict=True))
    spread = sum(w * float(d.pow(2).sum()) for w, d in zip(weights, updates, strict=True))
    return min(max(1.0, spread / (2.0 * float(mean.pow(2).sum()))), cap)


def test_the_step_is_fedexps_formula_on_dense_updates():
    gen = torch.Generator().manual_seed(0)
    updates = [torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    mean = sum(w * d for w, d in zip(weights, updates, strict=True))
    client_sq = sum(w * float(d.pow(2).sum()) for w, d in zip(weights, updates, strict=True))
    step = fedexp_step(client_sq, float(mean.pow(2).sum()), 16.0)
    assert step == pytest.approx(_dense_fedexp(updates, weights, 16.0), rel=1e-12)
    assert step > 1.0  # independent random updates disagree: their mean is short


def test_agreeing_sites_take_the_plain_step_and_cancelling_ones_the_cap():
    assert fedexp_step(3.0, 3.0, 16.0) == 1.0  # every site sent the same update
    assert fedexp_step(3.0, 0.0, 16.0) == 16.0  # they cancel exactly
    assert fedexp_step(4.0, 0.1, 8.0) == 8.0
    assert fedexp_step(0.0, 0.0, 16.0) == 1.0  # nothing moved
    with pytest.raises(ValueError):
        fedexp_step(math.nan, 1.0, 16.0)


def _parts(exact, estimates, weights):
    exact_sq = [float(d.pow(2).sum()) for d in exact]
    estimate_sq = [float(e.pow(2).sum()) for e in estimates]
    combined = sum(w * e for w, e in zip(weights, estimates, strict=True))
    return exact_sq, estimate_sq, float(combined.pow(2).sum())


def test_exact_or_uniformly_scaled_reconstructions_give_the_exact_mean_norm():
    gen = torch.Generator().manual_seed(1)
    exact = [torch.randn(6, 9, generator=gen, dtype=torch.float64) + 0.5 for _ in range(5)]
    weights = [0.2] * 5
    truth = float(sum(w * d for w, d in zip(weights, exact, strict=True)).pow(2).sum())
    for gain in (1.0, 3.7):
        exact_sq, estimate_sq, combined_sq = _parts(exact, [gain * d for d in exact], weights)
        estimate = mean_update_sq_estimate(weights, exact_sq, estimate_sq, combined_sq, gain)
        assert estimate == pytest.approx(truth, rel=1e-10)


def test_independent_noise_in_the_reconstructions_cancels_out_of_the_estimate():
    # E_i = g D_i + N_i with N_i independent across sites and of every D_j: the cross terms
    # <E_i, E_j> carry g^2 <D_i, D_j>, so the estimate stays near the truth while the plain
    # norm of the reconstructions' mean would be g^2 times it.
    gen = torch.Generator().manual_seed(2)
    shared = torch.randn(200, 50, generator=gen, dtype=torch.float64)
    exact = [shared + torch.randn(200, 50, generator=gen, dtype=torch.float64) for _ in range(4)]
    weights = [0.25] * 4
    gain = 4.0
    noisy = [gain * d + 8.0 * torch.randn(200, 50, generator=gen, dtype=torch.float64) for d in exact]
    # the gain as a coordinator measures it, from each site's <E_i, D_i>
    along = sum(w * float((e * d).sum()) for w, e, d in zip(weights, noisy, exact, strict=True))
    measured_gain = along / sum(w * float(d.pow(2).sum()) for w, d in zip(weights, exact, strict=True))
    truth = float(sum(w * d for w, d in zip(weights, exact, strict=True)).pow(2).sum())
    exact_sq, estimate_sq, combined_sq = _parts(exact, noisy, weights)
    estimate = mean_update_sq_estimate(weights, exact_sq, estimate_sq, combined_sq, measured_gain)
    assert estimate == pytest.approx(truth, rel=0.05)
    assert combined_sq / truth > 10.0  # what the noise and gain do to the naive figure


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        mean_update_sq_estimate([1.0], [1.0, 2.0], [1.0], 1.0, 1.0)
    with pytest.raises(ValueError):
        mean_update_sq_estimate([1.0], [1.0], [1.0], 1.0, 0.0)
