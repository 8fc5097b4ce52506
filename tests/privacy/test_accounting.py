"""privacy.accounting against Google's dp-accounting, an independent RDP implementation."""

from __future__ import annotations

import math

import pytest

from fedsrd_cli.errors import UsageError
from fedsrd_cli.privacy.accounting import ORDERS, epsilon, noise_multiplier_for

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import dp_event  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402


def reference_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting's RDP accountant on the same orders, composing the same phases."""
    accountant = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
    for sigma, rate, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "history, delta",
    [
        ([(1.0, 1 / 32, 100)], 1 / 256),  # a site: batch 8 of 256 records, 10 rounds of 10 steps
        ([(2.0, 0.125, 300)], 1e-5),
        ([(4.2, 1.0, 50)], 1e-5),  # organisation level, every site every round (method notes: ~8)
        ([(0.7, 0.05, 40), (1.3, 0.05, 60), (3.0, 0.2, 10)], 1e-4),  # a history whose settings changed
    ],
)
def test_epsilon_matches_dp_accounting_within_one_percent(history, delta):
    ours = epsilon(history, delta)
    theirs = reference_epsilon(history, delta)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert 0.0 < ours < math.inf


def test_the_organisation_figure_of_the_method_notes():
    """4 sites every round, sigma 4.2, 50 rounds: epsilon about 8 at delta 1e-5."""
    assert epsilon([(4.2, 1.0, 50)], 1e-5) == pytest.approx(8.7, abs=0.1)


@pytest.mark.parametrize("sigma", [10.0, 1e3, 1e6])
@pytest.mark.parametrize("delta", [1 / 120, 1e-2, 1e-5])
def test_epsilon_is_never_negative_however_large_the_noise(sigma, delta):
    """Balle et al.'s conversion gives a negative bound at large orders when the noise is huge
    (-0.0065 at sigma 10, delta 1/120); the guarantee it proves is epsilon 0, as dp-accounting says.
    (dp-accounting also tries a KL bound, so it may say 0 where this accountant says a little more.)"""
    history = [(sigma, 4 / 120, 3)]
    ours = epsilon(history, delta)
    assert 0.0 <= ours < 0.05
    assert ours >= reference_epsilon(history, delta) - 1e-12


def test_no_noise_is_no_guarantee_and_no_steps_cost_nothing():
    assert epsilon([(0.0, 0.1, 10)], 1e-5) == math.inf
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(1.0, 0.1, 0)], 1e-5) == 0.0


def test_composition_grows_with_steps_and_shrinks_with_noise():
    assert epsilon([(1.0, 0.1, 20)], 1e-5) < epsilon([(1.0, 0.1, 40)], 1e-5)
    assert epsilon([(2.0, 0.1, 20)], 1e-5) < epsilon([(1.0, 0.1, 20)], 1e-5)


@pytest.mark.parametrize("target", [8.0, 3.0, 1.0])
def test_calibration_reaches_the_target_at_the_end_of_the_plan(target):
    spent = [(1.5, 1 / 32, 10)]
    sigma = noise_multiplier_for(target, 1 / 256, spent, 1 / 32, 10, phases=9)
    plan = [*spent, *[(sigma, 1 / 32, 10)] * 9]
    assert epsilon(plan, 1 / 256) <= target
    slightly_less = [*spent, *[(sigma * 0.99, 1 / 32, 10)] * 9]
    assert epsilon(slightly_less, 1 / 256) > target  # the smallest such sigma, to 1%
    assert reference_epsilon(plan, 1 / 256) == pytest.approx(epsilon(plan, 1 / 256), rel=0.01)


def test_calibration_refuses_a_spent_budget():
    with pytest.raises(UsageError, match="budget is spent"):
        noise_multiplier_for(1.0, 1e-5, [(0.5, 0.5, 100)], 0.1, 10, phases=1)
    with pytest.raises(UsageError, match="delta"):
        epsilon([(1.0, 0.1, 1)], 1.0)
