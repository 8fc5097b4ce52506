"""Reconstruct, aggregate and decompose in full-rank space without forming W.

Notation (per adapted module, see ../shared/fedsrd-method.md sections 2-3):
    B_i (d_out, r), A_i (r, d_in)   client i's reconstructed factors
    w_i                             aggregation weights, sum to 1
    W = sum_i w_i B_i A_i = L @ R   with L = [w_1 B_1 ... w_m B_m] (d_out, m r)
                                    and  R = [A_1; ...; A_m]        (m r, d_in)
W has rank <= m r, so its truncated SVD follows from a QR of each thin factor
and the SVD of a small core; every later product is taken factor by factor.
Nothing here ever allocates a (d_out, d_in) matrix. Pure torch; no files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stack_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors of the weighted sum of products.

    bs[i]: (d_out, r), as_[i]: (r, d_in), weights: m floats
    -> L (d_out, m r), R (m r, d_in) with L @ R = sum_i w_i B_i A_i
    """
    # Built as (m r, d_out) and returned transposed: column-major, as LAPACK's QR wants it.
    left = torch.cat([w * b.mT for w, b in zip(weights, bs, strict=True)], dim=0).mT
    right = torch.cat(list(as_), dim=0)
    return left, right


def product_svd(
    left: torch.Tensor, right: torch.Tensor, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of W = left @ right from its factors, optionally only the top `rank` triplets.

    left: (d_out, k), right: (k, d_in) -> U (d_out, q), S (q,), Vh (q, d_in),
    q = min(k, d_out, d_in, rank); W = U diag(S) Vh exactly when rank is None; S descending.
    left = Q_l R_l, right^T = Q_r R_r (reduced QR), core = R_l R_r^T = U_c S Vh_c,
    U = Q_l U_c, Vh = Vh_c Q_r^T.
    """
    if left.stride(0) != 1:  # LAPACK works column-major: copy once here, not inside QR
        left = left.mT.contiguous().mT
    q_l, r_l = torch.linalg.qr(left)  # (d_out, p), (p, k)
    q_r, r_r = torch.linalg.qr(right.mT)  # (d_in, s), (s, k)
    core = r_l @ r_r.mT  # (p, s)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    if rank is not None:
        u_c, s, vh_c = u_c[:, :rank], s[:rank], vh_c[:rank]
    return q_l @ u_c, s, vh_c @ q_r.mT


def truncate_product(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of W = left @ right, as factors.

    left: (d_out, k), right: (k, d_in) -> (d_out, q), (q, d_in), q = min(rank, k, d_out, d_in)
    W_r = (U[:, :q] diag(S[:q])) @ Vh[:q]   (Eckart-Young)
    """
    u, s, vh = product_svd(left, right, rank)
    return u * s, vh


def balanced_truncation(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of W = left @ right, split evenly into LoRA factors.

    left: (d_out, k), right: (k, d_in) -> B' (d_out, rank), A' (rank, d_in) with
    B' = U[:, :q] diag(sqrt(S[:q])), A' = diag(sqrt(S[:q])) Vh[:q], q = min(rank, k, d_out, d_in),
    so B' A' = W_r (Eckart-Young). When q < rank the missing columns of B' and rows of A'
    are zero, so the factors always have LoRA's shapes.
    """
    u, s, vh = product_svd(left, right)
    q = min(rank, s.numel())
    root = s[:q].sqrt()
    new_b = left.new_zeros(left.shape[0], rank)
    new_a = right.new_zeros(rank, right.shape[1])
    new_b[:, :q] = u[:, :q] * root
    new_a[:q] = root[:, None] * vh[:q]
    return new_b, new_a


def is_rank_deficient(x: torch.Tensor) -> bool:
    """True when x (rows, cols) has numerical rank below min(rows, cols).

    Uses torch.linalg.matrix_rank's default tolerance, max(rows, cols) * eps * sigma_max.
    """
    return int(torch.linalg.matrix_rank(x)) < min(x.shape)


def update_b(
    left: torch.Tensor, right: torch.Tensor, b_prev: torch.Tensor, a_prev: torch.Tensor
) -> torch.Tensor:
    """Least-squares B update for the target W_r = left @ right.

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in) -> dB (d_out, r)
    dB = dW pinv(A_prev) with dW = W_r - B_prev A_prev, taken factor by factor:
    dB = left (right pinv(A_prev)) - B_prev (A_prev pinv(A_prev))
    """
    a_pinv = torch.linalg.pinv(a_prev)  # (d_in, r)
    return left @ (right @ a_pinv) - b_prev @ (a_prev @ a_pinv)


def update_a(
    left: torch.Tensor, right: torch.Tensor, b_prev: torch.Tensor, a_prev: torch.Tensor
) -> torch.Tensor:
    """Least-squares A update for the target W_r = left @ right.

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in) -> dA (r, d_in)
    dA = pinv(B_prev) dW with dW = W_r - B_prev A_prev, taken factor by factor:
    dA = (pinv(B_prev) left) right - (pinv(B_prev) B_prev) A_prev
    """
    b_pinv = torch.linalg.pinv(b_prev)  # (r, d_out)
    return (b_pinv @ left) @ right - (b_pinv @ b_prev) @ a_prev


def scheduled_factor(round_index: int) -> str:
    """The factor round t's one-factor download is scheduled to update: "B" when t is odd
    (round 1 first, since B_0 = 0 cannot be inverted), "A" when t is even."""
    return "B" if round_index % 2 == 1 else "A"


def choose_factor(round_index: int, b_prev: torch.Tensor, a_prev: torch.Tensor) -> str:
    """Which factor round t updates: scheduled_factor(t), "B" on odd rounds, "A" on even ones.

    b_prev (d_out, r), a_prev (r, d_in) -> "B" or "A".
    Updating B needs pinv(A_prev), updating A needs pinv(B_prev). When the scheduled
    update's pinv factor is rank-deficient and the other's is not, the other factor
    is updated instead (so B_0 = 0 is never inverted).
    """
    scheduled = scheduled_factor(round_index)
    fallback = "A" if scheduled == "B" else "B"
    inverted = {"B": a_prev, "A": b_prev}
    if is_rank_deficient(inverted[scheduled]) and not is_rank_deficient(inverted[fallback]):
        return fallback
    return scheduled


def product_frobenius_norm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||left @ right||_F without forming the product.

    left: (d_out, k), right: (k, d_in) -> scalar tensor (same dtype)
    ||L R||_F^2 = trace((L R)^T (L R)) = trace((L^T L)(R R^T)) = sum((L^T L) * (R R^T)),
    the last step because both Gram matrices (k, k) are symmetric. Cost O((d_out + d_in) k^2).
    A client's update dW_i = B_i A_i - B A is the product [B_i, -B] @ [A_i; A].
    """
    gram_left = left.T @ left  # (k, k)
    gram_right = right @ right.T  # (k, k)
    return torch.sqrt(torch.clamp((gram_left * gram_right).sum(), min=0.0))
