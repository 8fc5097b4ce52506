"""Privacy in a round: the ledgers each step carries on, and the organisation-level noise.

- upload: the local state's record-level ledger travels in the upload (sparsification and
  packing are post-processing of the DP-trained factors, docs/privacy.md);
- aggregate: each upload's ledger is checked against what the global state recorded for its
  site and its rounds with an upload (privacy.ledger.merge_site_ledgers); with
  organisation-level DP the round's mechanism is recorded and its epsilon checked against the
  coordinator's cap before anything is written;
- broadcast: the sites' ledgers and the organisation-level ledger, extended by this round,
  travel on to the broadcast and the next global state. With organisation-level DP the B
  update gets Gaussian noise of std  Z * C * gain / D  (PrivateDownload), where C / D bounds
  one site's change of the clipped, divided sum and gain = max over modules of
  ||A^T (A A^T + lam I)^-1||_2 (math.lowrank_products.b_update_gain) bounds what the B solve does to it.

Nothing here touches a file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fedsrd_cli.config import PRIVATE_METHOD, AggregateConfig, BroadcastConfig
from fedsrd_cli.errors import MismatchError, PrivacyError, UsageError
from fedsrd_cli.files.artifacts import Artifact, Header
from fedsrd_cli.math.lowrank_products import b_update_gain
from fedsrd_cli.privacy.ledger import (
    COORDINATOR,
    NO_DP,
    ORGANISATION,
    RECORD_LEVEL,
    Ledger,
    OrganisationDp,
    Privacy,
    Release,
    merge_site_ledgers,
    read_privacy,
    with_participants,
)
from fedsrd_cli.privacy.randomness import SecretRandom


def upload_privacy(local_header: Header | None) -> dict[str, Any]:
    """What an upload carries: the record-level ledger of the local state it was made from."""
    if local_header is None or not local_header.privacy:
        return {}
    ledger = read_privacy(local_header).record_level
    return {} if ledger is None else {RECORD_LEVEL: ledger.to_json()}


def aggregate_privacy(global_state: Artifact, uploads: list[Artifact], config: AggregateConfig) -> dict:
    """The aggregate's privacy section: the sites' ledgers after this round, the organisation-level
    ledger as the global state has it, and this round's organisation-level settings.

    PrivacyError (nothing written) for an upload ledger that cannot be accepted, an
    organisation-level delta that differs from the ledger's, or a round past --dp-max-epsilon.
    """
    before = read_privacy(global_state.header)
    round_index = global_state.header.round + 1
    entries = [
        (u.header.client_id, round_index, read_privacy(u.header).record_level, str(u.path)) for u in uploads
    ]
    sites = merge_site_ledgers(dict(before.sites or {}), entries, config.require_dp, before.participants)
    participants = with_participants(before.participants, [entry[0] for entry in entries], round_index)
    org = config.organisation_dp
    if org is not None:
        after = organisation_ledger(before.organisation_level, org, round_index)
        if config.max_epsilon is not None and after.epsilon > config.max_epsilon:
            raise PrivacyError(
                f"round {round_index} would bring the organisation-level epsilon to {after.epsilon:.4g}"
                f" (delta {org.delta:g}), past --dp-max-epsilon {config.max_epsilon:g}; nothing was written"
            )
    return Privacy(
        sites=sites or None,
        organisation_level=before.organisation_level,
        organisation_dp=org,
        participants=participants,
    ).to_json()


def sample_sites(
    uploads: list[Artifact], config: AggregateConfig, test_seed: int | None = None
) -> tuple[list[Artifact], AggregateConfig]:
    """Organisation-level DP's Poisson sampling among the uploads given: each takes part with
    probability q, independently, drawn from a secret stream (privacy.randomness; a test seed
    makes it reproducible, for tests only). Returns the sample and the config recording the
    population (every upload given) and how many were sampled."""
    org = config.organisation_dp
    if org is None:
        raise ValueError("sample_sites needs organisation-level DP settings")
    random = SecretRandom() if test_seed is None else SecretRandom.for_tests(test_seed)
    chosen = random.poisson_sample(len(uploads), org.sampling_rate)
    settings = replace(org, population=len(uploads), sampled=len(chosen))
    return [uploads[i] for i in chosen], replace(config, organisation_dp=settings)


def organisation_ledger(before: Ledger | None, org: OrganisationDp | None, round_index: int) -> Ledger:
    """The coordinator's ledger after round `round_index`; a round without organisation DP after
    the ledger began is recorded as one without DP (its epsilon is then infinite)."""
    if org is None:
        if before is None:
            raise ValueError("no organisation-level ledger to extend")
        return before.extended(Release(round_index, NO_DP))
    ledger = before or Ledger.start(ORGANISATION, COORDINATOR, org.delta)
    if ledger.delta != org.delta:
        raise PrivacyError(
            f"the organisation-level ledger is kept at delta {ledger.delta:g}; give --dp-delta"
            f" {ledger.delta:g} (a ledger has one delta), not {org.delta:g}"
        )
    return ledger.extended(org.release(round_index))


def broadcast_privacy(global_state: Artifact, aggregate: Artifact, round_index: int) -> dict[str, Any]:
    """The broadcast's (and the next state's) privacy section: the aggregate's sites, and the
    organisation-level ledger extended by this round when there is one."""
    agg = read_privacy(aggregate.header)
    before = read_privacy(global_state.header).organisation_level
    org = before
    if agg.organisation_dp is not None or before is not None:
        org = organisation_ledger(before, agg.organisation_dp, round_index)
    return Privacy(sites=agg.sites, organisation_level=org, participants=agg.participants).to_json()


@dataclass
class PrivateDownload:
    """The noise of one organisation-level DP broadcast.

    settings: the aggregate's OrganisationDp; gain: max over modules of ||K_m||_2; std: the
    noise's standard deviation on every element of every B update, Z * C * gain / D.
    """

    settings: OrganisationDp
    gain: float
    std: float
    random: SecretRandom

    @classmethod
    def of(
        cls, global_state: Artifact, aggregate: Artifact, config: BroadcastConfig
    ) -> PrivateDownload | None:
        """None for an aggregate without organisation-level DP; UsageError for download settings
        under which the sensitivity argument does not hold."""
        org = read_privacy(aggregate.header).organisation_dp
        if org is None:
            return None
        if aggregate.header.method != PRIVATE_METHOD:
            raise MismatchError(
                f"{aggregate.path}: organisation-level DP on a {aggregate.header.method} aggregate"
            )
        if config.factor_choice != "b" or config.download_fit != "dare":
            raise UsageError(
                f"{aggregate.path} carries organisation-level DP: its broadcast updates B in every round"
                " with the whole-factor fit (--factor-choice b --download-fit dare), the only download"
                f" whose sensitivity is bounded; got --factor-choice {config.factor_choice}"
                f" --download-fit {config.download_fit}"
            )
        gain = max(
            b_update_gain(global_state.factors(module)[0].double(), config.damping)
            for module in global_state.modules()
        )
        std = org.noise_multiplier * org.clip * gain / org.denominator
        random = SecretRandom() if config.noise_seed is None else SecretRandom.for_tests(config.noise_seed)
        return cls(org, gain, std, random)

    @property
    def sensitivity(self) -> float:
        """How far one site (its clipped update, zeroed or put back) can move the un-noised B
        updates of all modules together, in Frobenius norm: C * gain / D."""
        return self.settings.clip * self.gain / self.settings.denominator

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.random.normal(shape, self.std)

    def record(self) -> dict[str, Any]:
        """What the broadcast says of its noise (all of it public: settings and the global A)."""
        return {
            "clip": self.settings.clip,
            "noise_multiplier": self.settings.noise_multiplier,
            "sampling_rate": self.settings.sampling_rate,
            "denominator": self.settings.denominator,
            "gain": self.gain,
            "sensitivity": self.sensitivity,
            "noise_std": self.std,
        }
