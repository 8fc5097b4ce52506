"""math.extrapolation: FedExP's step, against a plain dense computation."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.math.extrapolation import fedexp_step


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


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        fedexp_step(-1.0, 1.0, 16.0)
    with pytest.raises(ValueError):
        fedexp_step(1.0, float("inf"), 16.0)
