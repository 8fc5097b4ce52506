"""Secure aggregation: the coordinator learns the sum of the sites' projected updates, not one site's.

With FedSRD-e's aggregate (no rank truncation) and a download that updates B only, the next
state depends on the sites' updates through

    dB = (W - B A) A^T (A A^T + lam I)^-1 = S (G + lam I)^-1,    G = A A^T (r, r)
    S  = sum_i P_i,    P_i = w (B_i A_i - B A) A^T = w (B_i (A_i A^T) - B G)    (d_out, r)

with w = 1 / (sites on the roster). Each site computes its P_i from its own thin factors,
encodes it in fixed point modulo 2^b (math.fixedpoint: the roster's range X and word width b,
16 or 32 bits) and adds a pairwise mask for every other site on the roster: + PRG(k_ij) if its
name sorts before j's, - PRG(k_ij) otherwise (k_ij from X25519 and HKDF, trust/agreement.py).
The masks cancel in the sum, so the coordinator decodes S to within n / (2 s) per element (s the
fixed-point scale) and nothing else: one masked upload alone is uniformly distributed (the
masks of the honest sites it shares are unknown to the coordinator).

Below density 1 (a version-2 roster), every site sends the same positions of each module's
projection: a seeded mask of the global state's hash (`public_positions`), public and
independent of any site's data, so it tells nothing. The site owes O = P + R, its projection
plus R, what earlier rounds' positions left out; it sends w O at the positions and keeps
O at the others as its next R (error feedback; post-processing of its update, so under
record-level DP it costs no budget). S is then the sum at the positions and 0 elsewhere. R is a
projection on A's row space, so it carries over while A is unchanged, which secure rounds
(B updates only) keep.

With a roster of `--update-spread`, each site also adds q_i = ||w O_i||_M^2, the squared
weight-space norm of what it sends (||x||_M^2 = tr(x G^-1 x^T) = ||x G^-1 A||_F^2, the move of
the weights B x G^-1 A would make), as a masked total (math.fixedpoint, encode_total: limbs
that cannot wrap, in [0, V] with the public bound V = sum_modules kept X^2 tr(G^-1)). The
coordinator then learns sum_i q_i besides S, and takes FedExP's step from them
(`secure_spread`):

    client_sq = sum_i w ||O_i||_M^2 = (sum_i q_i) / w,    mean_sq = ||S||_M^2

The coordinator writes S as an ordinary FedSRD-e aggregate whose projection on A's row space
is exact, W' = B A + S G^-1 A (left [B, S G^-1], right [A; A]): W' A^T = B G + S, so
`broadcast` with the factor fixed to B (`--factor-choice b`, its default for such an
aggregate) computes exactly dB = S (G + lam I)^-1, the same damping, fit and download mask as
a plain round. (W' differs from W outside A's row space, which a B update never sees; A
updates and the update error, which need all of W, are therefore refused or not recorded.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
from fedsrd_cli.errors import MismatchError, StaleUploadError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import LocalAdapter
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.files.residual import Residual
from fedsrd_cli.files.safetensors_io import content_hash, short
from fedsrd_cli.limits import MAX_SERVER_LR
from fedsrd_cli.math import fixedpoint
from fedsrd_cli.math.extrapolation import fedexp_step
from fedsrd_cli.math.masks import count_kept, seeded_keep_mask, text_seed
from fedsrd_cli.privacy.randomness import SecretRandom
from fedsrd_cli.trust.agreement import AgreementKey
from fedsrd_cli.trust.roster import MIN_DENSITY, MIN_SITES_FLOOR, Roster, check_roster_for

SECURE_METHOD = PRIVATE_METHOD  # FedSRD-e: no rank truncation, so the B update is linear in the uploads


def projection(global_state: Artifact, local: LocalAdapter, module: str) -> torch.Tensor:
    """P = (B_i A_i - B A) A^T of one module, unweighted, float64 (d_out, r), from thin factors:
    B_i (A_i A^T) - B (A A^T)."""
    a_prev, b_prev = (t.double() for t in global_state.factors(module))  # (r, d_in), (d_out, r)
    a_new, b_new = (t.double() for t in local.factors(module))
    return b_new @ (a_new @ a_prev.mT) - b_prev @ (a_prev @ a_prev.mT)


@dataclass(frozen=True)
class SecureFloor:
    """What a site accepts of a roster: at least `min_sites` sites (2 at the least: one site's
    sum is its update), a density of at least `min_density` and words of at least
    `min_word_bits` bits (`sparsify --min-sites --min-density --min-word-bits`); with
    `allow_spread` False (`--refuse-spread`), no roster that asks for the squared update norm."""

    min_sites: int = MIN_SITES_FLOOR
    min_density: float = MIN_DENSITY
    min_word_bits: int = 16
    allow_spread: bool = True

    def __post_init__(self) -> None:
        if self.min_sites < MIN_SITES_FLOOR:
            raise UsageError(f"--min-sites must be at least {MIN_SITES_FLOOR}, got {self.min_sites}")
        if not (math.isfinite(self.min_density) and MIN_DENSITY <= self.min_density <= 1.0):
            raise UsageError(f"--min-density must be in [{MIN_DENSITY}, 1], got {self.min_density}")
        if self.min_word_bits not in fixedpoint.WORD_BITS:
            raise UsageError(f"--min-word-bits must be 16 or 32, got {self.min_word_bits}")

    def check(self, roster: Roster) -> None:
        """MismatchError, in one line, for a roster below this floor."""
        if len(roster.sites) < self.min_sites:
            raise MismatchError(
                f"the roster lists {len(roster.sites)} sites, fewer than --min-sites {self.min_sites}:"
                " with so few sites the sum tells too much about each one"
            )
        if roster.density < self.min_density:
            raise MismatchError(
                f"the roster's density {roster.density:g} is below this site's --min-density"
                f" {self.min_density:g}: ask the coordinator for a denser roster"
            )
        if roster.word_bits < self.min_word_bits:
            raise MismatchError(
                f"the roster's {roster.word_bits}-bit words are narrower than this site's"
                f" --min-word-bits {self.min_word_bits}: ask the coordinator for --word-bits"
                f" {self.min_word_bits}"
            )
        if roster.spread and not self.allow_spread:
            raise MismatchError(
                "the roster asks every site to add its squared update norm to the sum (roster"
                " --update-spread), which this site refuses (--refuse-spread): ask the coordinator"
                " for a roster without it"
            )


def public_positions(state_hash: str, module: str, shape: torch.Size, density: float) -> torch.Tensor | None:
    """The positions of `module`'s projection that every site of the round sends: a bool mask of
    `shape` (d_out, r), each position kept with probability `density`, drawn from a seed of the
    global state's hash alone (math.masks.seeded_keep_mask), so it is public and depends on no
    site's data. None at density 1: every position."""
    if density >= 1.0:
        return None
    return seeded_keep_mask(
        _positions_seed(state_hash), naming.masked_key(module), tuple(shape), 1.0 - density
    )


