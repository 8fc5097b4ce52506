"""The privacy ledger: which DP mechanism ran in each round, and the epsilon it all adds up to.

A ledger is the history of one privacy unit's releases (docs/privacy.md):

- record level: one site's DP-SGD runs, one entry per round it trained (train-local --dp-*);
  its local states and uploads carry it as `record_level`;
- organisation level: the coordinator's noisy broadcasts, one entry per round
  (aggregate --dp-clip ...); broadcasts and global states carry it as `organisation_level`.

Aggregates, broadcasts and global states also carry `sites`: each site's last ledger the
coordinator accepted, so a site cannot restart its budget (aggregate --require-dp compares).
A round a site trained without DP after it had a ledger is recorded as an entry of mechanism
"none": its epsilon is then infinite. They also carry `participants`, every site's rounds with an
upload since round 1, DP or not, when sites' ledgers were recorded from round 1 on: a site that
sent an upload without DP before its ledger began has an infinite epsilon too (merge_site_ledgers).

All of it travels in the header's `fedsrd.privacy` JSON (docs/format.md), which the
signature covers. Each ledger records its epsilon; `recomputed()` derives it again from the
history (privacy.accounting), so anyone can check it. This module parses and checks the
structure without Opacus; only epsilon computations import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedsrd_cli.errors import ArtifactError, PrivacyError, UsageError, a_or_an
from fedsrd_cli.privacy.accounting import ACCOUNTANT, Step

RECORD = "record"
ORGANISATION = "organisation"
COORDINATOR = "coordinator"
MECHANISMS = {RECORD: "dp-sgd", ORGANISATION: "gaussian"}
NO_DP = "none"
# The header keys each kind of file may carry (values: a ledger, or {site: ledger}).
RECORD_LEVEL, SITES, ORGANISATION_LEVEL, ORGANISATION_DP, PARTICIPANTS = (
    "record_level",
    "sites",
    "organisation_level",
    "organisation_dp",
    "participants",
)
KEYS_BY_KIND = {
    "state": (RECORD_LEVEL, SITES, ORGANISATION_LEVEL, PARTICIPANTS),
    "upload": (RECORD_LEVEL,),
    "masked_upload": (RECORD_LEVEL,),
    "aggregate": (SITES, ORGANISATION_LEVEL, ORGANISATION_DP, PARTICIPANTS),
    "broadcast": (SITES, ORGANISATION_LEVEL, PARTICIPANTS),
}
# A recorded epsilon agrees with its recomputation when within this relative tolerance.
EPSILON_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Release:
    """One round's mechanism: a subsampled Gaussian run `steps` times, or "none" (no DP).

    noise_multiplier sigma: noise std / clip; sample_rate q: each record (site) takes part in a
    step with probability q; clip C: the L2 bound of one record's gradient (one site's update);
    population: records at the site (record level) or sites in the consortium (organisation).
    """

    round: int
    mechanism: str
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    clip: float = 0.0
    steps: int = 0
    population: int = 0

    def step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        if self.mechanism == NO_DP:
            return {"round": self.round, "mechanism": NO_DP}
        return {
            "round": self.round,
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip": self.clip,
            "steps": self.steps,
            "population": self.population,
        }


@dataclass(frozen=True)
class Ledger:
    """One privacy unit's history and its recorded epsilon at `delta` (math.inf: unprotected)."""

    unit: str
    party: str
    delta: float
    releases: tuple[Release, ...]
    epsilon: float
    accountant: str = ACCOUNTANT

    @property
    def rounds(self) -> list[int]:
        return [r.round for r in self.releases]

    def history(self) -> list[Step]:
        """(sigma, q, steps) of every DP release (releases without DP make epsilon infinite)."""
        return [r.step() for r in self.releases if r.mechanism != NO_DP]

    @property
    def protected(self) -> bool:
        return all(r.mechanism != NO_DP for r in self.releases)

    def recomputed(self) -> float:
        """Epsilon at `delta` of the history, as privacy.accounting computes it."""
        from fedsrd_cli.privacy.accounting import epsilon

        return epsilon(self.history(), self.delta) if self.protected else math.inf

    def agrees(self) -> bool:
        """Whether the recorded epsilon is the recomputed one."""
        return epsilon_matches(self.epsilon, self.recomputed())

    def extended(self, release: Release) -> Ledger:
        """This ledger with one more release, its epsilon recomputed."""
        grown = replace(self, releases=(*self.releases, release))
        return replace(grown, epsilon=grown.recomputed())

    def continues(self, earlier: Ledger) -> bool:
        """Whether this history starts with all of `earlier` (same unit, party and delta)."""
        return (self.unit, self.party, self.delta, self.accountant) == (
            earlier.unit,
            earlier.party,
            earlier.delta,
            earlier.accountant,
        ) and self.releases[: len(earlier.releases)] == earlier.releases

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "party": self.party,
            "accountant": self.accountant,
            "delta": self.delta,
            "rounds": [r.to_json() for r in self.releases],
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
        }

    @classmethod
    def start(cls, unit: str, party: str, delta: float) -> Ledger:
        return cls(unit, party, delta, (), 0.0)


