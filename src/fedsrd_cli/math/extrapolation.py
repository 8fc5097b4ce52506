"""FedExP's extrapolated coordinator step, from figures the coordinator can measure.

Notation: m sites with weights w_i (sum_i w_i = 1); D_i the site's exact update of the model's
weights (per module B'_i A'_i - B A, all modules together); D = sum_i w_i D_i their mean.
FedExP (Jhunjhunwala et al., ICLR 2023) steps X' = X + eta dX with

    eta = max(1, sum_i w_i ||D_i||^2 / (2 ||D||^2))

long when the sites' updates disagree (their mean is short against them), 1 when they agree.
FedAvg's coordinator holds every D_i exactly. FedSRD's holds only reconstructions E_i of
sparsified uploads, each site reporting ||D_i|| itself (its upload's fidelity record), so
||D||^2 is estimated (mean_update_sq_estimate). Pure torch-free arithmetic; no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def fedexp_step(client_sq: float, mean_sq: float, cap: float) -> float:
    """FedExP's step eta = max(1, client_sq / (2 mean_sq)), at most `cap`.

    client_sq = sum_i w_i ||D_i||^2 (weights summing to 1), mean_sq = ||sum_i w_i D_i||^2.
    1 when there is no update at all (client_sq == 0); `cap` when the sites' updates cancel
    exactly (mean_sq <= 0 < client_sq).
    """
    if not (math.isfinite(client_sq) and math.isfinite(mean_sq)) or client_sq < 0:
        raise ValueError(f"update norms must be finite and >= 0, got {client_sq} and {mean_sq}")
    if client_sq == 0.0:
        return 1.0
    if mean_sq <= 0.0:
        return cap
    return min(max(1.0, client_sq / (2.0 * mean_sq)), cap)


def mean_update_sq_estimate(
    weights: Sequence[float],
    exact_sq: Sequence[float],
    reconstructed_sq: Sequence[float],
    combined_sq: float,
    gain: float,
) -> float:
    """||sum_i w_i D_i||^2 from what a coordinator of reconstructions E_i can know.

    weights w_i; exact_sq ||D_i||^2 (as each site reported it); reconstructed_sq ||E_i||^2;
    combined_sq ||sum_i w_i E_i||^2; gain g = sum_i w_i <E_i, D_i> / sum_i w_i ||D_i||^2 (the
    uploads' gain, algorithms.diagnostics.upload_fidelity). Model: E_i = g D_i + N_i, the noise
    N_i uncorrelated with D_j and with N_j for j != i. Then for i != j, <E_i, E_j> = g^2 <D_i, D_j>,
    and

        ||D||^2 = sum_i w_i^2 ||D_i||^2 + sum_{i != j} w_i w_j <D_i, D_j>
                ~ sum_i w_i^2 ||D_i||^2 + (combined_sq - sum_i w_i^2 ||E_i||^2) / g^2

    exact whenever E_i = g D_i (a dense upload: g = 1 and E_i = D_i). Clamped at 0.
    """
    if not (len(weights) == len(exact_sq) == len(reconstructed_sq)):
        raise ValueError("one weight, exact norm and reconstruction norm per site")
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"the uploads' gain must be finite and > 0, got {gain}")
    own_exact = sum(w * w * d for w, d in zip(weights, exact_sq, strict=True))
    own_estimate = sum(w * w * e for w, e in zip(weights, reconstructed_sq, strict=True))
    return max(0.0, own_exact + (combined_sq - own_estimate) / gain**2)