def _positions_seed(state_hash: str) -> int:
    """The seed of a round's public positions: a function of the global state's hash alone."""
    return text_seed(f"{state_hash}:secure_positions")


@functools.lru_cache(maxsize=4096)
def _kept(state_hash: str, module: str, shape: tuple[int, ...], density: float) -> int:
    """How many of `module`'s positions the round sends (public_positions' count), drawn once per
    round and module however many uploads are checked."""
    return count_kept(_positions_seed(state_hash), naming.masked_key(module), math.prod(shape), 1.0 - density)


def masked_upload(
    global_state: Artifact,
    local: LocalAdapter,
    client: str,
    num_samples: int,
    roster: Roster,
    key: AgreementKey,
    published: Mapping[str, bytes],
    carried: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Payload, dict[str, torch.Tensor]]:
    """A site's masked upload for `roster` (module docstring), and what it leaves behind.

    The site owes O = P + R per module (d_out, r): its projection P plus R, what earlier rounds'
    public positions left out (`carried`, unweighted; none in its first round). It sends
    w O at the roster's public positions (all of them at density 1) and keeps the rest,
    O * (1 - positions), for its next round (error feedback): the returned {module: (d_out, r)},
    empty at density 1.
    published: every other roster site's X25519 public key (agreement.published_key).
    MismatchError when a sent value of any module is outside the roster's range X: the roster
    does not fit this update (nothing is written; the message names the smallest --clip that
    holds every module, for the coordinator's next roster).
    """
    check_local(global_state, local)
    head = global_state.header
    check_roster_for(roster, head.content_hash, head.round + 1, "the roster")
    if client not in roster.sites:
        raise MismatchError(
            f"the roster of round {roster.round} lists {', '.join(roster.sites)}, not {client!r}"
        )
    bits = roster.word_bits
    scale = fixedpoint.scale_for(roster.clip, len(roster.sites), bits)
    modules = global_state.modules()
    values: dict[str, torch.Tensor] = {}  # what is sent: w O at the public positions
    matrices: dict[str, torch.Tensor] = {}  # the same as (d_out, r)
    left: dict[str, torch.Tensor] = {}
    for module in modules:
        owed = projection(global_state, local, module)  # (d_out, r)
        if carried is not None and module in carried:
            owed = owed + carried[module].double()
        positions = public_positions(head.content_hash, module, owed.shape, roster.density)
        sent = owed * roster.weight  # (d_out, r)
        if positions is None:
            values[module] = sent
        else:
            values[module] = sent[positions]  # (kept,)
            left[module] = owed.masked_fill(positions, 0.0)
            sent = sent.masked_fill(~positions, 0.0)
        matrices[module] = sent  # (d_out, r), zeros where nothing is sent
    largest = {module: float(v.abs().max()) if v.numel() else 0.0 for module, v in values.items()}
    worst = max(modules, key=largest.__getitem__)
    if largest[worst] > roster.clip:
        raise MismatchError(
            f"a projected value {largest[worst]:.4g} ({worst}) is outside the roster's range"
            f" {roster.clip:g}; ask the coordinator for a roster with --clip at least"
            f" {_round_up(largest[worst]):.3g} (it holds every module)"
        )
    # every masked tensor, in the order the pairwise streams cover them: int64 words in [0, 2^b)
    words = {naming.masked_key(m): fixedpoint.encode(v, scale, bits) for m, v in values.items()}
    if roster.spread:
        inverses = inverse_grams(global_state)
        sent_sq = sum(weight_norm_sq(matrices[m], inverses[m]) for m in modules)  # q_i
        bound = spread_bound(global_state, roster, inverses)
        words[naming.MASKED_SPREAD] = fixedpoint.encode_total(sent_sq, bound, len(roster.sites), bits)
    count = sum(w.numel() for w in words.values())
    for other in roster.sites:
        if other == client:
            continue
        stream = SecretRandom(key.mask_key(other, published[other], roster.hash)).words(count, bits)
        offset = 0
        for name, mine in words.items():
            n = mine.numel()
            mask = stream[offset : offset + n].reshape(mine.shape)
            combine = fixedpoint.add if client < other else fixedpoint.subtract
            words[name] = combine(mine, mask, bits)
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
    tensors = {name: fixedpoint.to_stored(w, bits) for name, w in words.items()}
    return Payload(header, tensors), left


