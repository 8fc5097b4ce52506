"""privacy.ledger: parsing, recomputation, and the coordinator's checks of the sites' ledgers."""

from __future__ import annotations

import math

import pytest

from fedsrd_cli.errors import ArtifactError, PrivacyError
from fedsrd_cli.privacy.accounting import epsilon
from fedsrd_cli.privacy.ledger import (
    NO_DP,
    RECORD,
    Ledger,
    Release,
    merge_site_ledgers,
    parse_ledger,
    parse_privacy,
)


def site_ledger(site: str, rounds: int, sigma: float = 1.0, delta: float = 1e-3) -> Ledger:
    ledger = Ledger.start(RECORD, site, delta)
    for t in range(1, rounds + 1):
        ledger = ledger.extended(Release(t, "dp-sgd", sigma, 0.05, 1.0, 10, 160))
    return ledger


def test_a_ledger_round_trips_and_its_epsilon_is_the_accountants():
    ledger = site_ledger("a", 3)
    again = parse_ledger(ledger.to_json(), "here")
    assert again == ledger
    assert ledger.epsilon == epsilon([(1.0, 0.05, 10)] * 3, 1e-3)
    assert again.agrees()


def test_a_round_without_dp_makes_epsilon_infinite():
    ledger = site_ledger("a", 2).extended(Release(3, NO_DP))
    assert ledger.epsilon == math.inf and not ledger.protected
    assert ledger.to_json()["epsilon"] is None
    assert parse_ledger(ledger.to_json(), "here").agrees()


def test_a_tampered_epsilon_no_longer_agrees():
    data = site_ledger("a", 2).to_json()
    data["epsilon"] = data["epsilon"] / 2
    assert not parse_ledger(data, "here").agrees()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(accountant="prv"), "accountant"),
        (lambda d: d.update(delta=1.5), "delta"),
        (lambda d: d.update(rounds=[]), "without rounds"),
        (lambda d: d["rounds"][0].update(sample_rate=0.0), "impossible"),
        (lambda d: d["rounds"][1].update(round=1), "increasing"),
        (lambda d: d["rounds"][0].update(noise_multiplier=float("nan")), "finite"),
        (lambda d: d.update(extra=1), "fields"),
    ],
)
def test_malformed_ledgers_are_refused(change, message):
    data = site_ledger("a", 2).to_json()
    change(data)
    with pytest.raises(ArtifactError, match=message):
        parse_ledger(data, "here")


def test_each_kind_carries_only_its_own_privacy_fields():
    record = {"record_level": site_ledger("a", 1).to_json()}
    assert parse_privacy(record, "upload", "f").record_level is not None
    with pytest.raises(ArtifactError, match="carries no privacy field"):
        parse_privacy(record, "broadcast", "f")
    with pytest.raises(ArtifactError, match="not that site's"):
        parse_privacy({"sites": {"b": site_ledger("a", 1).to_json()}}, "state", "f")


def test_merge_accepts_a_continued_history_and_records_it():
    recorded = {"a": site_ledger("a", 2)}
    merged = merge_site_ledgers(recorded, [("a", 3, site_ledger("a", 3), "up-a")], require_epsilon=10.0)
    assert merged["a"] == site_ledger("a", 3)


@pytest.mark.parametrize(
    "upload, message",
    [
        (site_ledger("a", 3, sigma=2.0), "does not continue"),  # history rewritten with less noise
        (site_ledger("b", 3), "of 'b'"),
        (site_ledger("a", 2), "ends at round 2"),
    ],
)
def test_merge_refuses_what_cannot_be_the_site_s_history(upload, message):
    recorded = {"a": site_ledger("a", 2)}
    with pytest.raises(PrivacyError, match=message):
        merge_site_ledgers(recorded, [("a", 3, upload, "up-a")], require_epsilon=None)


def test_merge_refuses_a_reset_budget():
    """A site that shows round 3 alone after the global state recorded rounds 1-2."""
    fresh = Ledger.start(RECORD, "a", 1e-3).extended(Release(3, "dp-sgd", 1.0, 0.05, 1.0, 10, 160))
    with pytest.raises(PrivacyError, match="reset"):
        merge_site_ledgers({"a": site_ledger("a", 2)}, [("a", 3, fresh, "up-a")], require_epsilon=100.0)


def test_merge_refuses_an_epsilon_that_is_not_the_history_s():
    forged = site_ledger("a", 1)
    forged = Ledger(forged.unit, forged.party, forged.delta, forged.releases, forged.epsilon / 3)
    with pytest.raises(PrivacyError, match="records epsilon"):
        merge_site_ledgers({}, [("a", 1, forged, "up-a")], require_epsilon=None)


def test_require_dp_refuses_missing_and_over_budget_ledgers():
    with pytest.raises(PrivacyError, match="no privacy ledger"):
        merge_site_ledgers({}, [("a", 1, None, "up-a")], require_epsilon=8.0)
    spent = site_ledger("a", 1, sigma=0.5)
    assert spent.epsilon > 1.0
    with pytest.raises(PrivacyError, match="over --require-dp 1"):
        merge_site_ledgers({}, [("a", 1, spent, "up-a")], require_epsilon=1.0)


def test_a_round_without_dp_is_recorded_for_a_site_that_had_a_ledger():
    merged = merge_site_ledgers({"a": site_ledger("a", 1)}, [("a", 2, None, "up-a")], require_epsilon=None)
    assert merged["a"].rounds == [1, 2] and merged["a"].epsilon == math.inf
    assert merge_site_ledgers({}, [("b", 1, None, "up-b")], require_epsilon=None) == {}
