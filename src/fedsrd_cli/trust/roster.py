"""The round roster of secure aggregation: which sites mask for each other, signed by the coordinator.

A roster file is JSON:

    {"kind": "fedsrd-roster", "version": 1, "round": t, "state": "sha256:..." (the global state
     the round starts from), "sites": [sorted site ids], "attempt": k (1, then 2, 3 ... when a
     site dropped out and the coordinator re-issued it), "clip": X (the fixed-point range of
     every masked value),
     "signer": "coordinator", "signer_key": "sha256:...", "signature": base64(...)}

Version 2 adds "density" (the share of each projection's positions that every site sends, a
public mask of the state's hash) and "word_bits" (16 or 32: the fixed-point word of each
masked value). A roster of density 1 and 32-bit words is written as version 1, without them,
so it is byte for byte what it was. A version-2 roster may also carry "spread": true (`roster
--update-spread`): every site then adds its squared update norm to the masked sum, so the
coordinator learns that one total besides the sum and can take FedExP's step
(algorithms/secure.py; docs/security.md says what the total tells).

Its hash is "sha256:" + hex(sha256(canonical JSON of every field but the three signature
fields)), canonical = sorted keys, no spaces; the signature is the coordinator's Ed25519
signature of b"fedsrd-roster-v1\\n" + that sha256 digest. Masks are derived from the hash
(agreement.py), so each attempt's masks are independent of the others'.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedsrd_cli.errors import ArtifactError, MismatchError, TrustError, UsageError
from fedsrd_cli.files.atomic import write_bytes_atomic
from fedsrd_cli.files.safetensors_io import short
from fedsrd_cli.math import fixedpoint
from fedsrd_cli.trust.signing import COORDINATOR, SigningKey, Trust, check_party_name, key_id

SIGNATURE_FIELDS = ("signer", "signer_key", "signature")
MESSAGE_PREFIX = b"fedsrd-roster-v1\n"
# A roster of one site would hand its update to the coordinator; sites refuse fewer than this.
MIN_SITES_FLOOR = 2
MAX_SITES = 100_000
# The sparsest public positions a roster may ask for: a site keeps what they leave out and sends
# it later (error feedback), so a low density delays its update; below 1% the delay is the run.
MIN_DENSITY = 0.01
DENSE, WIDE = 1.0, 32  # version 1's implicit density and word width


@dataclass(frozen=True)
class Roster:
    round: int
    state: str
    sites: tuple[str, ...]
    attempt: int
    clip: float
    density: float = DENSE
    word_bits: int = WIDE
    spread: bool = False

    @property
    def version(self) -> int:
        return 1 if (self.density, self.word_bits, self.spread) == (DENSE, WIDE, False) else 2

    def body(self) -> dict:
        extra = {} if self.version == 1 else {"density": self.density, "word_bits": self.word_bits}
        if self.spread:
            extra["spread"] = True
        return {
            "kind": "fedsrd-roster",
            "version": self.version,
            "round": self.round,
            "state": self.state,
            "sites": list(self.sites),
            "attempt": self.attempt,
            "clip": self.clip,
            **extra,
        }

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(
            json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()
        ).digest()

    @property
    def hash(self) -> str:
        return "sha256:" + self.digest.hex()

    @property
    def weight(self) -> float:
        """Every site's aggregation weight: 1 / (sites on the roster)."""
        return 1.0 / len(self.sites)


def make_roster(
    state_hash: str,
    round_index: int,
    sites: list[str],
    attempt: int,
    clip: float,
    density: float = DENSE,
    word_bits: int = WIDE,
    spread: bool = False,
) -> Roster:
    """A roster, its values checked (UsageError)."""
    for site in sites:
        check_party_name(site, "--sites")
    if len(set(sites)) != len(sites):
        raise UsageError("--sites names a site twice")
    if not MIN_SITES_FLOOR <= len(sites) <= MAX_SITES:
        raise UsageError(f"a roster lists {MIN_SITES_FLOOR} to {MAX_SITES:,} sites, got {len(sites)}")
    if not 1 <= attempt <= 1000:
        raise UsageError(f"--attempt must be in [1, 1,000], got {attempt}")
    if not (math.isfinite(clip) and 0 < clip <= 1e6):
        raise UsageError(f"--clip must be in (0, 1,000,000], got {clip}")
    if not (math.isfinite(density) and MIN_DENSITY <= density <= 1.0):
        raise UsageError(f"--secure-density must be in [{MIN_DENSITY}, 1], got {density}")
    if word_bits not in fixedpoint.WORD_BITS:
        raise UsageError(f"--word-bits must be 16 or 32, got {word_bits}")
    if len(sites) > fixedpoint.max_parties(word_bits):
        raise UsageError(
            f"{word_bits}-bit words hold the sum of at most {fixedpoint.max_parties(word_bits):,} sites"
            f" at {fixedpoint.MIN_LEVELS} levels each; {len(sites)} need --word-bits 32"
        )
    roster = Roster(
        round_index,
        state_hash,
        tuple(sorted(sites)),
        attempt,
        float(clip),
        float(density),
        word_bits,
        bool(spread),
    )
    if not _has_precision(roster):
        raise UsageError(
            f"--clip {clip:g} over {len(sites)} sites leaves no precision in {word_bits}-bit words:"
            " lower --clip or use --word-bits 32"
        )
    return roster