def epsilon_matches(recorded: float, recomputed: float) -> bool:
    if math.isinf(recorded) or math.isinf(recomputed):
        return math.isinf(recorded) and math.isinf(recomputed)
    return abs(recorded - recomputed) <= EPSILON_TOLERANCE * max(1.0, abs(recomputed))


# --------------------------------------------------------------------------- parsing


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArtifactError(f"{where}: privacy ledger field {what} is not a finite number ({value!r})")
    return float(value)


def _integer(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArtifactError(f"{where}: privacy ledger field {what} is not a count ({value!r})")
    return value


def _release(data: Any, unit: str, where: str) -> Release:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: a privacy ledger round is not a JSON object")
    round_index = _integer(data.get("round"), "round", where)
    mechanism = data.get("mechanism")
    if mechanism == NO_DP:
        if set(data) != {"round", "mechanism"}:
            raise ArtifactError(f"{where}: a privacy ledger round without DP has extra fields")
        return Release(round_index, NO_DP)
    if mechanism != MECHANISMS[unit]:
        raise ArtifactError(f"{where}: a {unit}-level ledger round of mechanism {mechanism!r}")
    expected = {"round", "mechanism", "noise_multiplier", "sample_rate", "clip", "steps", "population"}
    if set(data) != expected:
        raise ArtifactError(
            f"{where}: a privacy ledger round has fields {sorted(data)}, not {sorted(expected)}"
        )
    release = Release(
        round_index,
        mechanism,
        _number(data["noise_multiplier"], "noise_multiplier", where),
        _number(data["sample_rate"], "sample_rate", where),
        _number(data["clip"], "clip", where),
        _integer(data["steps"], "steps", where),
        _integer(data["population"], "population", where),
    )
    if release.noise_multiplier < 0 or not 0.0 < release.sample_rate <= 1.0 or release.clip <= 0:
        raise ArtifactError(f"{where}: privacy ledger round {round_index} has impossible parameters")
    if release.steps < 1 or release.population < 1:
        raise ArtifactError(f"{where}: privacy ledger round {round_index} has no steps or no population")
    return release


def parse_ledger(data: Any, where: str) -> Ledger:
    """A ledger from its JSON form; ArtifactError for anything malformed."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: a privacy ledger is not a JSON object")
    expected = {"unit", "party", "accountant", "delta", "rounds", "epsilon"}
    if set(data) != expected:
        raise ArtifactError(f"{where}: a privacy ledger has fields {sorted(data)}, not {sorted(expected)}")
    unit = data["unit"]
    if unit not in MECHANISMS:
        raise ArtifactError(f"{where}: privacy ledger of unknown unit {unit!r}")
    if data["accountant"] != ACCOUNTANT:
        raise ArtifactError(
            f"{where}: privacy ledger kept with accountant {data['accountant']!r}; this fedsrd"
            f" recomputes {ACCOUNTANT!r} ledgers only (upgrade fedsrd)"
        )
    party = data["party"]
    if not isinstance(party, str) or not party:
        raise ArtifactError(f"{where}: privacy ledger without a party")
    delta = _number(data["delta"], "delta", where)
    if not 0.0 < delta < 1.0:
        raise ArtifactError(f"{where}: privacy ledger delta {delta} outside (0, 1)")
    if not isinstance(data["rounds"], list) or not data["rounds"]:
        raise ArtifactError(f"{where}: privacy ledger without rounds")
    releases = tuple(_release(r, unit, where) for r in data["rounds"])
    rounds = [r.round for r in releases]
    if any(b <= a for a, b in zip(rounds, rounds[1:], strict=False)) or rounds[0] < 1:
        raise ArtifactError(f"{where}: privacy ledger rounds {rounds} are not increasing from 1")
    recorded = data["epsilon"]
    epsilon = math.inf if recorded is None else _number(recorded, "epsilon", where)
    if epsilon < 0:
        raise ArtifactError(f"{where}: privacy ledger epsilon {epsilon} is negative")
    return Ledger(unit, party, delta, releases, epsilon)


@dataclass(frozen=True)
class OrganisationDp:
    """What an aggregate records of its organisation-level mechanism (aggregate --dp-clip ...):
    clip C of each site's update, noise multiplier Z, Poisson sampling rate q of the sites,
    delta, the population of sites sampled from, and how many were sampled this round."""

    clip: float
    noise_multiplier: float
    sampling_rate: float
    delta: float
    population: int
    sampled: int

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise UsageError(message)

        need(math.isfinite(self.clip) and self.clip > 0, f"--dp-clip must be > 0, got {self.clip}")
        need(
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0,
            f"--dp-noise-multiplier must be > 0, got {self.noise_multiplier}",
        )
        need(
            0.0 < self.sampling_rate <= 1.0, f"--dp-sampling-rate must be in (0, 1], got {self.sampling_rate}"
        )
        need(0.0 < self.delta < 1.0, f"--dp-delta must be in (0, 1), got {self.delta}")
        need(self.population >= 1, "organisation-level DP needs at least one site")
        need(0 <= self.sampled <= self.population, "more sites sampled than the population")

    @property
    def denominator(self) -> float:
        """D = q * population: the expected number of sampled sites, the fixed divisor of the sum."""
        return self.sampling_rate * self.population

    def release(self, round_index: int) -> Release:
        return Release(
            round_index,
            MECHANISMS[ORGANISATION],
            self.noise_multiplier,
            self.sampling_rate,
            self.clip,
            1,
            self.population,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "population": self.population,
            "sampled": self.sampled,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> OrganisationDp:
        keys = {"clip", "noise_multiplier", "sampling_rate", "delta", "population", "sampled"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ArtifactError(f"{where}: malformed organisation_dp settings")
        try:
            return cls(
                _number(data["clip"], "clip", where),
                _number(data["noise_multiplier"], "noise_multiplier", where),
                _number(data["sampling_rate"], "sampling_rate", where),
                _number(data["delta"], "delta", where),
                _integer(data["population"], "population", where),
                _integer(data["sampled"], "sampled", where),
            )
        except UsageError as err:
            raise ArtifactError(f"{where}: organisation_dp settings: {err}") from None


@dataclass(frozen=True)
class Privacy:
    """A header's privacy section, parsed: every field may be absent."""

    record_level: Ledger | None = None
    sites: Mapping[str, Ledger] | None = None
    organisation_level: Ledger | None = None
    organisation_dp: OrganisationDp | None = None
    # {site: the rounds it sent an upload in, DP or not}, complete from round 1; None: not known
    participants: Mapping[str, tuple[int, ...]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The header's JSON. `participants` only beside `sites`, whose ledgers show the rounds of
        DP uploads already: a file without record-level DP adds nothing (without DP it carries no
        privacy at all; with organisation-level DP alone the rounds would show its secret sample)."""
        out: dict[str, Any] = {}
        if self.record_level is not None:
            out[RECORD_LEVEL] = self.record_level.to_json()
        if self.sites:
            out[SITES] = {site: ledger.to_json() for site, ledger in sorted(self.sites.items())}
        if self.organisation_level is not None:
            out[ORGANISATION_LEVEL] = self.organisation_level.to_json()
        if self.organisation_dp is not None:
            out[ORGANISATION_DP] = self.organisation_dp.to_json()
        if self.sites and self.participants is not None:
            out[PARTICIPANTS] = {site: list(rounds) for site, rounds in sorted(self.participants.items())}
        return out


def read_privacy(header: Any) -> Privacy:
    """A files.header.Header's privacy section, parsed (it was checked when the file was read)."""
    return parse_privacy(header.privacy, header.kind, f"the {header.kind}'s header")


def parse_privacy(data: Any, kind: str, where: str) -> Privacy:
    """The header's `fedsrd.privacy` of a file of `kind`; ArtifactError for anything malformed."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: fedsrd.privacy is not a JSON object")
    allowed = KEYS_BY_KIND[kind]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ArtifactError(f"{where}: {a_or_an(kind)} carries no privacy field {unknown[0]!r}")
    record = parse_ledger(data[RECORD_LEVEL], where) if RECORD_LEVEL in data else None
    if record is not None and record.unit != RECORD:
        raise ArtifactError(f"{where}: its record-level ledger is of unit {record.unit!r}")
    sites = None
    if SITES in data:
        if not isinstance(data[SITES], dict):
            raise ArtifactError(f"{where}: privacy sites is not a JSON object")
        sites = {}
        for site, ledger_data in data[SITES].items():
            ledger = parse_ledger(ledger_data, where)
            if ledger.unit != RECORD or ledger.party != site:
                raise ArtifactError(f"{where}: the ledger recorded for site {site!r} is not that site's")
            sites[site] = ledger
    org = parse_ledger(data[ORGANISATION_LEVEL], where) if ORGANISATION_LEVEL in data else None
    if org is not None and (org.unit != ORGANISATION or org.party != COORDINATOR):
        raise ArtifactError(f"{where}: its organisation-level ledger is not the coordinator's")
    settings = OrganisationDp.from_json(data[ORGANISATION_DP], where) if ORGANISATION_DP in data else None
    participants = _participants(data[PARTICIPANTS], where) if PARTICIPANTS in data else None
    return Privacy(record, sites, org, settings, participants)


def _participants(data: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: privacy participants is not a JSON object")
    out = {}
    for site, rounds in data.items():
        if not isinstance(rounds, list) or not rounds:
            raise ArtifactError(f"{where}: privacy participants of {site!r} is not a list of rounds")
        out[site] = tuple(_integer(r, "participants", where) for r in rounds)
        if out[site][0] < 1 or any(b <= a for a, b in zip(out[site], out[site][1:], strict=False)):
            raise ArtifactError(f"{where}: privacy participants of {site!r} are not increasing from 1")
    return out


def with_participants(
    before: Mapping[str, tuple[int, ...]] | None, clients: list[str], round_index: int
) -> dict[str, tuple[int, ...]] | None:
    """The sites' rounds with an upload after this round's `clients`; None when not known from round
    1 (a chain of files without DP records nothing, so its participants cannot be known later)."""
    if before is None and round_index != 1:
        return None
    out = dict(before or {})
    for client in clients:
        rounds = out.get(client, ())
        if round_index not in rounds:
            out[client] = (*rounds, round_index)
    return out


# --------------------------------------------------------------------------- the coordinator's checks


def merge_site_ledgers(
    recorded: Mapping[str, Ledger],
    uploads: list[tuple[str, int, Ledger | None, str]],
    require_epsilon: float | None,
    participants: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, Ledger]:
    """The sites' ledgers after this round's uploads; PrivacyError for a ledger that cannot be
    accepted. Nothing is written by the caller when this raises.

    recorded: {site: ledger} as the global state carries them.
    uploads: (client id, round, its record-level ledger or None, path) per upload.
    require_epsilon: `aggregate --require-dp EPS`: every upload must carry a ledger whose
    recomputed epsilon is at most EPS.

    Always refused: a ledger of another party, one whose recorded epsilon is not its history's,
    one whose last round is not this round, and one that does not continue the site's recorded
    history (a reset or shortened budget). A site with a recorded ledger whose upload carries
    none gets a round without DP (infinite epsilon), which --require-dp refuses.

    A site's first ledger must cover its whole participation. participants: {site: rounds with
    an upload} as the global state records them since round 1 (None: not known). A site with
    rounds there before its first ledger sent them without DP: its ledger is recorded with those
    rounds as rounds without DP (infinite epsilon), and --require-dp refuses it. When the
    participants are not known, --require-dp refuses a first ledger that begins after round 1:
    nothing shows the site took no part before.
    """
    merged = dict(recorded)
    for client, round_index, ledger, where in uploads:
        before = recorded.get(client)
        if ledger is None:
            if require_epsilon is not None:
                raise PrivacyError(
                    f"{where}: client {client!r} sent an upload with no privacy ledger, and --require-dp"
                    f" {require_epsilon:g} asks for one (train with `train-local --dp-*`)"
                )
            if before is not None:
                merged[client] = before.extended(Release(round_index, NO_DP))
            continue
        if ledger.party != client:
            raise PrivacyError(f"{where}: carries the privacy ledger of {ledger.party!r}, not of {client!r}")
        if ledger.releases[-1].round != round_index:
            raise PrivacyError(
                f"{where}: its privacy ledger ends at round {ledger.releases[-1].round}, not at this"
                f" round {round_index}: the training of this round is not in it"
            )
        recomputed = ledger.recomputed()
        if not epsilon_matches(ledger.epsilon, recomputed):
            raise PrivacyError(
                f"{where}: its privacy ledger records epsilon {ledger.epsilon:.6g}, but its history"
                f" gives {recomputed:.6g}"
            )
        if before is not None and not ledger.continues(before):
            raise PrivacyError(
                f"{where}: client {client!r}'s privacy ledger ({len(ledger.releases)} rounds:"
                f" {ledger.rounds}) does not continue the {len(before.releases)} rounds"
                f" {before.rounds} the global state recorded for it (delta {before.delta:g}): a reset"
                " or rewritten budget"
            )
        if before is None:
            ledger = _whole_participation(ledger, client, participants, require_epsilon, where)
        if require_epsilon is not None and recomputed > require_epsilon:
            raise PrivacyError(
                f"{where}: client {client!r} has spent epsilon {recomputed:.4g} (delta {ledger.delta:g}),"
                f" over --require-dp {require_epsilon:g}"
            )
        merged[client] = ledger
    return merged


def _whole_participation(
    ledger: Ledger,
    client: str,
    participants: Mapping[str, tuple[int, ...]] | None,
    require_epsilon: float | None,
    where: str,
) -> Ledger:
    """A site's first accepted ledger, with the rounds it sent without DP before it (merge_site_ledgers)."""
    first = ledger.releases[0].round
    if participants is None:
        if first > 1 and require_epsilon is not None:
            raise PrivacyError(
                f"{where}: client {client!r}'s privacy ledger begins at round {first}, and nothing"
                " recorded since round 1 shows it sent no upload without DP before (a ledger covers a"
                f" site's whole participation); --require-dp {require_epsilon:g} refuses it"
            )
        return ledger
    earlier = [r for r in participants.get(client, ()) if r < first]
    if not earlier:
        return ledger
    if require_epsilon is not None:
        raise PrivacyError(
            f"{where}: client {client!r} sent round(s) {earlier} without DP before its privacy ledger"
            f" began at round {first}: its epsilon is infinite, over --require-dp {require_epsilon:g}"
        )
    releases = sorted((*(Release(r, NO_DP) for r in earlier), *ledger.releases), key=lambda r: r.round)
    return replace(ledger, releases=tuple(releases), epsilon=math.inf)
