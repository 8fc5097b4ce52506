"""privacy.budget: a site's plan, calibrated so the planned run ends at its epsilon, and refused
before training when a round would pass its budget."""

from __future__ import annotations

import pytest

from fedsrd_cli.errors import PrivacyError, UsageError
from fedsrd_cli.privacy.budget import RecordDp, history_of, plan_round
from fedsrd_cli.privacy.ledger import NO_DP, Release


def run_plan(settings: RecordDp, rounds: int, records: int = 256, batch: int = 8, steps: int = 10):
    history = None
    for t in range(1, rounds + 1):
        _sigma, history = plan_round(settings, "a", t, records, batch, steps, history)
    return history


@pytest.mark.parametrize("target", [8.0, 1.0])
def test_a_site_that_keeps_its_plan_ends_at_its_epsilon(target):
    settings = RecordDp(epsilon=target, planned_rounds=3)
    history = run_plan(settings, 3)
    assert history.rounds == [1, 2, 3]
    assert target * 0.98 <= history.epsilon <= target
    assert history.delta == 1 / 256
    assert {r.sample_rate for r in history.releases} == {8 / 256}
    with pytest.raises(PrivacyError, match="plan is spent"):
        plan_round(settings, "a", 4, 256, 8, 10, history)


def test_a_round_past_the_cap_is_refused():
    settings = RecordDp(noise_multiplier=0.6, max_epsilon=4.0)
    history = None
    with pytest.raises(PrivacyError, match="past its budget 4"):
        for t in range(1, 50):
            _sigma, history = plan_round(settings, "a", t, 256, 8, 10, history)
    assert history is not None and history.epsilon <= 4.0


def test_delta_defaults_to_one_over_records_and_may_not_exceed_it():
    _sigma, ledger = plan_round(RecordDp(noise_multiplier=1.0), "a", 1, 100, 8, 10, None)
    assert ledger.delta == 0.01
    with pytest.raises(UsageError, match="above 1 / records"):
        plan_round(RecordDp(noise_multiplier=1.0, delta=0.05), "a", 1, 100, 8, 10, None)
    with pytest.raises(PrivacyError, match="delta"):
        plan_round(RecordDp(noise_multiplier=1.0, delta=0.001), "a", 2, 100, 8, 10, ledger)


def test_a_history_with_a_round_without_dp_has_nothing_left_to_keep():
    _sigma, ledger = plan_round(RecordDp(noise_multiplier=1.0), "a", 1, 100, 8, 10, None)
    broken = ledger.extended(Release(2, NO_DP))
    with pytest.raises(PrivacyError, match="without DP"):
        plan_round(RecordDp(noise_multiplier=1.0), "a", 3, 100, 8, 10, broken)


def test_a_ledger_the_writer_would_refuse_is_refused_before_training(monkeypatch):
    """Issue 32, row 2: a negative epsilon from the accountant was found only when the trained
    state was written (exit 3). Whatever the writer would refuse in the planned ledger is now a
    PrivacyError of the plan, before any training."""
    from fedsrd_cli.privacy import accounting

    monkeypatch.setattr(accounting, "epsilon", lambda history, delta: -0.0065)
    with pytest.raises(PrivacyError, match="epsilon -0.0065 is negative; nothing was trained"):
        plan_round(RecordDp(noise_multiplier=10.0), "a", 1, 120, 4, 3, None)


def test_the_longer_of_two_consistent_histories_counts():
    settings = RecordDp(noise_multiplier=1.0)
    _s, one = plan_round(settings, "a", 1, 100, 8, 10, None)
    _s, two = plan_round(settings, "a", 2, 100, 8, 10, one)
    assert history_of("a", one, two) == two and history_of("a", two, one) == two
    _s, other = plan_round(RecordDp(noise_multiplier=2.0), "a", 1, 100, 8, 10, None)
    with pytest.raises(PrivacyError, match="neither continues"):
        history_of("a", two, other)
    with pytest.raises(PrivacyError, match="not of 'b'"):
        history_of("b", None, two)


def test_a_site_that_sent_an_upload_before_its_ledger_began_may_not_start_one():
    """Issue 32, row 4, at the site: the global state records its rounds with an upload since
    round 1; one before any ledger of it was sent without DP, so DP-SGD is refused before training."""
    participants = {"a": (1, 2), "b": (1, 2)}  # the global state of round 2; this is round 3
    with pytest.raises(PrivacyError, match=r"sent round\(s\) \[1, 2\] without DP"):
        history_of("a", None, None, participants)
    _s, own = plan_round(RecordDp(noise_multiplier=1.0), "a", 2, 100, 8, 10, None)
    with pytest.raises(PrivacyError, match=r"sent round\(s\) \[1\] without DP"):
        history_of("a", None, own, participants)
    _s, one = plan_round(RecordDp(noise_multiplier=1.0), "b", 1, 100, 8, 10, None)
    _s, two = plan_round(RecordDp(noise_multiplier=1.0), "b", 2, 100, 8, 10, one)
    assert history_of("b", None, two, participants) == two  # its own ledger covers both rounds
    assert history_of("c", None, None, participants) is None  # a site new to the run


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"epsilon": 8.0, "noise_multiplier": 1.0}, "exactly one"),
        ({"epsilon": 8.0}, "--dp-rounds"),
        ({"epsilon": -1.0, "planned_rounds": 3}, "--dp-epsilon"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "--dp-max-grad-norm"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, "--dp-delta"),
    ],
)
def test_bad_flags_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        RecordDp(**kwargs)
