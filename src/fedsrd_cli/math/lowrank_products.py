"""Norms, inner products and gains of thin products, without forming them.

Notation as in math.lowrank: W = left @ right with left (d_out, k), right (k, d_in), and a
module's LoRA state B_prev (d_out, r), A_prev (r, d_in). Every figure here is read off small
Gram blocks ((k, k), (k, r), (r, r)) of the factors: the Frobenius norm and inner products of
sums of thin products, how far a one-factor update lands from its target (one_factor_misses,
update_error_norms), the share of an update no B solve reaches (outside_row_space), and how
much the B solve can grow a change of its target (b_update_gain). TargetProducts holds one
module's shared products so the solves (math.lowrank) and these diagnostics form each once.
Nothing here ever allocates a (d_out, d_in) matrix. Pure torch; no files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import torch

from fedsrd_cli.math.threads import single_threaded


class TargetProducts:
    """One module's thin products for the target W = left @ right, each formed once, on first use.

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in). The one-factor solves
    (update_b, update_a), their misses (one_factor_misses) and the broadcast's update error
    (update_error_norms) need many of the same (k, r), (r, r) and thin products; given one of
    these, each reads them from here instead of forming them again. Every product is the very
    expression the functions form without one, so the results are the same to the last bit.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor, b_prev: torch.Tensor, a_prev: torch.Tensor):
        self.left, self.right, self.b_prev, self.a_prev = left, right, b_prev, a_prev

    @cached_property
    def gram_a(self) -> torch.Tensor:  # (r, r) = A_prev A_prev^T
        return self.a_prev @ self.a_prev.mT

    @cached_property
    def gram_b(self) -> torch.Tensor:  # (r, r) = B_prev^T B_prev
        return self.b_prev.mT @ self.b_prev

    @cached_property
    def right_a(self) -> torch.Tensor:  # (k, r) = right A_prev^T
        return self.right @ self.a_prev.mT

    @cached_property
    def left_b(self) -> torch.Tensor:  # (k, r) = left^T B_prev
        return self.left.mT @ self.b_prev

    @cached_property
    def b_left(self) -> torch.Tensor:  # (r, k) = B_prev^T left
        return self.b_prev.mT @ self.left

    @cached_property
    def gram_b_a(self) -> torch.Tensor:  # (r, d_in) = G_B A_prev
        return self.gram_b @ self.a_prev

    @cached_property
    def along_b(self) -> torch.Tensor:  # (d_out, r) = T A_prev^T, T = W - B_prev A_prev
        return self.left @ self.right_a - self.b_prev @ self.gram_a

    @cached_property
    def rhs_a(self) -> torch.Tensor:  # (r, d_in) = B_prev^T T, as update_a forms it
        return self.b_left @ self.right - self.gram_b_a

    @cached_property
    def along_a(self) -> torch.Tensor:  # (r, d_in) = B_prev^T T, as one_factor_misses forms it
        return self.left_b.mT @ self.right - self.gram_b_a

    @cached_property
    def product_terms(self) -> torch.Tensor:  # sum((L^T L) * (R R^T)) = ||W||_F^2
        return ((self.left.mT @ self.left) * (self.right @ self.right.mT)).sum()

    @cached_property
    def target2(self) -> torch.Tensor:  # ||T||_F^2, possibly rounded below zero
        return (
            self.product_terms - 2.0 * (self.left_b * self.right_a).sum() + (self.gram_b * self.gram_a).sum()
        )


def b_update_gain(a_prev: torch.Tensor, damping: float = 0.0) -> float:
    """How much the one-factor B update can grow a change of its target: ||K||_2 of the map
    dB = dW K that update_b applies, K = A^T (A A^T + lam I)^-1 (d_in, r).

    a_prev (r, d_in) -> max_j s_j / (s_j^2 + lam) over A's singular values s_j, with
    lam = damping * s_max^2 as in update_b; damping 0: ||pinv(A)||_2 = 1 / (the smallest s_j
    that pinv inverts). For any change E of the target, ||E K||_F <= ||E||_F * gain, which is
    the sensitivity organisation-level DP calibrates its noise to (docs/privacy.md).
    """
    with single_threaded():
        s = torch.linalg.svdvals(a_prev.double())  # (r,)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0.0
    s_max = float(s.max())
    if damping == 0.0:
        cutoff = max(a_prev.shape) * torch.finfo(a_prev.dtype).eps * s_max  # pinv's default rtol
        return float(1.0 / s[s > cutoff].min())
    lam = damping * s_max**2
    return float((s / (s * s + lam)).max())


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


