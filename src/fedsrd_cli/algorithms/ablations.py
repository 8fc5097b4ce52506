"""Ablations of FedSRD: each changes exactly one piece of it (docs/algorithms.md)."""

from __future__ import annotations

from fedsrd_cli.algorithms.fedsrd import IMPORTANCE_SETTINGS
from fedsrd_cli.algorithms.method import Method
from fedsrd_cli.algorithms.steps import (
    alternating_update,
    average_factors,
    dense_factors_update,
    encode_fixed_ratio,
    encode_importance,
    encode_random_importance_ratio,
    reconstruct_balanced,
    reconstruct_truncated,
)


class FedSRDFixedRatio(Method):
    """FedSRD with a fixed pruning ratio: rho = --base-sparsity for every matrix (the kurtosis
    term is off, whatever --kurtosis-coeff says).

    Up: importance-sparsified dA, dB keeping the elements above the base-sparsity quantile
        (kept values + 1-bit mask).  Aggregate and down: as FedSRD.
    """

    name = "fedsrd-fixed-ratio"
    upload_method = "fedsrd-fixed-ratio"
    encode = staticmethod(encode_fixed_ratio)
    upload_settings = ("base_sparsity", "rescale", "value_dtype")
    combine = staticmethod(reconstruct_truncated)
    decompose = staticmethod(alternating_update)


class FedSRDRandomSparsify(Method):
    """FedSRD with random instead of importance-based upload sparsification.

    Up: per matrix, FedSRD's adaptive ratio rho (from the importance scores' kurtosis), then
        each element kept at random with probability 1 - rho (seeded mask), L1-rescaled as
        FedSRD does: the same expected kept fraction, other elements.
        Kept values + 1-bit mask.  Aggregate and down: as FedSRD.
    """

    name = "fedsrd-random-sparsify"
    upload_method = "fedsrd-random-sparsify"
    encode = staticmethod(encode_random_importance_ratio)
    upload_settings = IMPORTANCE_SETTINGS
    combine = staticmethod(reconstruct_truncated)
    decompose = staticmethod(alternating_update)
    random_upload = True


class FedSRDDenseDownload(Method):
    """FedSRD with FlexLoRA's download instead of the alternating sparse one.

    Up: FedSRD's sparse upload (uploads record "fedsrd").
    Aggregate: W = sum_i w_i B_i A_i truncated to rank r, split B' = U sqrt(S), A' = sqrt(S) Vh.
    Down: dense dB = B' - B_prev and dA = A' - A_prev (download sparsity must be 0).
    """

    name = "fedsrd-dense-download"
    upload_method = "fedsrd"
    encode = staticmethod(encode_importance)
    upload_settings = IMPORTANCE_SETTINGS
    combine = staticmethod(reconstruct_balanced)
    decompose = staticmethod(dense_factors_update)
    dense_download = True


class FedSRDNoReconstruction(Method):
    """FedSRD without full-rank reconstruction.

    Up: FedSRD's sparse upload (uploads record "fedsrd").
    Aggregate: mean B = sum_i w_i B_i and mean A = sum_i w_i A_i (factors averaged apart);
        the target is W = mean B mean A.
    Down: as FedSRD: one factor, least squares for that target, randomly sparsified.
    """

    name = "fedsrd-no-reconstruction"
    upload_method = "fedsrd"
    encode = staticmethod(encode_importance)
    upload_settings = IMPORTANCE_SETTINGS
    combine = staticmethod(average_factors)
    decompose = staticmethod(alternating_update)
