"""Secure aggregation: the coordinator learns the sum of the sites' projected updates, not one site's.

With FedSRD-e's aggregate (no rank truncation) and a download that updates B only, the next
state depends on the sites' updates through

    dB = (W - B A) A^T (A A^T + lam I)^-1 = S (G + lam I)^-1,    G = A A^T (r, r)
    S  = sum_i P_i,    P_i = w (B_i A_i - B A) A^T = w (B_i (A_i A^T) - B G)    (d_out, r)

with w = 1 / (sites on the roster). Each site computes its P_i from its own thin factors,
encodes it in fixed point modulo 2^32 (math.fixedpoint, the roster's range X) and adds a
pairwise mask for every other site on the roster: + PRG(k_ij) if its name sorts before j's,
- PRG(k_ij) otherwise (k_ij from X25519 and HKDF, trust/agreement.py). The masks cancel in the sum,
so the coordinator decodes S to within n / (2 s) per element (s the fixed-point scale) and
nothing else: one masked upload alone is uniformly distributed (the masks of the honest sites
it shares are unknown to the coordinator).

The coordinator writes S as an ordinary FedSRD-e aggregate whose projection on A's row space
is exact, W' = B A + S G^-1 A (left [B, S G^-1], right [A; A]): W' A^T = B G + S, so
`broadcast` with the factor fixed to B (`--factor-choice b`, its default for such an
aggregate) computes exactly dB = S (G + lam I)^-1, the same damping, fit and download mask as
a plain round. (W' differs from W outside A's row space, which a B update never sees; A
updates and the update error, which need all of W, are therefore refused or not recorded.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedsrd_cli.algorithms.base import Payload
from fedsrd_cli.algorithms.private import aggregate_privacy, upload_privacy
from fedsrd_cli.algorithms.protocol import (
    check_local,
    check_same_lora,
    check_same_model,
    describe_state,
    local_quantization,
    round_header,
)
from fedsrd_cli.config import PRIVATE_METHOD, AggregateConfig
from fedsrd_cli.errors import MismatchError, StaleUploadError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import LocalAdapter
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.files.safetensors_io import short
from fedsrd_cli.math import fixedpoint
from fedsrd_cli.privacy.randomness import SecretRandom
from fedsrd_cli.trust.agreement import AgreementKey
from fedsrd_cli.trust.roster import Roster, check_roster_for

SECURE_METHOD = PRIVATE_METHOD  # FedSRD-e: no rank truncation, so the B update is linear in the uploads


def projection(global_state: Artifact, local: LocalAdapter, module: str) -> torch.Tensor:
    """P = (B_i A_i - B A) A^T of one module, unweighted, float64 (d_out, r), from thin factors:
    B_i (A_i A^T) - B (A A^T)."""
    a_prev, b_prev = (t.double() for t in global_state.factors(module))  # (r, d_in), (d_out, r)
    a_new, b_new = (t.double() for t in local.factors(module))
    return b_new @ (a_new @ a_prev.mT) - b_prev @ (a_prev @ a_prev.mT)


def masked_upload(
    global_state: Artifact,
    local: LocalAdapter,
    client: str,
    num_samples: int,
    roster: Roster,
    key: AgreementKey,
    published: Mapping[str, bytes],
) -> Payload:
    """A site's masked upload for `roster` (module docstring).

    published: every other roster site's X25519 public key (agreement.published_key).
    MismatchError when a projected value of any module is outside the roster's range X: the
    roster does not fit this update (nothing is written; the message names the smallest --clip
    that holds every module, for the coordinator's next roster).
    """
    check_local(global_state, local)
    head = global_state.header
    check_roster_for(roster, head.content_hash, head.round + 1, "the roster")
    if client not in roster.sites:
        raise MismatchError(
            f"the roster of round {roster.round} lists {', '.join(roster.sites)}, not {client!r}"
        )
    scale = fixedpoint.scale_for(roster.clip, len(roster.sites))
    modules = global_state.modules()
    values = {module: projection(global_state, local, module) * roster.weight for module in modules}
    largest = {module: float(v.abs().max()) for module, v in values.items()}  # (d_out, r) each
    worst = max(modules, key=largest.__getitem__)
    if largest[worst] > roster.clip:
        raise MismatchError(
            f"a projected value {largest[worst]:.4g} ({worst}) is outside the roster's range"
            f" {roster.clip:g}; ask the coordinator for a roster with --clip at least"
            f" {_round_up(largest[worst]):.3g} (it holds every module)"
        )
    words = {module: fixedpoint.encode(v, scale) for module, v in values.items()}  # int64 in [0, 2^32)
    count = sum(w.numel() for w in words.values())
    for other in roster.sites:
        if other == client:
            continue
        stream = SecretRandom(key.mask_key(other, published[other], roster.hash)).words32(count)
        offset = 0
        for module in modules:
            n = words[module].numel()
            mask = stream[offset : offset + n].reshape(words[module].shape)
            combine = fixedpoint.add if client < other else fixedpoint.subtract
            words[module] = combine(words[module], mask)
            offset += n
    header = round_header(
        global_state,
        "masked_upload",
        method=SECURE_METHOD,
        client_id=client,
        num_samples=num_samples,
        info={
            "secure": secure_info(roster, scale),
            **({"base_quantization": quantized} if (quantized := local_quantization(local)) else {}),
        },
        privacy=upload_privacy(local.header),
    )
    tensors = {naming.masked_key(m): fixedpoint.to_stored(w) for m, w in words.items()}
    return Payload(header, tensors)


def _round_up(value: float, digits: int = 3) -> float:
    """`value` rounded up to `digits` significant digits: a --clip of it holds `value`."""
    exponent = math.floor(math.log10(value)) - digits + 1
    return math.ceil(value / 10.0**exponent) * 10.0**exponent


def secure_info(roster: Roster, scale: int) -> dict:
    return {
        "roster": roster.hash,
        "attempt": roster.attempt,
        "sites": list(roster.sites),
        "clip": roster.clip,
        "scale": scale,
        "modulus": fixedpoint.MODULUS,
    }


def check_masked_upload(global_state: Artifact, upload: Artifact, roster: Roster) -> None:
    """One masked upload answers this round, state and roster, from a site on the roster."""
    head = global_state.header
    where, up = str(upload.path), upload.header
    if up.kind != "masked_upload":
        raise MismatchError(f"{where}: is a plain {up.kind}; a secure round aggregates masked uploads")
    if up.parent_hash != head.content_hash:
        raise StaleUploadError(
            f"{where}: belongs to round {up.round} (made from state {short(up.parent_hash)}), not to"
            f" {describe_state(global_state)}"
        )
    check_same_lora(head.lora, up.lora, where, str(global_state.path))
    check_same_model(global_state, up, where)
    found = up.info.get("secure", {}).get("roster")
    if found != roster.hash:
        raise MismatchError(
            f"{where}: was masked for roster {short(found or '')}, not for this one"
            f" ({short(roster.hash)}, attempt {roster.attempt}): an upload of another roster cannot"
            " be summed with these"
        )
    if up.client_id not in roster.sites:
        raise MismatchError(f"{where}: client {up.client_id!r} is not on the roster")
    for module in global_state.modules():
        name = naming.masked_key(module)
        expected = global_state.shapes[naming.factor_key(module, "B")]
        if upload.shapes.get(name) != expected:
            raise MismatchError(f"{where}: {name} is missing or not of shape {list(expected)}")


def check_masked_uploads(global_state: Artifact, uploads: Sequence[Artifact], roster: Roster) -> None:
    """Every site of the roster sent exactly one upload of this round, state and roster."""
    head = global_state.header
    check_roster_for(roster, head.content_hash, head.round + 1, "the roster")
    seen: dict[str, str] = {}
    for upload in uploads:
        check_masked_upload(global_state, upload, roster)
        client = upload.header.client_id
        if client in seen:
            raise MismatchError(f"{upload.path}: client {client!r} already uploaded {seen[client]}")
        seen[client] = str(upload.path)
    missing = [site for site in roster.sites if site not in seen]
    if missing:
        raise MismatchError(
            f"no upload from {', '.join(missing)} (roster {short(roster.hash)}, attempt"
            f" {roster.attempt}): the masks cannot cancel without them; sign a new roster without them"
            f" (`fedsrd roster --attempt {roster.attempt + 1}`) and let the other sites mask again"
        )


def masked_sum(
    global_state: Artifact, uploads: Sequence[Artifact], roster: Roster
) -> dict[str, torch.Tensor]:
    """{module: S (d_out, r) float64}: the uploads summed modulo 2^32 and decoded."""
    scale = fixedpoint.scale_for(roster.clip, len(roster.sites))
    sums = {}
    for module in global_state.modules():
        name = naming.masked_key(module)
        total = None
        for upload in uploads:
            words = fixedpoint.from_stored(upload.tensor(name))
            total = words if total is None else fixedpoint.add(total, words)
        assert total is not None
        sums[module] = fixedpoint.decode(total, scale)
    return sums


def secure_aggregate(
    global_state: Artifact, uploads: Sequence[Artifact], roster: Roster, config: AggregateConfig
) -> Payload:
    """The aggregate of a secure round: W' = B A + S G^-1 A per module (module docstring)."""
    check_masked_uploads(global_state, uploads, roster)
    privacy = aggregate_privacy(global_state, list(uploads), config)
    sums = masked_sum(global_state, uploads, roster)
    tensors: dict[str, torch.Tensor] = {}
    for module in global_state.modules():
        a_prev, b_prev = (t.double() for t in global_state.factors(module))  # (r, d_in), (d_out, r)
        gram = a_prev @ a_prev.mT  # (r, r)
        try:
            lifted = torch.linalg.solve(gram, sums[module].mT).mT  # S G^-1 (d_out, r)
        except RuntimeError:
            raise MismatchError(
                f"{module}: its A factor is rank-deficient, so a secure round cannot lift the sum"
            ) from None
        left_name, right_name = naming.aggregate_keys(module)
        # float64: the sum keeps its fixed-point precision (the aggregate stays at the coordinator)
        tensors[left_name] = torch.cat([b_prev, lifted], dim=1)  # (d_out, 2r)
        tensors[right_name] = torch.cat([a_prev, a_prev], dim=0)  # (2r, d_in)
    header = round_header(
        global_state,
        "aggregate",
        method=SECURE_METHOD,
        info={
            "weighting": "uniform",
            "secure": secure_info(roster, fixedpoint.scale_for(roster.clip, len(roster.sites))),
            "clients": [
                {"client_id": u.header.client_id, "upload": u.header.content_hash, "weight": roster.weight}
                for u in uploads
            ],
        },
        privacy=privacy,
    )
    return Payload(header, tensors)