def one_factor_misses(
    left: torch.Tensor,
    right: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    delta_b: torch.Tensor,
    delta_a: torch.Tensor,
    products: TargetProducts | None = None,
) -> tuple[float, float]:
    """How far each one-factor update lands from W = left @ right: (miss_B, miss_A).

    left (d_out, k), right (k, d_in), b_prev (d_out, r), a_prev (r, d_in), delta_b (d_out, r),
    delta_a (r, d_in) -> (||(B_prev + dB) A_prev - W||_F, ||B_prev (A_prev + dA) - W||_F).
    With T = W - B_prev A_prev (the target), G_A = A_prev A_prev^T and G_B = B_prev^T B_prev:
        miss_B^2 = sum((dB^T dB) * G_A) - 2 <dB, T A_prev^T> + ||T||^2
        miss_A^2 = sum(G_B * (dA dA^T)) - 2 <dA, B_prev^T T> + ||T||^2
        T A_prev^T = left (right A_prev^T) - B_prev G_A,  B_prev^T T = (B_prev^T left) right - G_B A_prev
        ||T||^2 = sum((L^T L) * (R R^T)) - 2 sum((L^T B_prev) * (R A_prev^T)) + sum(G_B * G_A)
    Only (k, k), (k, r) and (r, r) products and two thin ones are formed: no concatenation,
    nothing of size (d_out, d_in). Squares that round below zero count as 0.
    products: the module's TargetProducts, shared with the solves (TargetProducts.target2,
    along_b, along_a and the Gram matrices are these very expressions).
    """
    p = products or TargetProducts(left, right, b_prev, a_prev)
    target2 = p.target2
    miss_b2 = ((delta_b.mT @ delta_b) * p.gram_a).sum() - 2.0 * (delta_b * p.along_b).sum() + target2
    miss_a2 = (p.gram_b * (delta_a @ delta_a.mT)).sum() - 2.0 * (delta_a * p.along_a).sum() + target2
    return float(miss_b2.clamp(min=0.0).sqrt()), float(miss_a2.clamp(min=0.0).sqrt())


