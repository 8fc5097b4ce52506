"""Reconstruct, aggregate and decompose in full-rank space without forming W: the factorizations and solves.

Notation (per adapted module, see ../shared/fedsrd-method.md sections 2-3):
    B_i (d_out, r), A_i (r, d_in)   client i's reconstructed factors
    w_i                             aggregation weights, sum to 1
    W = sum_i w_i B_i A_i = L @ R   with L = [w_1 B_1 ... w_m B_m] (d_out, m r)
                                    and  R = [A_1; ...; A_m]        (m r, d_in)
W has rank <= m r, so its truncated SVD follows from a QR of each thin factor
and the SVD of a small core; every later product is taken factor by factor.
Here: the truncated SVD of W (exact and randomized) and its LoRA factors, and the one-factor
download's solves (update_b, update_a, their masked forms, align_factors). The norms, inner
products and gains of such thin products live in math.lowrank_products.
Nothing here ever allocates a (d_out, d_in) matrix. Pure torch; no files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedsrd_cli.math.lowrank_products import TargetProducts
from fedsrd_cli.math.threads import single_threaded


def stack_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors of the weighted sum of products.

    bs[i]: (d_out, r), as_[i]: (r, d_in), weights: m floats
    -> L (d_out, m r), R (m r, d_in) with L @ R = sum_i w_i B_i A_i
    """
    left = torch.cat([w * b for w, b in zip(weights, bs, strict=True)], dim=1)
    right = torch.cat(list(as_), dim=0)
    return left, right


def gram_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis of x's column space, read off its Gram matrix (no QR).

    x: (n, k) -> v (k, p), sigma (p,), p = numerical rank of x, sigma descending, with
        x^T x = V diag(lam) V^T (eigendecomposition), sigma = sqrt(lam) for lam > tol,
        Q = x v diag(1 / sigma) (n, p) orthonormal and x = Q diag(sigma) v^T.
    tol = k * eps * lam_max: directions below it are numerically null and dropped, so a
    zero or rank-deficient x is fine. Cost: one (k, k) Gram product, 2 n k^2 flops, and an
    eigendecomposition of size k; about a third of a Householder QR for n >> k, since the
    Gram product is one matrix multiply. Singular values below sqrt(tol) are lost, which
    perturbs x v diag(sigma) by at most sqrt(tol) (relative to sigma_max) in each lost one.
    """
    gram = x.mT @ x  # (k, k)
    with single_threaded():
        lam, vecs = torch.linalg.eigh(gram)  # ascending
    lam, vecs = lam.flip(0), vecs.flip(1)  # descending
    tol = lam[0].clamp(min=0.0) * x.shape[1] * torch.finfo(x.dtype).eps
    kept = lam > tol if bool(lam[0] > 0) else torch.zeros_like(lam, dtype=torch.bool)
    return vecs[:, kept], lam[kept].sqrt()


def product_svd(
    left: torch.Tensor, right: torch.Tensor, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of W = left @ right from its factors, optionally only the top `rank` triplets.

    left: (d_out, k), right: (k, d_in) -> U (d_out, q), S (q,), Vh (q, d_in), S descending,
    q = min(p, rank) where p <= min(k, d_out, d_in) is W's numerical rank (zero singular
    values are left out: a zero W gives q = 0). W = U diag(S) Vh when rank is None.
    With gram_basis: left = Q_l diag(s_l) V_l^T, right^T = Q_r diag(s_r) V_r^T, so
        W = Q_l core Q_r^T,  core = diag(s_l) V_l^T V_r diag(s_r)  (p_l, p_r),
    core core^T = U_c diag(S^2) U_c^T (eigh: S are core's singular values, U_c its left vectors),
    Vh_c = diag(1/S) U_c^T core, U = Q_l U_c = left (V_l diag(1/s_l) U_c) and
    Vh = Vh_c Q_r^T = (Vh_c diag(1/s_r) V_r^T) right: only the kept triplets are formed.
    Three eigendecompositions of size k (half an SVD's time each) and no QR. Singular values
    below sqrt(p_l eps) S_max are numerically zero here and left out.
    """
    v_l, s_l = gram_basis(left)  # (k, p_l), (p_l,)
    v_r, s_r = gram_basis(right.mT)  # (k, p_r), (p_r,)
    core = s_l[:, None] * (v_l.mT @ v_r) * s_r[None, :]  # (p_l, p_r)
    with single_threaded():
        lam, u_c = torch.linalg.eigh(core @ core.mT)  # ascending
    lam, u_c = lam.flip(0), u_c.flip(1)  # descending
    q = 0
    if lam.numel() and bool(lam[0] > 0):
        q = int((lam > lam[0] * lam.numel() * torch.finfo(lam.dtype).eps).sum())
    if rank is not None:
        q = min(q, rank)
    u_c, s = u_c[:, :q], lam[:q].sqrt()
    vh_c = (u_c.mT @ core) / s[:, None]  # (q, p_r)
    u = left @ (v_l @ (u_c / s_l[:, None]))  # (d_out, q)
    vh = ((vh_c / s_r[None, :]) @ v_r.mT) @ right  # (q, d_in)
    return u, s, vh