def _round_up(value: float, digits: int = 3) -> float:
    """`value` rounded up to `digits` significant digits: a --clip of it holds `value`."""
    exponent = math.floor(math.log10(value)) - digits + 1
    return math.ceil(value / 10.0**exponent) * 10.0**exponent


def inverse_grams(global_state: Artifact) -> dict[str, torch.Tensor]:
    """{module: G^-1 (r, r) float64}, G = A A^T of the state's A: the weight-space metric of a
    projection (module docstring). MismatchError when an A is rank-deficient."""
    inverses = {}
    for module in global_state.modules():
        a_prev = global_state.factors(module)[0].double()  # (r, d_in)
        try:
            inverses[module] = torch.linalg.inv(a_prev @ a_prev.mT)
        except RuntimeError:
            raise _rank_deficient(module) from None
    return inverses


def _rank_deficient(module: str) -> MismatchError:
    """The refusal of a module whose G = A A^T cannot be inverted."""
    return MismatchError(f"{module}: its A factor is rank-deficient, so a secure round cannot lift the sum")


def weight_norm_sq(x: torch.Tensor, inverse: torch.Tensor) -> float:
    """||x||_M^2 = tr(x G^-1 x^T) for x (d_out, r), inverse = G^-1 (r, r): ||x G^-1 A||_F^2."""
    return float(((x.double() @ inverse) * x.double()).sum())


def spread_bound(global_state: Artifact, roster: Roster, inverses: Mapping[str, torch.Tensor]) -> float:
    """V = sum_modules kept X^2 tr(G^-1): no site's q_i can exceed it, since every sent value is
    within X and tr(x G^-1 x^T) <= ||x||_F^2 tr(G^-1). Public: the state's A and the roster."""
    head = global_state.header
    total = 0.0
    for module, inverse in inverses.items():
        shape = global_state.shapes[naming.factor_key(module, "B")]
        kept = (
            math.prod(shape)
            if roster.density >= 1.0
            else _kept(head.content_hash, module, tuple(shape), roster.density)
        )
        total += kept * roster.clip**2 * float(inverse.diagonal().sum())
    return total


