"""FedExP's extrapolated coordinator step, from figures the coordinator can measure.

Notation: m sites with weights w_i (sum_i w_i = 1); D_i the site's exact update of the model's
weights (per module B'_i A'_i - B A, all modules together); D = sum_i w_i D_i their mean.
FedExP (Jhunjhunwala et al., ICLR 2023) steps X' = X + eta dX with

    eta = max(1, sum_i w_i ||D_i||^2 / (2 ||D||^2))

long when the sites' updates disagree (their mean is short against them), 1 when they agree.
A coordinator of dense uploads (FedAvg and its kin) computes both norms from the uploads; one
of sparsified uploads reads the sites' own norms and estimates ||D||^2 from their update
sketches (algorithms.diagnostics.update_spread). Plain arithmetic; no torch, no files.
"""

from __future__ import annotations

import math


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
