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