def secure_info(roster: Roster, scale: int) -> dict:
    """info.secure of a masked upload and a secure aggregate (density and word width from a
    version-2 roster on)."""
    return {
        "roster": roster.hash,
        "attempt": roster.attempt,
        "sites": list(roster.sites),
        "clip": roster.clip,
        "scale": scale,
        "modulus": fixedpoint.modulus(roster.word_bits),
        **({} if roster.version == 1 else {"density": roster.density, "word_bits": roster.word_bits}),
        **({"spread": True} if roster.spread else {}),
    }


def a_factors_hash(global_state: Artifact) -> str:
    """Content hash of the state's A factors: a residual is kept against them."""
    return content_hash(
        {naming.factor_key(m, "A"): global_state.factors(m)[0] for m in global_state.modules()}
    )


def carried_residual(
    residual: Residual, global_state: Artifact, client: str, where: str
) -> dict[str, torch.Tensor]:
    """{module: R (d_out, r)} of the site's residual of an earlier round, checked against this
    round (MismatchError): the same site, an earlier round, the same A factors and shapes."""
    head = global_state.header
    if residual.client != client:
        raise MismatchError(f"{where}: is {residual.client!r}'s residual, not {client!r}'s")
    if residual.round > head.round:
        raise MismatchError(
            f"{where}: was left by round {residual.round}; round {head.round + 1} sends only a residual"
            " of an earlier round"
        )
    if residual.a_factors != a_factors_hash(global_state):
        raise MismatchError(
            f"{where}: was kept against other A factors than {describe_state(global_state)}'s (a round"
            " that changed A came between), so it no longer adds up; leave --residual-in out to start"
            " afresh (what it held is dropped)"
        )
    modules = set(global_state.modules())
    if set(residual.modules) != modules:
        raise MismatchError(f"{where}: holds other modules than the global state's")
    for module, tensor in residual.modules.items():
        shape = global_state.shapes[naming.factor_key(module, "B")]
        if tensor.shape != shape:
            raise MismatchError(f"{where}: {module}'s residual is {list(tensor.shape)}, not {list(shape)}")
    return dict(residual.modules)


def next_residual(global_state: Artifact, client: str, left: Mapping[str, torch.Tensor]) -> Residual:
    """What this round's upload left behind, as the site keeps it (zeros at density 1)."""
    head = global_state.header
    modules = {
        m: left[m] if m in left else torch.zeros(global_state.shapes[naming.factor_key(m, "B")])
        for m in global_state.modules()
    }
    return Residual(client, head.round + 1, head.content_hash, a_factors_hash(global_state), modules)


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
    scale = fixedpoint.scale_for(roster.clip, len(roster.sites), roster.word_bits)
    if up.info["secure"] != secure_info(roster, scale):
        raise MismatchError(
            f"{where}: its fixed point or density ({_words_of(up.info['secure'])}) is not the roster's"
            f" ({_words_of(secure_info(roster, scale))}): uploads of different densities or word"
            " widths cannot be summed; the site must mask again with this fedsrd and roster"
        )
    for module in global_state.modules():
        name = naming.masked_key(module)
        shape = global_state.shapes[naming.factor_key(module, "B")]
        expected = (
            tuple(shape)
            if roster.density >= 1.0
            else (_kept(head.content_hash, module, shape, roster.density),)
        )
        if upload.shapes.get(name) != expected:
            raise MismatchError(f"{where}: {name} is missing or not of shape {list(expected)}")
    limbs = (fixedpoint.limb_count(len(roster.sites), roster.word_bits),) if roster.spread else None
    if upload.shapes.get(naming.MASKED_SPREAD) != limbs:
        wrong = f"missing or not of shape {list(limbs)}" if limbs else "there, but the roster asks for none"
        raise MismatchError(f"{where}: {naming.MASKED_SPREAD} is {wrong}")


def _words_of(secure: Mapping) -> str:
    return (
        f"density {secure.get('density', 1.0):g}, {secure.get('word_bits', 32)}-bit words,"
        f" scale {secure.get('scale')}"
    )


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