def truncate_product(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of W = left @ right, as factors.

    left: (d_out, k), right: (k, d_in) -> (d_out, q), (q, d_in), q = min(rank, k, d_out, d_in)
    W_r = (U[:, :q] diag(S[:q])) @ Vh[:q]   (Eckart-Young); when W has fewer than q nonzero
    singular values, the missing columns and rows are zero.
    """
    u, s, vh = product_svd(left, right, rank)
    return pad_factors(u * s, vh, min(rank, left.shape[0], left.shape[1], right.shape[1]))


def pad_factors(left: torch.Tensor, right: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_out, p), (p, d_in) with p <= q -> (d_out, q), (q, d_in), zero beyond p."""
    padded_left = left.new_zeros(left.shape[0], q)
    padded_right = right.new_zeros(q, right.shape[1])
    padded_left[:, : left.shape[1]] = left
    padded_right[: right.shape[0]] = right
    return padded_left, padded_right


def randomized_svd(
    multiply: Callable[[torch.Tensor], torch.Tensor],
    multiply_t: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    rank: int,
    sketch: int,
    power_iterations: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of a W seen only through products (randomized subspace iteration).

    multiply(X (d_in, s)) -> W X (d_out, s); multiply_t(Y (d_out, s)) -> W^T Y (d_in, s);
    shape = (d_out, d_in); sketch s >= rank columns; power_iterations q >= 0; seed of the
    Gaussian test matrix (so a rerun gives the same factors).
    -> U (d_out, q), S (q,), Vh (q, d_in) float64, q = min(rank, s), S descending, with
        Q_0 = orth(W Omega), Omega (d_in, s) Gaussian;  Q_j = orth(W orth(W^T Q_{j-1})), j <= q;
        Q_q^T W = U_s S Vh (dense SVD of an (s, d_in) matrix);  U = Q_q U_s, W_r = U S Vh.
    W is touched 2 q + 2 times, each a product with s columns: for W = L R with k inner columns,
    O((d_out + d_in) k s (q + 1)) flops, linear in k, against O((d_out + d_in) k^2) for
    product_svd. The error ||W - W_r|| is within a factor (1 + small) of Eckart-Young's
    when sigma_{s+1} / sigma_r is small, and the factor shrinks like that ratio^(2q+1)
    (Halko, Martinsson and Tropp 2011, section 10).
    """
    d_out, d_in = shape
    s = min(sketch, d_out, d_in)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(d_in, s, generator=generator, dtype=torch.float64)  # (d_in, s)
    basis = _orthonormal(multiply(omega))  # (d_out, s)
    for _ in range(power_iterations):
        co_basis = _orthonormal(multiply_t(basis))  # (d_in, s)
        basis = _orthonormal(multiply(co_basis))  # (d_out, s)
    projected = multiply_t(basis).mT  # (s, d_in) = Q^T W
    with single_threaded():
        u_s, sv, vh = torch.linalg.svd(projected, full_matrices=False)
    q = min(rank, sv.numel())
    return basis @ u_s[:, :q], sv[:q], vh[:q]


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of x (n, s), n >= s: an orthonormal basis of its columns."""
    with single_threaded():
        return torch.linalg.qr(x).Q


def balanced_truncation(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of W = left @ right, split evenly into LoRA factors.

    left: (d_out, k), right: (k, d_in) -> B' (d_out, rank), A' (rank, d_in) with
    B' = U[:, :q] diag(sqrt(S[:q])), A' = diag(sqrt(S[:q])) Vh[:q], q = min(rank, k, d_out, d_in),
    so B' A' = W_r (Eckart-Young). When q < rank the missing columns of B' and rows of A'
    are zero, so the factors always have LoRA's shapes.
    """
    return balanced_factors(*product_svd(left, right, rank), rank)


def balanced_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the truncated SVD U (d_out, q), S (q,), Vh (q, d_in), q <= rank, split evenly:
    B' = U diag(sqrt(S)) (d_out, rank), A' = diag(sqrt(S)) Vh (rank, d_in), zero beyond q."""
    root = s.sqrt()
    return pad_factors(u * root, root[:, None] * vh, rank)


def is_rank_deficient(x: torch.Tensor) -> bool:
    """True when x (rows, cols) has numerical rank below min(rows, cols).

    Uses torch.linalg.matrix_rank's default tolerance, max(rows, cols) * eps * sigma_max.
    """
    with single_threaded():
        return int(torch.linalg.matrix_rank(x)) < min(x.shape)


def _ridge_scale(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """lam = damping * sigma_max(X)^2, read off the Gram matrix X^T X (or X X^T) of the factor."""
    with single_threaded():
        return damping * torch.linalg.eigvalsh(gram)[-1].clamp(min=0.0)


def update_b(
    left: torch.Tensor,
    right: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    damping: float = 0.0,
    products: TargetProducts | None = None,
) -> torch.Tensor:
    """Least-squares B update for the target W_r = left @ right, optionally ridge-damped.

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in) -> dB (d_out, r)
    dW = W_r - B_prev A_prev, taken factor by factor (no (d_out, d_in) matrix is formed):
      damping = 0:  dB = dW pinv(A_prev)
                       = left (right pinv(A_prev)) - B_prev (A_prev pinv(A_prev))
      damping > 0:  dB = dW A_prev^T (A_prev A_prev^T + lam I)^-1,  lam = damping * sigma_max(A_prev)^2
                       = (left (right A_prev^T) - B_prev G) (G + lam I)^-1,  G = A_prev A_prev^T (r, r)
    The damped solve minimises ||dB A_prev - dW||_F^2 + lam ||dB||_F^2: directions where A_prev
    is weak (sigma_i^2 << lam) are not inverted, so dB is at most ||dW|| / (2 sqrt(lam)) per
    direction instead of ||dW|| / sigma_min(A_prev). A zero A_prev gives dB = 0, as pinv does.
    products: the module's TargetProducts, when the caller shares them (the damped solve reads
    G and dW A_prev^T from there).
    """
    if damping == 0.0:
        with single_threaded():
            a_pinv = torch.linalg.pinv(a_prev)  # (d_in, r)
        return left @ (right @ a_pinv) - b_prev @ (a_prev @ a_pinv)
    products = products or TargetProducts(left, right, b_prev, a_prev)
    gram = products.gram_a  # (r, r)
    lam = _ridge_scale(gram, damping)
    if float(lam) == 0.0:
        return torch.zeros_like(b_prev)
    rhs = products.along_b  # (d_out, r) = dW A_prev^T
    with single_threaded():
        chol = torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))
        return torch.cholesky_solve(rhs.mT, chol).mT  # (G + lam I) is symmetric


def update_a(
    left: torch.Tensor,
    right: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    damping: float = 0.0,
    products: TargetProducts | None = None,
) -> torch.Tensor:
    """Least-squares A update for the target W_r = left @ right, optionally ridge-damped.

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in) -> dA (r, d_in)
    dW = W_r - B_prev A_prev, taken factor by factor:
      damping = 0:  dA = pinv(B_prev) dW
                       = (pinv(B_prev) left) right - (pinv(B_prev) B_prev) A_prev
      damping > 0:  dA = (B_prev^T B_prev + lam I)^-1 B_prev^T dW,  lam = damping * sigma_max(B_prev)^2
                       = (G + lam I)^-1 ((B_prev^T left) right - G A_prev),  G = B_prev^T B_prev (r, r)
    (the ridge solve of update_b, transposed). A zero B_prev gives dA = 0, as pinv does.
    products: as for update_b.
    """
    if damping == 0.0:
        with single_threaded():
            b_pinv = torch.linalg.pinv(b_prev)  # (r, d_out)
        return (b_pinv @ left) @ right - (b_pinv @ b_prev) @ a_prev
    products = products or TargetProducts(left, right, b_prev, a_prev)
    gram = products.gram_b  # (r, r)
    lam = _ridge_scale(gram, damping)
    if float(lam) == 0.0:
        return torch.zeros_like(a_prev)
    rhs = products.rhs_a  # (r, d_in) = B_prev^T dW
    with single_threaded():
        chol = torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))
        return torch.cholesky_solve(rhs, chol)


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


