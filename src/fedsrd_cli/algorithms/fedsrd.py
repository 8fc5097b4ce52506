"""FedSRD and FedSRD-e: Sparsify (client), Reconstruct + aggregate, Decompose (coordinator).

See ../shared/fedsrd-method.md. The pieces are in .steps, the module-by-module
driver in .method; nothing here touches a file.
"""

from __future__ import annotations

from fedsrd_cli.algorithms.method import Method
from fedsrd_cli.algorithms.steps import (
    alternating_update,
    encode_importance,
    reconstruct_exact,
    reconstruct_truncated,
)

# The SparsifyConfig fields FedSRD's importance sparsification uses (recorded in uploads).
IMPORTANCE_SETTINGS = ("base_sparsity", "kurtosis_coeff", "kurtosis_cap", "rescale", "value_dtype")


class FedSRD(Method):
    """FedSRD (`exact=False`: project the aggregate to rank r) or FedSRD-e (`exact=True`).

    Up: per factor, the importance-sparsified delta (kurtosis-adaptive ratio, L1 rescale):
        kept fp32 values + a 1-bit mask, for dA and dB. Uploads record method "fedsrd".
    Aggregate: W = sum_i w_i B_i A_i, truncated to rank r (FedSRD) or kept whole (FedSRD-e).
    Down: one factor per round (B odd, A even), least squares for W, randomly sparsified
        (download sparsity p, DARE rescale): kept values only, the mask comes from the seed.
    """

    upload_method = "fedsrd"
    upload_settings = IMPORTANCE_SETTINGS
    encode = staticmethod(encode_importance)
    decompose = staticmethod(alternating_update)

    def __init__(self, exact: bool = False):
        self.exact = exact
        self.name = "fedsrd-e" if exact else "fedsrd"
        self.combine = reconstruct_exact if exact else reconstruct_truncated


class FedSRDAlternate(FedSRD):
    """FedSRD with alternating local training: an opt-in change of ours, not in the paper.

    Clients train only the factor this round's broadcast updates (`train-local --alternate`:
    lora_B in odd rounds, lora_A in even ones), so every client's update lies where the
    one-factor download can carry it: with A fixed, W = sum_i w_i B_i A_prev has rank <= r and
    dB = dW pinv(A_prev) is the weighted mean of the clients' dB exactly (likewise for A), and
    the first-order error of the alternating decomposition is gone.
    Up: the importance-sparsified delta of the trained factor only (the other is unchanged,
        so it uploads nothing; an upload that changed it is refused). Uploads record
        "fedsrd-alternate".
    Aggregate and down: as FedSRD (rank-r truncation, one factor, random download mask).

    Default base sparsity 0.7 instead of 0.85: one factor is sent instead of two, so keeping
    twice the base fraction (1 - 0.7 = 2 * (1 - 0.85)) budgets the upload like FedSRD's at the
    base ratio; the kurtosis term then prunes up to kurtosis_cap more of either, so measured
    bytes differ with the data (docs/results.md).
    """

    upload_method = "fedsrd-alternate"
    local_training = "alternate"
    default_base_sparsity = 0.7

    def __init__(self) -> None:
        super().__init__(exact=False)
        self.name = "fedsrd-alternate"
