"""The interchangeable pieces every method is built from (docs/algorithms.md).

A method is three choices, one per step, each a pure function over one factor or
one module (the math itself lives in fedsrd_cli.math):

- an *encoder* (client): one factor's dense delta -> what is uploaded for it
  (dense values, or kept values + a mask);
- a *combiner* (coordinator): the round's uploads of one module -> the factored
  aggregate (left (d_out, k), right (k, d_in));
- a *decomposer* (coordinator): the previous factors and the aggregate of one
  module -> the factor deltas to broadcast, zero outside the round's download mask.

`method.Method` runs them module by module and handles files' headers and checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from fedsrd_cli.algorithms.site_rank import padded_upload
from fedsrd_cli.config import SparsifyConfig
from fedsrd_cli.errors import MismatchError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.math.importance import (
    adaptive_ratio,
    importance_a,
    importance_b,
    l1_rescale,
    pearson_kurtosis,
    sparsify_delta,
)
from fedsrd_cli.math.lowrank import (
    balanced_factors,
    choose_factor,
    masked_update_a,
    masked_update_b,
    pad_factors,
    product_svd,
    randomized_svd,
    scheduled_factor,
    stack_factors,
    update_a,
    update_b,
)
from fedsrd_cli.math.lowrank_products import TargetProducts, one_factor_misses
from fedsrd_cli.math.masks import seeded_keep_mask, text_seed

# --------------------------------------------------------------------------- client: encoders


@dataclass(frozen=True)
class FactorDelta:
    """One factor of one module, as a client's upload step sees it.

    name: PEFT name of the factor; factor: "A" or "B"; delta: the dense fp32 change,
    (r, d_in) for A or (d_out, r) for B; a_prev (r, d_in): the global A the client
    started from; b_new (d_out, r): the client's trained B (the importance scores need
    both); seed: the upload seed of this client and round (random encoders).
    """

    name: str
    factor: str
    delta: torch.Tensor
    a_prev: torch.Tensor
    b_new: torch.Tensor
    seed: int


@dataclass(frozen=True)
class Encoded:
    """What one factor uploads: `values` of the full shape and `kept` None (dense), or
    the pruned dense delta in `values` with its bool mask `kept` (sparse); `ratio` is the
    pruned fraction to record (None when there is nothing to report)."""

    values: torch.Tensor
    kept: torch.Tensor | None
    ratio: float | None = None


def upload_seed(parent_hash: str, client_id: str) -> int:
    """Seed of a client's random upload mask in a round: sha256(f"{parent_hash}:{client_id}")
    read as a 60-bit integer, so a re-run reproduces the same upload."""
    return text_seed(f"{parent_hash}:{client_id}")


def importance_scores(item: FactorDelta) -> torch.Tensor:
    """FedSRD's importance of each element of the delta (method section 1)."""
    if item.factor == "B":
        return importance_b(item.delta, item.a_prev)
    return importance_a(item.delta, item.b_new)


def encode_dense(item: FactorDelta, config: SparsifyConfig) -> Encoded:
    """Dense upload: the whole delta."""
    return Encoded(item.delta, None)


def encode_importance(item: FactorDelta, config: SparsifyConfig) -> Encoded:
    """FedSRD: keep elements above the kurtosis-adaptive quantile of their importance."""
    pruned, kept, ratio = sparsify_delta(
        item.delta,
        importance_scores(item),
        config.base_sparsity,
        config.kurtosis_coeff,
        config.kurtosis_cap,
        config.rescale,
    )
    return Encoded(pruned, kept, ratio)


def encode_fixed_ratio(item: FactorDelta, config: SparsifyConfig) -> Encoded:
    """FedSRD with the kurtosis term off: rho = base_sparsity for every matrix."""
    pruned, kept, ratio = sparsify_delta(
        item.delta, importance_scores(item), config.base_sparsity, 0.0, 0.0, config.rescale
    )
    return Encoded(pruned, kept, ratio)


