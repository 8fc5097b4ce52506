"""Privacy accounting: the epsilon of a history of subsampled Gaussian mechanisms.

Every differentially private release fedsrd makes is a *subsampled Gaussian mechanism*:
each record (DP-SGD at a site) or each site (noise at the coordinator) takes part in a
step independently with probability q (Poisson sampling), the contributions are clipped
to an L2 norm C, summed, and Gaussian noise of standard deviation sigma * C is added.
A history is a list of (sigma, q, steps) triples; their privacy composes.

The accountant is Opacus's Renyi-DP analysis of the sampled Gaussian mechanism
(Mironov, Talwar, Zhang 2019), composed over the history and converted to (epsilon,
delta) with Balle et al. 2020, Theorem 21, on the fixed grid of orders ORDERS below. The
same history always gives the same epsilon, so anyone can recompute what a file records
(tests compare it with Google's dp-accounting, an independent implementation).

Opacus is imported inside the functions, so commands that never meet a privacy ledger do
not pay for it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

from fedsrd_cli.errors import UsageError

ACCOUNTANT = "rdp"
# Renyi orders: Opacus's default grid, extended to large orders (dp-accounting's grid ends the
# same way), so small noise multipliers are not bounded by the largest order alone.
ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(11, 64),
    64,
    80,
    96,
    128,
    192,
    256,
    512,
    1024,
)
# A noise multiplier calibrated for a target epsilon is at most this large (Opacus's bound).
MAX_NOISE_MULTIPLIER = 1e6

Step = tuple[float, float, int]  # (noise multiplier sigma, sampling rate q, steps)


def epsilon(history: Sequence[Step], delta: float) -> float:
    """(epsilon, delta)-DP of the composed history, >= 0: math.inf when any step adds no noise.

    history: (sigma, q, steps) per phase; q in [0, 1], sigma >= 0, steps >= 0.
    epsilon = max(0, min over orders a of  RDP(a) + log((a - 1) / a) - (log delta + log a) / (a - 1)),
    RDP(a) = sum over phases of steps * RDP_SGM(q, sigma, a)   (Balle et al. 2020, Thm 21).
    Composition is a sum, so phases with the same (sigma, q) are added up first and each
    distinct pair's RDP is computed once per process.
    """
    if not 0.0 < delta < 1.0:
        raise UsageError(f"delta must be in (0, 1), got {delta}")
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        if count > 0 and rate > 0:
            key = (float(sigma), float(rate))
            steps[key] = steps.get(key, 0) + int(count)
    if not steps:
        return 0.0
    if any(sigma <= 0.0 for sigma, _ in steps):
        return math.inf
    from opacus.accountants.analysis import rdp

    total = [0.0] * len(ORDERS)
    for (sigma, rate), count in steps.items():
        total = [t + count * r for t, r in zip(total, _rdp_of_one_step(sigma, rate), strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the bound still holds
        eps, _order = rdp.get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    # The conversion's terms log((a - 1) / a) - log(delta a) / (a - 1) are negative at large orders
    # once delta * a is large enough, so a history with very little privacy loss (huge noise) gets
    # a negative bound, e.g. -0.0065 at sigma 10, delta 1/120. A mechanism that is (eps, delta)-DP is
    # (eps', delta)-DP for every eps' >= eps, so 0 is as true and is the bound a ledger records
    # (dp-accounting's conversion returns max(0, eps) the same way).
    return max(0.0, float(eps))


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(sigma: float, rate: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at every order of ORDERS (Opacus)."""
    from opacus.accountants.analysis import rdp

    return tuple(
        float(v) for v in rdp.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=list(ORDERS))
    )


def noise_multiplier_for(
    target_epsilon: float, delta: float, spent: Sequence[Step], sample_rate: float, steps: int, phases: int
) -> float:
    """The smallest noise multiplier sigma (to 0.1%) for which `spent` followed by `phases` more
    phases of (sigma, sample_rate, steps) stays within (target_epsilon, delta).

    A site that plans R rounds of S steps calibrates round t with phases = R - t + 1, so the
    whole plan ends at target_epsilon whatever it spent before. UsageError when `spent` alone
    already exceeds the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise UsageError(f"the target epsilon must be a number > 0, got {target_epsilon}")
    if phases < 1 or steps < 1:
        raise UsageError("calibration needs at least one planned step")
    already = epsilon(spent, delta)
    if already >= target_epsilon:
        raise UsageError(
            f"the budget is spent: the history already costs epsilon {already:.4g} of the"
            f" target {target_epsilon:g}"
        )

    def cost(sigma: float) -> float:
        return epsilon([*spent, *[(sigma, sample_rate, steps)] * phases], delta)

    low, high = 0.0, 1.0
    while cost(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > MAX_NOISE_MULTIPLIER:
            raise UsageError(
                f"epsilon {target_epsilon:g} at delta {delta:g} cannot be reached with this plan"
                " (even a noise multiplier of 1e6 spends more)"
            )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2.0
        if cost(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