def _sum_product_norm(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """||sum_j X_j @ Y_j||_F for thin pairs X_j (d_out, k_j), Y_j (k_j, d_in), without forming it.

    ||sum_j X_j Y_j||^2 = sum_{j,l} sum((X_j^T X_l) * (Y_j Y_l^T)), each term (k_j, k_l); the
    same as product_frobenius_norm of the concatenated factors, with no concatenation.
    """

    def term(j: int, l_index: int) -> torch.Tensor:
        (x_j, y_j), (x_l, y_l) = pairs[j], pairs[l_index]
        return ((x_j.mT @ x_l) * (y_j @ y_l.mT)).sum()

    return _accumulated_norm(len(pairs), term, pairs[0][0].dtype)


def _accumulated_norm(count: int, term: Callable[[int, int], torch.Tensor], dtype: torch.dtype) -> float:
    """sqrt(sum_j term(j, j) + 2 sum_{j<l} term(j, l)), clamped at 0, summed in _sum_product_norm's
    order (so terms read from elsewhere give its result to the last bit)."""
    total = torch.zeros((), dtype=dtype)
    for j in range(count):
        for l_index in range(j, count):
            value = term(j, l_index)
            total = total + (value if l_index == j else 2.0 * value)
    return float(total.clamp(min=0.0).sqrt())


def product_inner(
    pairs_x: Sequence[tuple[torch.Tensor, torch.Tensor]], pairs_y: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """<sum_j X_j Y_j, sum_l U_l V_l>_F for thin pairs, without forming either sum.

    pairs_x: (X_j (d_out, k_j), Y_j (k_j, d_in)); pairs_y: (U_l (d_out, h_l), V_l (h_l, d_in)).
        <X Y, U V>_F = trace((X Y)^T U V) = sum((X^T U) * (Y V^T)),   each term (k_j, h_l)
    summed over every j and l. <S, S> = ||S||_F^2 (_sum_product_norm squared).
    """
    total = 0.0
    for x, y in pairs_x:
        for u, v in pairs_y:
            total += float(((x.mT @ u) * (y @ v.mT)).sum())
    return total


def update_error_norms(
    left: torch.Tensor,
    right: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    b_next: torch.Tensor,
    a_next: torch.Tensor,
    products: TargetProducts | None = None,
) -> tuple[float, float]:
    """How far the update a broadcast delivers is from its target: (||miss||_F, ||target||_F).

    left (d_out, k), right (k, d_in): the target W = left @ right; (b_prev, a_prev) the state
    before and (b_next, a_next) after the broadcast, (d_out, r) and (r, d_in).
        target = W - B_prev A_prev                  (what the clients' aggregate asks for)
        miss   = B_next A_next - W = delivered - target
    Both are sums of thin products (B_next A_next - left right and left right - B_prev A_prev),
    normed from their Gram blocks; nothing of size (d_out, d_in) is formed. miss / target is
    the update's relative error: 0 when the target arrived exactly, 1 when the state is no
    closer to W than if nothing had been sent.
    products: the module's TargetProducts from its solve: the Gram blocks are read from there
    (b_next given as products.b_prev, or a_next as products.a_prev, marks a factor the
    broadcast left as it was). Each block is the one formed without them, up to its sign,
    which is exact, so the norms are the same to the last bit.
    """
    if products is None:
        miss = _sum_product_norm([(b_next, a_next), (-left, right)])
        target = _sum_product_norm([(left, right), (-b_prev, a_prev)])
        return miss, target
    p = products
    same_b, same_a = b_next is p.b_prev, a_next is p.a_prev
    next_gram_b = p.gram_b if same_b else b_next.mT @ b_next  # (r, r)
    next_gram_a = p.gram_a if same_a else a_next @ a_next.mT  # (r, r)
    next_b_left = p.b_left if same_b else b_next.mT @ left  # (r, k)
    miss_terms = {
        (0, 0): lambda: (next_gram_b * next_gram_a).sum(),
        (0, 1): lambda: -(next_b_left * (a_next @ right.mT)).sum(),  # pairs (B', A'), (-L, R)
        (1, 1): lambda: p.product_terms,
    }
    target_terms = {
        (0, 0): lambda: p.product_terms,
        (0, 1): lambda: -(p.left_b * p.right_a).sum(),  # pairs (L, R), (-B, A)
        (1, 1): lambda: (p.gram_b * p.gram_a).sum(),
    }
    miss = _accumulated_norm(2, lambda j, l_index: miss_terms[j, l_index](), left.dtype)
    target = _accumulated_norm(2, lambda j, l_index: target_terms[j, l_index](), left.dtype)
    return miss, target


def outside_row_space(
    b_new: torch.Tensor, a_new: torch.Tensor, b_prev: torch.Tensor, a_prev: torch.Tensor
) -> tuple[float, float]:
    """How much of a client's update lies outside A_prev's row space, which no B update reaches.

    b_new (d_out, r), a_new (r, d_in), b_prev (d_out, r), a_prev (r, d_in) -> (||dW (I - P)||_F^2,
    ||dW||_F^2) with dW = B_new A_new - B_prev A_prev and P = A_prev^T (A_prev A_prev^T)^-1 A_prev
    the projector on A_prev's row space (pseudo-inverse when A_prev is rank-deficient).
    ||dW P||^2 = ||dW A_prev^T L^-T||^2 for G = A_prev A_prev^T = L L^T, and
    dW A_prev^T = B_new (A_new A_prev^T) - B_prev G: only (d_out, r) and (r, r) products.
    """
    total2 = float(product_frobenius_norm(torch.cat([b_new, -b_prev], 1), torch.cat([a_new, a_prev], 0))) ** 2
    gram = a_prev @ a_prev.mT  # (r, r)
    along = b_new @ (a_new @ a_prev.mT) - b_prev @ gram  # (d_out, r) = dW A_prev^T
    with single_threaded():
        inside2 = float((along @ torch.linalg.pinv(gram, hermitian=True) * along).sum())
    return max(total2 - inside2, 0.0), total2