def encode_random_importance_ratio(item: FactorDelta, config: SparsifyConfig) -> Encoded:
    """Random elements instead of the most important ones, as many as FedSRD would keep.

    rho = FedSRD's adaptive ratio of this matrix (from its importance scores); each element
    is kept independently with probability 1 - rho (seeded mask of `item.seed`), then the
    kept delta is L1-rescaled as FedSRD does (when config.rescale).
    """
    scores = importance_scores(item)
    ratio = adaptive_ratio(
        pearson_kurtosis(scores), config.base_sparsity, config.kurtosis_coeff, config.kurtosis_cap
    )
    kept = seeded_keep_mask(item.seed, item.name, tuple(item.delta.shape), ratio)
    if config.rescale:
        pruned = l1_rescale(item.delta, kept)
    else:
        pruned = torch.where(kept, item.delta, torch.zeros_like(item.delta))
    return Encoded(pruned, kept, ratio)


def encode_dare(item: FactorDelta, config: SparsifyConfig) -> Encoded:
    """DARE: keep each element with probability 1 - p (p = config.upload_drop, seeded mask of
    `item.seed`) and divide the kept values by 1 - p, so the expected upload is the delta."""
    p = config.upload_drop
    kept = seeded_keep_mask(item.seed, item.name, tuple(item.delta.shape), p)
    scaled = item.delta.double() / (1.0 - p)
    pruned = torch.where(kept, scaled, torch.zeros_like(scaled)).to(item.delta.dtype)
    return Encoded(pruned, kept, p)


# --------------------------------------------------------------------------- coordinator: combiners


# A client's stored delta of one factor: (positions (c,) int32 or None when dense, values (c,) fp32).
StoredDelta = tuple[torch.Tensor | None, torch.Tensor]


class ReconstructedFactors(Sequence[torch.Tensor]):
    """Every client's factor of one module, prev + delta_i (float64), rebuilt on each access.

    prev (rows, cols) float64; entries[i] is client i's delta as its upload stores it
    (StoredDelta), or None when client i left this factor unchanged. A module's m clients
    cost what their uploads hold (8 bytes per kept element), not m dense float64 factors,
    so routes that read the clients block by block (steps.truncated_svd) keep memory flat.
    """

    def __init__(self, prev: torch.Tensor, entries: Sequence[StoredDelta | None]):
        self.prev = prev
        self.entries = list(entries)

    @classmethod
    def from_factors(cls, prev: torch.Tensor, factors: Sequence[torch.Tensor]) -> ReconstructedFactors:
        """From dense factors (rows, cols) each: their deltas to prev, stored dense."""
        return cls(prev, [(None, (f.double() - prev).float().reshape(-1)) for f in factors])

    @property
    def changed(self) -> bool:
        """Whether any client changed this factor."""
        return any(entry is not None for entry in self.entries)

    def extended(self, count: int) -> ReconstructedFactors:
        """These clients, then `count` more that left the factor at prev."""
        return ReconstructedFactors(self.prev, [*self.entries, *([None] * count)])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry = self.entries[index]
        if entry is None:
            return self.prev
        positions, values = entry
        delta = values.double() if positions is None else _scatter(positions, values, self.prev.numel())
        return self.prev + delta.reshape(self.prev.shape)