def _summed_words(uploads: Sequence[Artifact], name: str, bits: int) -> torch.Tensor:
    """The uploads' masked tensor `name` summed modulo 2^b: int64 words in [0, 2^b)."""
    total = None
    for upload in uploads:
        words = fixedpoint.from_stored(upload.tensor(name), bits)
        total = words if total is None else fixedpoint.add(total, words, bits)
    if total is None:
        raise MismatchError("a secure round sums at least one upload")
    return total


def masked_sum(
    global_state: Artifact, uploads: Sequence[Artifact], roster: Roster
) -> dict[str, torch.Tensor]:
    """{module: S (d_out, r) float64}: the uploads summed modulo 2^b and decoded, 0 where the
    round's public positions sent nothing."""
    bits = roster.word_bits
    scale = fixedpoint.scale_for(roster.clip, len(roster.sites), bits)
    state_hash = global_state.header.content_hash
    sums = {}
    for module in global_state.modules():
        total = _summed_words(uploads, naming.masked_key(module), bits)
        shape = global_state.shapes[naming.factor_key(module, "B")]
        positions = public_positions(state_hash, module, shape, roster.density)
        decoded = fixedpoint.decode(total, scale, bits)
        if positions is None:
            sums[module] = decoded  # (d_out, r)
        else:
            sums[module] = torch.zeros(shape, dtype=torch.float64).masked_scatter(positions, decoded)
    return sums


def secure_aggregate(
    global_state: Artifact, uploads: Sequence[Artifact], roster: Roster, config: AggregateConfig
) -> Payload:
    """The aggregate of a secure round: W' = B A + S G^-1 A per module (module docstring)."""
    check_masked_uploads(global_state, uploads, roster)
    privacy = aggregate_privacy(global_state, list(uploads), config)
    sums = masked_sum(global_state, uploads, roster)
    if config.update_spread and not roster.spread:
        raise MismatchError(
            f"roster {short(roster.hash)} was made without --update-spread, so its uploads carry no"
            " squared norms: aggregate without --update-spread (and broadcast with --step-rule fixed),"
            " or ask the sites to mask again for a roster made with it"
        )
    spread = secure_spread(global_state, uploads, roster, sums) if config.update_spread else {}
    tensors: dict[str, torch.Tensor] = {}
    for module in global_state.modules():
        a_prev, b_prev = (t.double() for t in global_state.factors(module))  # (r, d_in), (d_out, r)
        gram = a_prev @ a_prev.mT  # (r, r)
        try:
            lifted = torch.linalg.solve(gram, sums[module].mT).mT  # S G^-1 (d_out, r)
        except RuntimeError:
            raise _rank_deficient(module) from None
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
            "secure": secure_info(
                roster, fixedpoint.scale_for(roster.clip, len(roster.sites), roster.word_bits)
            ),
            "clients": [
                {"client_id": u.header.client_id, "upload": u.header.content_hash, "weight": roster.weight}
                for u in uploads
            ],
            **spread,
        },
        privacy=privacy,
    )
    return Payload(header, tensors)


def secure_spread(
    global_state: Artifact,
    uploads: Sequence[Artifact],
    roster: Roster,
    sums: Mapping[str, torch.Tensor],
) -> dict:
    """The aggregate's info entry "update_spread" of a secure round (module docstring): the
    sites' masked totals summed, sum_i q_i, and S, in the weight-space metric M:

        client_sq = sum_i q_i / w,   mean_sq = sum_modules ||S||_M^2,
        eta = max(1, client_sq / (2 mean_sq)), at most MAX_SERVER_LR (math.extrapolation)

    Both measure what the sites sent (w O_i: projection and carried residual at the public
    positions), the vectors whose mean S is."""
    bits, parties = roster.word_bits, len(roster.sites)
    inverses = inverse_grams(global_state)
    total = _summed_words(uploads, naming.MASKED_SPREAD, bits)
    sent_sq = fixedpoint.decode_total(total, spread_bound(global_state, roster, inverses), parties, bits)
    client_sq = sent_sq / roster.weight
    mean_sq = sum(weight_norm_sq(sums[m], inverses[m]) for m in global_state.modules())
    eta = fedexp_step(client_sq, mean_sq, MAX_SERVER_LR)
    return {
        "update_spread": {
            "client_sq": client_sq,
            "mean_sq": mean_sq,
            "extrapolation": round(eta, 6),
            "source": "secure_sum",
        }
    }
