"""A site's record-level budget: the noise of this round's DP-SGD, and whether it may run.

`train-local --dp-*` (and simulate's and Flower's clients) plan a round before any training:

  records N      every example of the data files (the population whose records are protected)
  q = L / N      L = batch size x gradient accumulation, the expected Poisson batch
  steps S        the round's optimizer steps
  history        the site's ledger so far: the one the global state recorded for it, or the
                 site's own (a previous local state or upload), whichever is longer; the two
                 must agree

With --dp-epsilon E and --dp-rounds R, the noise multiplier is the smallest that keeps the
history plus the R - (rounds spent) rounds still planned, each of S steps at q, within (E,
delta): a site that keeps its plan ends at E. With --dp-noise-multiplier the noise is given.
Either way the round is refused (PrivacyError, before training) when its ledger would pass
--dp-max-epsilon (by default E), or would be refused by the writer of the local state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedsrd_cli.errors import ArtifactError, PrivacyError, UsageError
from fedsrd_cli.limits import DEFAULT_DP_MAX_GRAD_NORM
from fedsrd_cli.privacy.accounting import noise_multiplier_for
from fedsrd_cli.privacy.ledger import MECHANISMS, RECORD, Ledger, Release, parse_ledger


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


@dataclass(frozen=True)
class RecordDp:
    """train-local's --dp-* flags, validated on creation.

    epsilon: target for the whole planned run (with planned_rounds), or None with
    noise_multiplier; delta: None takes 1 / records (at most that is accepted);
    max_grad_norm: the clip C of each record's gradient; max_epsilon: the site's cap (None:
    epsilon when given, else no cap).
    """

    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = DEFAULT_DP_MAX_GRAD_NORM
    noise_multiplier: float | None = None
    planned_rounds: int | None = None
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        _need(
            (self.epsilon is None) != (self.noise_multiplier is None),
            "give --dp-epsilon (with --dp-rounds) or --dp-noise-multiplier, exactly one",
        )
        _need(
            self.epsilon is None or (math.isfinite(self.epsilon) and self.epsilon > 0),
            f"--dp-epsilon must be a number > 0, got {self.epsilon}",
        )
        _need(
            self.noise_multiplier is None
            or (math.isfinite(self.noise_multiplier) and 0 < self.noise_multiplier <= 1e6),
            f"--dp-noise-multiplier must be in (0, 1e6], got {self.noise_multiplier}",
        )
        _need(
            self.epsilon is None or self.planned_rounds is not None,
            "--dp-epsilon is the budget of a planned run: give --dp-rounds, the rounds this site will train",
        )
        _need(
            self.planned_rounds is None or 1 <= self.planned_rounds <= 100_000,
            f"--dp-rounds must be in [1, 100000], got {self.planned_rounds}",
        )
        _need(self.delta is None or 0.0 < self.delta < 1.0, f"--dp-delta must be in (0, 1), got {self.delta}")
        _need(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            f"--dp-max-grad-norm must be > 0, got {self.max_grad_norm}",
        )
        _need(
            self.max_epsilon is None or (math.isfinite(self.max_epsilon) and self.max_epsilon > 0),
            f"--dp-max-epsilon must be a number > 0, got {self.max_epsilon}",
        )

    @property
    def cap(self) -> float | None:
        return self.max_epsilon if self.max_epsilon is not None else self.epsilon


def history_of(
    site: str,
    recorded: Ledger | None,
    own: Ledger | None,
    participants: Mapping[str, tuple[int, ...]] | None = None,
) -> Ledger | None:
    """The site's history: the longer of the global state's record and its own ledger, which must
    agree (one continues the other); PrivacyError otherwise.

    participants: the global state's record of every site's rounds with an upload since round 1
    (None: not known). A site it shows sending an upload before any ledger of it began sent that
    upload without DP: PrivacyError, before any training (its epsilon is infinite).
    """
    if own is not None and own.party != site:
        raise PrivacyError(f"--dp-ledger holds the ledger of {own.party!r}, not of {site!r}")
    if recorded is None and participants is not None:
        first = own.releases[0].round if own is not None else math.inf
        earlier = [r for r in participants.get(site, ()) if r < first]
        if earlier:
            raise PrivacyError(
                f"{site!r} sent round(s) {earlier} without DP (the global state records its uploads"
                " since round 1): its records have no finite guarantee left to keep"
            )
    if recorded is None or own is None:
        return recorded or own
    if own.continues(recorded):
        return own
    if recorded.continues(own):
        return recorded
    raise PrivacyError(
        f"the global state records rounds {recorded.rounds} for {site!r}, its --dp-ledger rounds"
        f" {own.rounds}, and neither continues the other (delta {recorded.delta:g} / {own.delta:g})"
    )


def plan_round(
    settings: RecordDp,
    site: str,
    round_index: int,
    records: int,
    expected_batch: int,
    steps: int,
    history: Ledger | None,
) -> tuple[float, Ledger]:
    """(noise multiplier, the site's ledger after this round), or PrivacyError before training."""
    if records < 1:
        raise UsageError("DP-SGD needs at least one record")
    delta = settings.delta if settings.delta is not None else (history.delta if history else 1.0 / records)
    if delta > 1.0 / records:
        raise UsageError(
            f"--dp-delta {delta:g} is above 1 / records = {1.0 / records:.3g}: a mechanism that publishes"
            " one record outright meets such a delta; give a smaller --dp-delta"
        )
    if history is not None:
        if history.delta != delta:
            raise PrivacyError(
                f"{site!r}'s ledger is kept at delta {history.delta:g}; give --dp-delta {history.delta:g}"
                " (a ledger has one delta)"
            )
        if not history.protected:
            unprotected = [r.round for r in history.releases if r.mechanism == "none"]
            raise PrivacyError(
                f"{site!r} sent round(s) {unprotected} without DP after its ledger began: its records"
                " have no finite guarantee left to keep"
            )
        if history.releases and history.releases[-1].round >= round_index:
            raise PrivacyError(
                f"{site!r}'s ledger already holds round {history.releases[-1].round}; this is round"
                f" {round_index}"
            )
    rate = min(1.0, expected_batch / records)
    spent = history.history() if history is not None else []
    if settings.noise_multiplier is not None:
        sigma = settings.noise_multiplier
    else:
        assert settings.epsilon is not None and settings.planned_rounds is not None
        done = len(history.releases) if history is not None else 0
        left = settings.planned_rounds - done
        if left < 1:
            raise PrivacyError(
                f"{site!r} planned {settings.planned_rounds} rounds for epsilon {settings.epsilon:g} and has"
                f" trained {done}: the plan is spent (a new plan needs a larger --dp-rounds and"
                " --dp-epsilon)"
            )
        try:
            sigma = noise_multiplier_for(settings.epsilon, delta, spent, rate, steps, left)
        except UsageError as err:
            raise PrivacyError(f"{site!r}: {err}") from None
    release = Release(round_index, MECHANISMS[RECORD], sigma, rate, settings.max_grad_norm, steps, records)
    after = (history or Ledger.start(RECORD, site, delta)).extended(release)
    try:  # the ledger as the local state will carry it: what its writer would refuse, refused now
        parse_ledger(after.to_json(), f"round {round_index}'s planned ledger")
    except ArtifactError as err:
        raise PrivacyError(f"{err}; nothing was trained") from None
    cap = settings.cap
    if cap is not None and after.epsilon > cap * (1.0 + 1e-9):
        raise PrivacyError(
            f"round {round_index} would bring {site!r} to epsilon {after.epsilon:.4g} (delta {delta:g}),"
            f" past its budget {cap:g} (--dp-max-epsilon); nothing was trained"
        )
    return sigma, after
