"""Upload sparsification: importance scores, kurtosis-adaptive ratio, pruning.

Notation (per adapted module, see ../shared/fedsrd-method.md section 1):
    A_prev (r, d_in), B_prev (d_out, r): the global factors the client started from
    A_new  (r, d_in), B_new  (d_out, r): the client's factors after local training
    dA = A_new - A_prev, dB = B_new - B_prev

The full-rank update is exactly dW = dB @ A_prev + B_new @ dA, so an element's
importance is how much it can move dW:
    I_B[u, v] = |dB[u, v]| * ||A_prev[v, :]||_2
    I_A[u, v] = |dA[u, v]| * ||B_new[:, u]||_2

Pure torch; no files, no models.
"""

from __future__ import annotations

import math

import torch


def importance_b(delta_b: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """Importance of each element of dB.

    delta_b: (d_out, r), a_prev: (r, d_in) -> (d_out, r)
    I_B[u, v] = |dB[u, v]| * ||A_prev[v, :]||_2
    """
    row_norms = torch.linalg.vector_norm(a_prev.float(), dim=1)  # (r,)
    return delta_b.float().abs() * row_norms[None, :]


def importance_a(delta_a: torch.Tensor, b_new: torch.Tensor) -> torch.Tensor:
    """Importance of each element of dA.

    delta_a: (r, d_in), b_new: (d_out, r) -> (r, d_in)
    I_A[u, v] = |dA[u, v]| * ||B_new[:, u]||_2
    """
    col_norms = torch.linalg.vector_norm(b_new.float(), dim=0)  # (r,)
    return delta_a.float().abs() * col_norms[:, None]


def pearson_kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis of all elements of x (a normal distribution gives 3).

    x: any shape with n elements.
    k = mean((x - mu)^4) / mean((x - mu)^2)^2, computed in float64.
    Returns nan when the elements are all equal (the ratio is undefined).
    """
    v = x.detach().reshape(-1).double()
    centred = v - v.mean()
    m2 = centred.square().mean()
    if m2.item() == 0.0:
        return float("nan")
    m4 = centred.square().square().mean()
    return (m4 / (m2 * m2)).item()


def adaptive_ratio(kurtosis: float, base: float, coeff: float, cap: float) -> float:
    """Fraction of elements to prune, from the kurtosis of their scores.

    rho = base + min(cap, coeff * ln(max(k, 1)))
    A nan kurtosis (constant scores) counts as k = 1, giving rho = base.
    """
    k = 1.0 if math.isnan(kurtosis) else max(kurtosis, 1.0)
    return base + min(cap, coeff * math.log(k))


def quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of all elements of x, with linear interpolation.

    x: any shape with n >= 1 elements; 0 <= q <= 1.
    With s the ascending sort of x and p = q * (n - 1):
        quantile = s[floor(p)] + (p - floor(p)) * (s[floor(p) + 1] - s[floor(p)])
    (numpy's and torch.quantile's default). Uses selection, so it has no size limit.
    """
    v = x.detach().reshape(-1).double()
    n = v.numel()
    pos = q * (n - 1)
    lo = math.floor(pos)
    frac = pos - lo
    low = torch.kthvalue(v, lo + 1).values.item()
    if frac == 0.0 or lo + 1 >= n:
        return low
    high = torch.kthvalue(v, lo + 2).values.item()
    return low + frac * (high - low)


def keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Elements whose score is strictly above the ratio-quantile of the scores.

    scores: (...) -> bool mask of the same shape.
    keep = scores > quantile(scores, ratio)
    """
    threshold = quantile(scores, ratio)
    return scores.double() > threshold


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale the pruned delta so its L1 norm equals the unpruned delta's.

    delta: (...) the dense delta, kept: (...) bool mask -> (...) pruned, rescaled delta.
    out = delta * kept * (||delta||_1 / ||delta * kept||_1); zeros if nothing is kept.
    """
    pruned = torch.where(kept, delta, torch.zeros_like(delta))
    kept_l1 = pruned.double().abs().sum()
    if kept_l1.item() == 0.0:
        return pruned
    scale = delta.double().abs().sum() / kept_l1
    return (pruned.double() * scale).to(delta.dtype)


def sparsify_delta(
    delta: torch.Tensor,
    scores: torch.Tensor,
    base: float,
    coeff: float,
    cap: float,
    rescale: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune one delta matrix by importance with the kurtosis-adaptive ratio.

    delta, scores: (rows, cols) -> (pruned delta (rows, cols), kept mask (rows, cols), ratio)
    ratio = adaptive_ratio(pearson_kurtosis(scores), base, coeff, cap)
    kept  = scores > quantile(scores, ratio); pruned = delta * kept, optionally L1-rescaled.
    """
    ratio = adaptive_ratio(pearson_kurtosis(scores), base, coeff, cap)
    kept = keep_mask(scores, ratio)
    pruned = l1_rescale(delta, kept) if rescale else torch.where(kept, delta, torch.zeros_like(delta))
    return pruned, kept, ratio
