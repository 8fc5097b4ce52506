"""The baselines the paper compares FedSRD with (docs/algorithms.md).

Each is a .method.Method with its pieces from .steps; the docstrings say exactly
what travels each way. Dense values are fp32 unless --value-dtype says otherwise;
a dense broadcast is stored as 1-D values with download sparsity 0 (the seeded
mask keeps every element, so no mask travels).
"""

from __future__ import annotations

from fedsrd_cli.algorithms.method import Method
from fedsrd_cli.algorithms.steps import (
    average_factors,
    dense_b_update,
    dense_factors_update,
    encode_dare,
    encode_dense,
    reconstruct_balanced,
)


class FedAvg(Method):
    """FedAvg.

    Up: dense dA (r, d_in) and dB (d_out, r).
    Aggregate: mean B = sum_i w_i B_i and mean A = sum_i w_i A_i, each factor on its own;
        stored as left = mean B, right = mean A.
    Down: dense dB = mean B - B_prev and dA = mean A - A_prev (download sparsity must be 0).
    """

    name = "fedavg"
    upload_method = "fedavg"
    encode = staticmethod(encode_dense)
    combine = staticmethod(average_factors)
    decompose = staticmethod(dense_factors_update)
    dense_download = True


class FedProx(FedAvg):
    """FedProx: FedAvg's files and math; the proximal term mu/2 ||theta - theta_global||^2
    lives in local training (`train-local --prox-mu`). Its own name, so files say what
    produced them.

    Up: dense dA, dB.  Aggregate: mean A, mean B.  Down: dense dA, dB.
    """

    name = "fedprox"
    upload_method = "fedprox"


class FFALoRA(Method):
    """FFA-LoRA: A stays frozen at its initial value; only B is trained and sent.

    Up: dense dB only (an upload whose A changed is refused: train with --freeze-a).
    Aggregate: mean B = sum_i w_i B_i; A stays A_prev exactly.
    Down: dense dB = mean B - B_prev only; A is never sent, so it never changes.
    """

    name = "ffa-lora"
    upload_method = "ffa-lora"
    local_training = "B"
    encode = staticmethod(encode_dense)
    combine = staticmethod(average_factors)
    decompose = staticmethod(dense_b_update)
    dense_download = True


class FlexLoRA(Method):
    """FlexLoRA: full-rank aggregation, truncated SVD, dense new factors.

    Up: dense dA, dB.
    Aggregate: W = sum_i w_i B_i A_i, truncated to rank r, W_r = U S Vh, split evenly:
        B' = U sqrt(S) (d_out, r), A' = sqrt(S) Vh (r, d_in).
    Down: dense dB = B' - B_prev and dA = A' - A_prev.
    """

    name = "flexlora"
    upload_method = "flexlora"
    encode = staticmethod(encode_dense)
    combine = staticmethod(reconstruct_balanced)
    decompose = staticmethod(dense_factors_update)
    dense_download = True


class FedDARE(Method):
    """Fed-DARE: random sparsification of uploads with rescaling, then FedAvg.

    Up: for dA and dB, each element kept with probability 1 - p (p = --upload-drop, default
        0.9; mask seeded by the round's parent state and the client id), kept values divided
        by 1 - p: kept fp32 values + a 1-bit mask.
    Aggregate: mean A, mean B of the reconstructed factors (FedAvg).
    Down: dense dB, dA (download sparsity must be 0).
    """

    name = "fed-dare"
    upload_method = "fed-dare"
    encode = staticmethod(encode_dare)
    upload_settings = ("upload_drop", "value_dtype")
    combine = staticmethod(average_factors)
    decompose = staticmethod(dense_factors_update)
    random_upload = True
    dense_download = True