def _scatter(positions: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    dense = torch.zeros(numel, dtype=torch.float64)
    dense[positions.long()] = values.double()
    return dense


@dataclass(frozen=True)
class ClientFactors:
    """One module's previous factors and every client's reconstructed ones (float64).

    module: its name (seeds the randomized route); a_prev (r, d_in), b_prev (d_out, r);
    as_[i] = a_prev + dA_i, bs[i] = b_prev + dB_i (a factor a client did not upload counts
    as unchanged), rebuilt on access from the uploads' stored deltas.
    """

    module: str
    a_prev: torch.Tensor
    b_prev: torch.Tensor
    as_: ReconstructedFactors
    bs: ReconstructedFactors

    @property
    def changed_a(self) -> bool:
        return self.as_.changed

    @property
    def changed_b(self) -> bool:
        return self.bs.changed


def _stored(upload: Artifact, name: str, prev: torch.Tensor, padding: str) -> StoredDelta | None:
    if upload.header.site_rank() and (padding != "global" or name in upload.header.layout):
        return None, padded_upload(upload, name, prev, padding).float().reshape(-1)
    found = upload.upload_entries(name)
    if found is None:
        return None
    positions, values = found
    return (None if positions is None else positions.to(torch.int32)), values


def client_factors(
    global_state: Artifact, uploads: Sequence[Artifact], module: str, padding: str = "global"
) -> ClientFactors:
    """Reconstruct every client's factors of `module` from the uploads (method section 2); an
    upload of a site rank below r is padded back to rank r (algorithms.site_rank, `padding`)."""
    a_prev, b_prev = (t.double() for t in global_state.factors(module))
    name_a, name_b = naming.factor_key(module, "A"), naming.factor_key(module, "B")
    return ClientFactors(
        module,
        a_prev,
        b_prev,
        ReconstructedFactors(a_prev, [_stored(u, name_a, a_prev, padding) for u in uploads]),
        ReconstructedFactors(b_prev, [_stored(u, name_b, b_prev, padding) for u in uploads]),
    )


def clip_clients(
    clients: ClientFactors, weights: Sequence[float], scales: Sequence[float]
) -> tuple[ClientFactors, list[float]]:
    """Scale each clipped client's update by s_i < 1 (--max-update-norm ... --on-outlier clip).

    Client i's term w_i B_i A_i becomes w_i s_i B_i A_i + w_i (1 - s_i) B_prev A_prev, so its
    full-rank update B_i A_i - B_prev A_prev is scaled by exactly s_i: the clipped client adds
    the pair (B_prev, A_prev) with weight w_i (1 - s_i). Unclipped clients are unchanged.
    """
    out_weights = [weight * scale for weight, scale in zip(weights, scales, strict=True)]
    extra = [weight * (1.0 - scale) for weight, scale in zip(weights, scales, strict=True) if scale < 1.0]
    clipped = replace(clients, as_=clients.as_.extended(len(extra)), bs=clients.bs.extended(len(extra)))
    return clipped, out_weights + extra


def with_previous(
    clients: ClientFactors, weights: Sequence[float], weight: float
) -> tuple[ClientFactors, list[float]]:
    """These clients and one more term, (B_prev, A_prev) with `weight`.

    Organisation-level DP divides the sum of the sites' updates by a fixed D instead of
    normalising the weights: with w_i = 1 / D, W = sum_i w_i B_i A_i + (1 - sum_i w_i) B_prev A_prev
    gives W - B_prev A_prev = sum_i w_i (B_i A_i - B_prev A_prev) exactly.
    """
    extended = replace(clients, as_=clients.as_.extended(1), bs=clients.bs.extended(1))
    return extended, [*weights, weight]


# The truncation routes (config.TRUNCATIONS): exact = product_svd of the stacked thin factors;
# randomized = randomized_svd, reading the clients block by block.
POWER_ITERATIONS = 2
# The exact route costs ~2 (d_out + d_in) k^2 flops for k = m r inner columns, the randomized
# one ~2 (d_out + d_in) k s (2 q + 2) for a sketch of s columns: exact is cheaper (and exact)
# up to k = (2 q + 2) s.
EXACT_UP_TO_SKETCHES = 2 * POWER_ITERATIONS + 2
CLIENT_BLOCK = 32


def sketch_columns(rank: int) -> int:
    """Columns of the randomized route's sketch: 2 r, at least r + 10."""
    return max(2 * rank, rank + 10)


def truncation_route(setting: str, inner: int, rank: int) -> str:
    """ "exact" or "randomized" for `setting` (config.TRUNCATIONS) and k = m r inner columns."""
    if setting != "auto":
        return setting
    return "exact" if inner <= EXACT_UP_TO_SKETCHES * sketch_columns(rank) else "randomized"


def module_seed(module: str) -> int:
    """Seed of a module's randomized sketch: sha256(module) as a 60-bit integer."""
    return text_seed(module)


def truncated_svd(
    clients: ClientFactors, weights: Sequence[float], rank: int, truncation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD (U (d_out, q), S (q,), Vh (q, d_in)) of W = sum_i w_i B_i A_i, by the
    route truncation_route picks. The randomized route multiplies W block by block,
    W X = sum_blocks L_b (R_b X), so at most CLIENT_BLOCK clients' dense factors exist at once.
    """
    d_out, d_in = clients.b_prev.shape[0], clients.a_prev.shape[1]
    if truncation_route(truncation, len(weights) * rank, rank) == "exact":
        return product_svd(*stack_factors(clients.bs, clients.as_, weights), rank)
    blocks = [slice(start, start + CLIENT_BLOCK) for start in range(0, len(weights), CLIENT_BLOCK)]

    def factors(block: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return stack_factors(clients.bs[block], clients.as_[block], weights[block])

    def multiply(x: torch.Tensor) -> torch.Tensor:  # (d_in, s) -> W x (d_out, s)
        out = torch.zeros(d_out, x.shape[1], dtype=torch.float64)
        for block in blocks:
            left, right = factors(block)
            out += left @ (right @ x)
        return out

    def multiply_t(y: torch.Tensor) -> torch.Tensor:  # (d_out, s) -> W^T y (d_in, s)
        out = torch.zeros(d_in, y.shape[1], dtype=torch.float64)
        for block in blocks:
            left, right = factors(block)
            out += right.mT @ (left.mT @ y)
        return out

    return randomized_svd(
        multiply,
        multiply_t,
        (d_out, d_in),
        rank,
        sketch_columns(rank),
        POWER_ITERATIONS,
        module_seed(clients.module),
    )


def reconstruct_truncated(
    clients: ClientFactors, weights: Sequence[float], rank: int, truncation: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSRD: W = sum_i w_i B_i A_i projected to rank r, as (U S (d_out, q), Vh (q, d_in)),
    q = min(r, d_out, d_in), zero beyond W's rank."""
    u, s, vh = truncated_svd(clients, weights, rank, truncation)
    inner = len(weights) * rank  # W = L R has k = m r inner columns
    return pad_factors(u * s, vh, min(rank, u.shape[0], inner, vh.shape[1]))


def reconstruct_exact(
    clients: ClientFactors, weights: Sequence[float], rank: int, truncation: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSRD-e: W = sum_i w_i B_i A_i itself, as ([w_i B_i] (d_out, m r), [A_i] (m r, d_in))."""
    return stack_factors(clients.bs, clients.as_, weights)


def reconstruct_balanced(
    clients: ClientFactors, weights: Sequence[float], rank: int, truncation: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA: W = sum_i w_i B_i A_i truncated to rank r and split evenly,
    (B' = U sqrt(S) (d_out, r), A' = sqrt(S) Vh (r, d_in)), zero beyond W's rank."""
    return balanced_factors(*truncated_svd(clients, weights, rank, truncation), rank)


def average_factors(
    clients: ClientFactors, weights: Sequence[float], rank: int, truncation: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg: (sum_i w_i B_i (d_out, r), sum_i w_i A_i (r, d_in)), each factor on its own,
    one client at a time. A factor no client uploaded stays exactly the previous one."""
    mean_b = sum(w * b for w, b in zip(weights, clients.bs, strict=True)) if clients.changed_b else None
    mean_a = sum(w * a for w, a in zip(weights, clients.as_, strict=True)) if clients.changed_a else None
    return (
        clients.b_prev if mean_b is None else mean_b,
        clients.a_prev if mean_a is None else mean_a,
    )


# --------------------------------------------------------------------------- coordinator: decomposers


@dataclass(frozen=True)
class ModuleUpdate:
    """One module's broadcast: (factor, delta) pairs to send, each delta dense and zero outside
    that factor's download mask, and whether the scheduled factor was replaced by the other
    (FedSRD's rank-deficiency fallback). reach_miss (one-factor downloads): how far the chosen
    factor's whole least-squares update, before any mask, lands from the target W,
    ||B' A' - W||_F: the part of the target no update of that factor can carry. products: the
    solve's thin products of the target (math.lowrank_products.TargetProducts), for the update error."""

    deltas: list[tuple[str, torch.Tensor]]
    fell_back: bool = False
    reach_miss: float | None = None
    products: TargetProducts | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Download:
    """What a decomposer knows of this round's download, for one module.

    keep(factor) -> the factor's seeded download mask (bool, the factor's shape; all True
    when nothing is dropped); keep_prob = 1 - download sparsity; damping, fit and
    factor_choice as in config.BroadcastConfig; noise(shape) -> float64 Gaussian noise of the
    round's organisation-level DP (None without it); sent(factor, delta) -> the dense delta as
    clients will apply it (masked, stored in the broadcast's value dtype, decoded; None: the
    delta masked, as it is). aligned: the aggregate's factors (left (d_out, r), right (r, d_in))
    are W's rank-r factors in the clients' own scale (aggregate --align-factors): the two-factor
    download moves toward them.
    """

    keep: Callable[[str], torch.Tensor]
    keep_prob: float
    damping: float
    fit: str
    factor_choice: str
    noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None
    sent: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    aligned: bool = False

    def as_sent(self, factor: str, delta: torch.Tensor) -> torch.Tensor:
        """delta as clients will apply it (see `sent`)."""
        if self.sent is None:
            return torch.where(self.keep(factor), delta, torch.zeros((), dtype=delta.dtype))
        return self.sent(factor, delta)


def alternating_update(
    module: str,
    round_index: int,
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    download: Download,
) -> ModuleUpdate:
    """FedSRD: one factor per round, least squares for the target W = left @ right (method
    section 3), fitted to the random download mask.

    Which factor (download.factor_choice):
      "parity" (the paper): B on odd rounds, A on even ones; the other when the scheduled
          solve would invert a rank-deficient factor (math.lowrank.choose_factor).
      "fit": the factor whose whole least-squares update (before the mask) leaves the smaller
          residual ||B' A' - W||_F; B when both tie (round 1: B_0 = 0 cannot be inverted).
      "b": B in every round.
      "both": both factors, B first (both_factors_update).
    How its values are fitted to the mask (download.fit):
      "lstsq": the least-squares update restricted to the kept elements (math.lowrank.
          masked_update_b / masked_update_a), sent as it is;
      "dare" (the paper): the least-squares update of the whole factor, its kept elements
          divided by keep_prob.
    Every solve is ridge-damped by download.damping (0: the exact pseudo-inverse).
    """
    if download.factor_choice == "both":
        return both_factors_update(a_prev, b_prev, left, right, download)
    whole = {"B": update_b, "A": update_a}
    # the solves, their misses and the broadcast's update error share these products
    products = TargetProducts(left, right, b_prev, a_prev)
    if download.factor_choice == "fit":
        deltas = {f: whole[f](left, right, b_prev, a_prev, download.damping, products) for f in ("B", "A")}
    else:
        factor = "B" if download.factor_choice == "b" else choose_factor(round_index, b_prev, a_prev)
        # the other factor's update left at zero: its miss is not used
        deltas = {"B": torch.zeros_like(b_prev), "A": torch.zeros_like(a_prev)}
        deltas[factor] = whole[factor](left, right, b_prev, a_prev, download.damping, products)
    # whole-factor least-squares updates (d_out, r) and (r, d_in), and how far each lands from W
    found = one_factor_misses(left, right, b_prev, a_prev, deltas["B"], deltas["A"], products)
    misses = dict(zip(("B", "A"), found, strict=True))
    if download.factor_choice == "fit":
        factor = "B" if misses["B"] <= misses["A"] else "A"
    reach_miss = misses[factor]
    keep = download.keep(factor)
    if download.fit == "lstsq":
        masked = masked_update_b if factor == "B" else masked_update_a
        sent = masked(left, right, b_prev, a_prev, keep, download.damping)
    else:
        sent = dare_fit(deltas[factor], keep, download.keep_prob)
    fell_back = download.factor_choice == "parity" and factor != scheduled_factor(round_index)
    return ModuleUpdate([(factor, sent)], fell_back, reach_miss, products)


def both_factors_update(
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    download: Download,
) -> ModuleUpdate:
    """Two alternating least-squares steps for the target W = left @ right, each fitted to its
    factor's download mask, both sent:

      dB = fit_B(W; B_prev, A_prev)           (d_out, r)   then B' = B_prev + dB
      dA = fit_A(W; B', A_prev)               (r, d_in)    so that B' (A_prev + dA) ~ W

    fit is download.fit as in alternating_update ("lstsq": least squares on the kept elements;
    "dare": the whole-factor solve, kept elements / keep_prob), ridge-damped by
    download.damping. The A step sees the B update as clients will apply it (masked, fitted,
    rounded to the value dtype or quantized: download.as_sent), so it
    corrects what that update missed, including the part of W outside A_prev's row space
    that no B update can reach. With no mask (keep_prob 1) and damping 0, B' = W pinv(A_prev)
    spans W's column space when W has rank r, and the two steps deliver W exactly.
    "lstsq" never moves the state farther from W than the step before it did.
    """
    keep_b, keep_a = download.keep("B"), download.keep("A")
    # The A the B step solves against: A_prev, or the aligned aggregate's own A, so that with
    # nothing masked the two steps land on the aggregate's factors themselves.
    a_ref = right if download.aligned and right.shape == a_prev.shape else a_prev
    if download.fit == "lstsq":
        delta_b = masked_update_b(left, right, b_prev, a_ref, keep_b, download.damping)
        b_next = b_prev + download.as_sent("B", delta_b)  # (d_out, r)
        delta_a = masked_update_a(left, right, b_next, a_prev, keep_a, download.damping)
    else:
        whole_b = update_b(left, right, b_prev, a_ref, download.damping)  # (d_out, r)
        delta_b = dare_fit(whole_b, keep_b, download.keep_prob)
        b_next = b_prev + download.as_sent("B", delta_b)
        delta_a = dare_fit(
            update_a(left, right, b_next, a_prev, download.damping), keep_a, download.keep_prob
        )
    return ModuleUpdate([("B", delta_b), ("A", delta_a)])


def _check_factor_shapes(module: str, a_prev, b_prev, left, right) -> None:
    if left.shape != b_prev.shape or right.shape != a_prev.shape:
        raise MismatchError(
            f"aggregate of {module}: factors {list(left.shape)} and {list(right.shape)} are not"
            f" LoRA factors {list(b_prev.shape)} and {list(a_prev.shape)}"
        )


def dense_factors_update(
    module: str,
    round_index: int,
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    download: Download,
) -> ModuleUpdate:
    """Dense download of both factors: the aggregate holds the new (B (d_out, r), A (r, d_in));
    send dB = B - B_prev and dA = A - A_prev."""
    _check_factor_shapes(module, a_prev, b_prev, left, right)
    return ModuleUpdate([("B", left - b_prev), ("A", right - a_prev)])


def dense_b_update(
    module: str,
    round_index: int,
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    download: Download,
) -> ModuleUpdate:
    """FFA-LoRA: send only dB = B - B_prev; A is frozen, so the aggregate's A must be A_prev."""
    _check_factor_shapes(module, a_prev, b_prev, left, right)
    if not torch.equal(right, a_prev):
        raise MismatchError(f"aggregate of {module}: changes the frozen A factor of ffa-lora")
    return ModuleUpdate([("B", left - b_prev)])


def private_b_update(
    module: str,
    round_index: int,
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    download: Download,
) -> ModuleUpdate:
    """Organisation-level DP: the damped least-squares B update for W = left @ right, plus
    Gaussian noise, fitted to the download mask as "dare" does:

      dB = (W - B_prev A_prev) A_prev^T (A_prev A_prev^T + lam I)^-1 + N     (d_out, r)
      sent = keep * dB / keep_prob

    N comes from download.noise (i.i.d. N(0, std^2), std calibrated by the caller to the
    sensitivity of dB, docs/privacy.md); the mask depends on no site's data, so the mask and the
    rescale are post-processing of the noisy dB.
    """
    if download.noise is None:
        raise ValueError("private_b_update needs the round's noise")
    delta = update_b(left, right, b_prev, a_prev, download.damping) + download.noise(tuple(b_prev.shape))
    return ModuleUpdate([("B", dare_fit(delta, download.keep("B"), download.keep_prob))])


def dare_fit(delta: torch.Tensor, keep: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """The paper's fit of a whole-factor update to the download mask: the kept elements divided by
    the keep probability, the others zero (an unbiased estimate of `delta`)."""
    return torch.where(keep, delta / keep_prob, torch.zeros((), dtype=delta.dtype))