def write_roster(path: str | os.PathLike, roster: Roster, signer: SigningKey, force: bool = False) -> None:
    """Sign `roster` as the coordinator and write it (atomically)."""
    if signer.name != COORDINATOR:
        raise UsageError(f"a roster is signed by `coordinator`, not {signer.name!r} (--sign-key)")
    signature = signer.private.sign(MESSAGE_PREFIX + roster.digest)
    data = {
        **roster.body(),
        "signer": signer.name,
        "signer_key": signer.key_id,
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), force)


def read_roster(path: str | os.PathLike, trust: Trust) -> Roster:
    """A roster file, its signature checked against the trusted `coordinator` key (TrustError)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        roster = Roster(
            int(data["round"]),
            str(data["state"]),
            tuple(str(s) for s in data["sites"]),
            int(data["attempt"]),
            float(data["clip"]),
            float(data.get("density", DENSE)),
            int(data.get("word_bits", WIDE)),
            data.get("spread", False),
        )
        signed = (data["signer"], data["signer_key"], base64.b64decode(data["signature"], validate=True))
        known = (data["kind"], data["version"])
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such roster file") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: not a readable roster ({type(err).__name__}: {err})") from None
    if known[0] != "fedsrd-roster" or known[1] not in (1, 2):
        raise ArtifactError(f"{path}: not a fedsrd roster (version 1 or 2)")
    if known[1] != roster.version or set(data) != {*roster.body(), *SIGNATURE_FIELDS}:
        raise ArtifactError(
            f"{path}: not a fedsrd roster of version {known[1]} (its fields or its density and word"
            " width do not match its version)"
        )
    if not isinstance(roster.spread, bool):
        raise ArtifactError(f"{path}: its spread is {roster.spread!r}, not true or false")
    if not (MIN_DENSITY <= roster.density <= 1.0) or roster.word_bits not in fixedpoint.WORD_BITS:
        raise ArtifactError(
            f"{path}: density {roster.density} or word width {roster.word_bits} is outside what a"
            f" roster may ask ([{MIN_DENSITY}, 1]; 16 or 32 bits)"
        )
    if len(roster.sites) > fixedpoint.max_parties(roster.word_bits) or not _has_precision(roster):
        raise ArtifactError(
            f"{path}: {len(roster.sites)} sites at clip {roster.clip:g} do not fit {roster.word_bits}-bit"
            " words (the sum could wrap, or no precision is left)"
        )
    if list(roster.sites) != sorted(set(roster.sites)) or len(roster.sites) < MIN_SITES_FLOOR:
        raise ArtifactError(
            f"{path}: its sites are not a sorted list of at least {MIN_SITES_FLOOR} distinct ids"
        )
    signer, signer_key, signature = signed
    if signer != COORDINATOR or COORDINATOR not in trust.keys:
        raise TrustError(f"{path}: a roster must be signed by `coordinator` (signed by {signer!r})")
    if signer_key != key_id(trust.keys[COORDINATOR]):
        raise TrustError(f"{path}: signed with another key than coordinator.pub: forged")
    try:
        Ed25519PublicKey.from_public_bytes(trust.keys[COORDINATOR]).verify(
            signature, MESSAGE_PREFIX + roster.digest
        )
    except InvalidSignature:
        raise TrustError(
            f"{path}: the coordinator's signature does not verify (modified after signing)"
        ) from None
    return roster


def _has_precision(roster: Roster) -> bool:
    try:
        fixedpoint.scale_for(roster.clip, len(roster.sites), roster.word_bits)
    except ValueError:
        return False
    return True


def check_roster_for(roster: Roster, state_hash: str, round_index: int, where: str) -> None:
    """The roster must be this round's, of this global state (MismatchError)."""
    if roster.state != state_hash or roster.round != round_index:
        raise MismatchError(
            f"{where}: is the roster of round {roster.round} from state {short(roster.state)}, not of"
            f" round {round_index} from {short(state_hash)}"
        )