def _solve_on_kept(
    gram: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Row by row, solve the normal equations restricted to that row's kept coordinates.

    gram (r, r) symmetric PSD, rhs (n, r), keep (n, r) bool, lam scalar >= 0 -> x (n, r) with
    x[j, ~keep[j]] = 0 and x[j, K] = (gram[K, K] + lam I)^-1 rhs[j, K] for K = keep[j].
    Rows are gathered into (n, q, q) systems, q = the largest kept count of a row; a row's
    unused slots get identity rows and a zero right side, so they solve to 0. Cost O(n q^3).
    """
    n, r = keep.shape
    counts = keep.sum(dim=1)  # (n,)
    q = int(counts.max()) if n else 0
    x = torch.zeros(n, r, dtype=rhs.dtype)
    if q == 0:
        return x
    # Kept column indices of each row first (stable sort of the negated mask), then padding.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :q]  # (n, q)
    used = torch.arange(q)[None, :] < counts[:, None]  # (n, q)
    sub = gram[order[:, :, None], order[:, None, :]]  # (n, q, q)
    pair = used[:, :, None] & used[:, None, :]
    eye = torch.eye(q, dtype=gram.dtype).expand(n, q, q)
    system = torch.where(pair, sub + lam * eye, eye)  # padding: identity
    side = torch.where(used, rhs.gather(1, order), torch.zeros((), dtype=rhs.dtype))  # (n, q)
    with single_threaded():
        if float(lam) > 0.0:
            solved = torch.linalg.solve(system, side.unsqueeze(-1)).squeeze(-1)  # (n, q)
        else:  # undamped: a kept block of a rank-deficient factor is singular; take its pseudo-inverse
            solved = (torch.linalg.pinv(system, hermitian=True) @ side.unsqueeze(-1)).squeeze(-1)
    x.scatter_(1, order, torch.where(used, solved, torch.zeros((), dtype=solved.dtype)))
    return x


def masked_update_b(
    left: torch.Tensor,
    right: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    keep: torch.Tensor,
    damping: float = 0.0,
) -> torch.Tensor:
    """The best B update that is zero outside `keep`: least squares on the kept elements.

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in), keep (d_out, r) bool
    -> dB (d_out, r), zero where keep is False. Row u, with kept columns K = keep[u]:
        dB[u, K] = argmin_x ||x A_prev[K, :] - dW[u, :]||^2 + lam ||x||^2
                 = (G[K, K] + lam I)^-1 C[u, K],   G = A_prev A_prev^T (r, r), C = dW A_prev^T (d_out, r),
    lam = damping * sigma_max(A_prev)^2, dW = left @ right - B_prev A_prev (C = left (right A_prev^T)
    - B_prev G, so nothing of size (d_out, d_in) is formed). Since x = 0 is allowed, the
    delivered dB A_prev is never farther from dW than sending nothing: the update's relative
    error is at most 1, whatever the conditioning of A_prev. keep all True and damping 0 give
    update_b's least squares solution.
    """
    gram = a_prev @ a_prev.mT  # (r, r)
    rhs = left @ (right @ a_prev.mT) - b_prev @ gram  # (d_out, r)
    return _solve_on_kept(gram, rhs, keep, _ridge_scale(gram, damping))


def masked_update_a(
    left: torch.Tensor,
    right: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    keep: torch.Tensor,
    damping: float = 0.0,
) -> torch.Tensor:
    """The best A update that is zero outside `keep`: least squares on the kept elements.

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in), keep (r, d_in) bool
    -> dA (r, d_in), zero where keep is False. Column v, with kept rows K = keep[:, v]:
        dA[K, v] = argmin_y ||B_prev[:, K] y - dW[:, v]||^2 + lam ||y||^2
                 = (G[K, K] + lam I)^-1 C[K, v],   G = B_prev^T B_prev (r, r), C = B_prev^T dW (r, d_in),
    lam = damping * sigma_max(B_prev)^2, C = (B_prev^T left) right - G A_prev. As for
    masked_update_b, the relative error of the delivered update is at most 1.
    """
    gram = b_prev.mT @ b_prev  # (r, r)
    rhs = (b_prev.mT @ left) @ right - gram @ a_prev  # (r, d_in)
    return _solve_on_kept(gram, rhs.mT, keep.mT, _ridge_scale(gram, damping)).mT


def align_factors(
    left: torch.Tensor,
    right: torch.Tensor,
    mean_b: torch.Tensor,
    mean_a: torch.Tensor,
    damping: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refactor W = left @ right into rank-r factors in the clients' own scale: one alternating
    least-squares sweep that starts from, and is ridge-damped toward, their mean factors.

    left (d_out, k), right (k, d_in), mean_b (d_out, r), mean_a (r, d_in) -> (B' (d_out, r), A' (r, d_in))
        B' = mean_b + update_b(W; mean_b, mean_a)   = mean_b + (W - mean_b mean_a) mean_a^T (G_a + lam_a I)^-1
        A' = mean_a + update_a(W; B', mean_a)       = mean_a + (G_b + lam_b I)^-1 B'^T (W - B' mean_a)
    G_a = mean_a mean_a^T, G_b = B'^T B', lam = damping * sigma_max^2 of the factor inverted; no
    (d_out, d_in) matrix is formed. A truncated SVD's factors (U S, V^T) hold W's scale in one
    factor; these stay near the clients' averaged factors, the scale their optimizer trained,
    and where a factor is weak the damping leaves the mean factor as it is instead of
    shrinking it to zero. With damping 0, W of rank r and B' of rank r, B' A' = W.
    """
    b_new = mean_b + update_b(left, right, mean_b, mean_a, damping)  # (d_out, r)
    a_new = mean_a + update_a(left, right, b_new, mean_a, damping)  # (r, d_in)
    return b_new, a_new
