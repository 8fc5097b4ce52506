"""Configuration as small frozen dataclasses, validated on creation.

A bad value raises UsageError with the flag name, so the CLI can pass user input
straight in and still give a one-line message.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from fedsrd_cli.errors import UsageError
from fedsrd_cli.limits import MAX_SERVER_LR
from fedsrd_cli.privacy.ledger import OrganisationDp

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

VALUE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# Every registered algorithm, by name (docs/algorithms.md). algorithms/__init__.py builds the
# registry from its classes and refuses to import if it disagrees with this tuple.
AGGREGATE_METHODS = (
    "fedsrd",
    "fedsrd-e",
    "fedavg",
    "fedprox",
    "ffa-lora",
    "flexlora",
    "fed-dare",
    "fedsrd-fixed-ratio",
    "fedsrd-random-sparsify",
    "fedsrd-dense-download",
    "fedsrd-no-reconstruction",
    "fedsrd-alternate",
)
WEIGHTINGS = ("uniform", "samples")
# The method organisation-level DP runs on (AggregateConfig.organisation_dp).
PRIVATE_METHOD = "fedsrd-e"
OUTLIER_ACTIONS = ("refuse", "clip")
# The methods whose aggregate is a full-rank W that `aggregate --align-factors` can refactor.
ALIGNABLE_METHODS = ("fedsrd", "fedsrd-e")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA configuration every party shares: rank r, alpha, target module names."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        _require(isinstance(self.rank, int) and self.rank >= 1, f"--rank must be >= 1, got {self.rank}")
        _require(math.isfinite(self.alpha) and self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        _require(
            self.alpha / self.rank <= FLOAT32_MAX,
            f"--alpha {self.alpha:g}: the LoRA scale alpha / r is not a finite float32",
        )
        _require(len(self.target_modules) > 0, "--targets names no module")
        object.__setattr__(self, "target_modules", tuple(sorted(set(self.target_modules))))

    @property
    def scaling(self) -> float:
        """alpha / r: the module's weight is W0 + scaling * B A."""
        return self.alpha / self.rank

    def to_json(self) -> str:
        return json.dumps(
            {"r": self.rank, "lora_alpha": self.alpha, "target_modules": list(self.target_modules)},
            sort_keys=True,
        )

    @classmethod
    def from_dict(cls, data: dict) -> LoraSpec:
        return cls(
            rank=int(data["r"]),
            alpha=float(data["lora_alpha"]),
            target_modules=tuple(str(t) for t in data["target_modules"]),
        )

    def describe(self) -> str:
        return f"r={self.rank}, alpha={self.alpha:g}, targets={','.join(self.target_modules)}"


@dataclass(frozen=True)
class InitConfig:
    """`fedsrd init`: the LoRA rank, alpha and target modules, and the seed of the A factors.

    Checked before the model is read, so a bad value is a usage error (exit 2) naming its
    flag; whether the targets exist and the rank fits them is checked against the model
    (model_spec.lora_module_shapes).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"--rank must be >= 1, got {self.rank}")
        _require(math.isfinite(self.alpha) and self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        _require(any(t.strip() for t in self.targets.split(",")), "--targets names no module")
        _require(0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}")


# Uploads and broadcasts may also send their values as block-quantized codes (math.quantize):
# int8, or int4 packed two a byte, each with one float32 scale per 64 values.
QUANTIZED_VALUE_DTYPES = ("int8", "int4")
DOWNLOAD_VALUE_DTYPES = (*VALUE_DTYPES, *QUANTIZED_VALUE_DTYPES)
UPLOAD_VALUE_DTYPES = DOWNLOAD_VALUE_DTYPES

# The values of uploads and broadcasts travel in bfloat16 unless --value-dtype says otherwise:
# on SmolLM2-135M-Instruct (3 seeds, docs/results.md) FedSRD ended no worse than with fp32 at
# about 60% of its bytes. fp32 reproduces the paper's accounting.
DEFAULT_VALUE_DTYPE = "bf16"


@dataclass(frozen=True)
class SparsifyConfig:
    """Upload settings (method section 1). Defaults are the authors' runs.

    base_sparsity, kurtosis_coeff, kurtosis_cap, rescale: FedSRD's importance sparsification.
    upload_drop: Fed-DARE's drop probability p (each element kept with probability 1 - p).
    value_dtype: dtype of the uploaded values, for every method (UPLOAD_VALUE_DTYPES): fp32,
        bf16, fp16, or int8 / int4 block codes with float32 scales (math.quantize).
    update_sketch: also record a tensor sketch of the site's exact update (`--update-sketch`:
        UPDATE_SKETCH_WIDTH numbers in info.update_sketch, math.sketch), from which a coordinator
        of sparsified uploads estimates the sites' mean update (FedExP's step, its target's fidelity).
    """

    base_sparsity: float = 0.85
    kurtosis_coeff: float = 0.1
    kurtosis_cap: float = 0.11
    rescale: bool = True
    value_dtype: str = DEFAULT_VALUE_DTYPE
    upload_drop: float = 0.9
    update_sketch: bool = False

    def __post_init__(self) -> None:
        _require(
            0.0 <= self.upload_drop < 1.0,
            f"--upload-drop must be in [0, 1), got {self.upload_drop}",
        )
        _require(
            0.0 <= self.base_sparsity < 1.0,
            f"--base-sparsity must be in [0, 1), got {self.base_sparsity}",
        )
        _require(self.kurtosis_coeff >= 0.0, "--kurtosis-coeff must be >= 0")
        _require(self.kurtosis_cap >= 0.0, "--kurtosis-cap must be >= 0")
        _require(
            self.base_sparsity + self.kurtosis_cap < 1.0,
            "--base-sparsity + --kurtosis-cap must stay below 1 (it would drop every element)",
        )
        _require(
            self.value_dtype in UPLOAD_VALUE_DTYPES,
            f"--value-dtype must be one of {list(UPLOAD_VALUE_DTYPES)}, got {self.value_dtype!r}",
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# How the rank-r projection of W = sum_i w_i B_i A_i is computed (aggregate --truncation):
#   exact       SVD from the stacked thin factors, O((d_out + d_in) (m r)^2): best for few clients
#   randomized  randomized subspace iteration, 2 power iterations, sketch 2 r: linear in m
#   auto        exact while m r <= 6 sketches (m <= 12 at the default sketch), randomized beyond
TRUNCATIONS = ("auto", "exact", "randomized")
# How the coordinator pads an upload of a site rank below the global one (algorithms.site_rank).
RANK_PADDINGS = ("global", "zeros")


@dataclass(frozen=True)
class AggregateConfig:
    """Coordinator aggregation (method section 2).

    require_dp: `--require-dp EPS`: every upload must carry a record-level privacy ledger whose
    recomputed epsilon is at most EPS (docs/privacy.md).
    organisation_dp: organisation-level DP (`--dp-clip ...`): each site's update clipped to
    C, the sum divided by the expected number of sampled sites; the broadcast adds the noise.
    It needs FedSRD-e (the B update is then linear in the sites' updates), uniform weights,
    and replaces --max-update-norm. max_epsilon: refuse a round that would take the
    organisation-level epsilon past it. max_samples: refuse an upload recording more training
    samples (a site that claims a huge count would dominate --weighting samples).
    align: store W as rank-r factors in the clients' own scale (math.lowrank.align_factors, from
    their weighted mean factors), for the two-factor download (`--align-factors`).
    rank_padding: how an upload of a site rank r_i < r is padded back to rank r
    (`--rank-padding`, algorithms.site_rank): "global" (the site's untrained components are the
    global ones: exact) or "zeros" (HetLoRA's zero padding, a baseline).
    update_spread: record what FedExP's step reads (`--update-spread`; the aggregate's
    "update_spread", for `broadcast --step-rule fedexp`): the norms of the sites' updates and
    of their mean (from dense uploads themselves; for sparsified ones, from the sites' reported
    norms and update sketches). Costs about m^2 (d_out + d_in) r^2 flops per module for m sites;
    not under organisation-level DP (the step would depend on the sites' data).
    """

    method: str = "fedsrd"
    weighting: str = "uniform"
    max_update_norm: float | None = None
    on_outlier: str = "refuse"
    truncation: str = "auto"
    require_dp: float | None = None
    organisation_dp: OrganisationDp | None = None
    max_epsilon: float | None = None
    max_samples: int | None = None
    align: bool = False
    rank_padding: str = "global"
    update_spread: bool = False

    def __post_init__(self) -> None:
        _require(
            not self.update_spread or self.organisation_dp is None,
            "--update-spread measures the sites' own updates, and organisation-level DP lets no"
            " step depend on them: leave it out (the broadcast then keeps --server-lr)",
        )
        _require(self.rank_padding in RANK_PADDINGS, f"--rank-padding must be one of {list(RANK_PADDINGS)}")
        _require(
            not self.align or self.method in ALIGNABLE_METHODS,
            f"--align-factors refactors FedSRD's full-rank aggregate; --method {self.method} has none",
        )
        _require(
            not self.align or self.organisation_dp is None,
            "--align-factors depends on each site's factors: not with organisation-level DP",
        )
        _require(self.truncation in TRUNCATIONS, f"--truncation must be one of {list(TRUNCATIONS)}")
        _require(self.method in AGGREGATE_METHODS, f"--method must be one of {list(AGGREGATE_METHODS)}")
        _require(self.weighting in WEIGHTINGS, f"--weighting must be one of {list(WEIGHTINGS)}")
        _require(
            self.max_update_norm is None
            or (math.isfinite(self.max_update_norm) and self.max_update_norm > 0),
            f"--max-update-norm must be a finite number > 0, got {self.max_update_norm}",
        )
        _require(self.on_outlier in OUTLIER_ACTIONS, f"--on-outlier must be one of {list(OUTLIER_ACTIONS)}")
        _require(
            self.require_dp is None or (math.isfinite(self.require_dp) and self.require_dp > 0),
            f"--require-dp must be a number > 0, got {self.require_dp}",
        )
        _require(
            self.max_epsilon is None or (math.isfinite(self.max_epsilon) and self.max_epsilon > 0),
            f"--dp-max-epsilon must be a number > 0, got {self.max_epsilon}",
        )
        _require(
            self.max_samples is None or self.max_samples >= 1,
            f"--max-samples must be >= 1, got {self.max_samples}",
        )
        _require(
            self.max_epsilon is None or self.organisation_dp is not None,
            "--dp-max-epsilon caps organisation-level DP: give --dp-clip, --dp-noise-multiplier and"
            " --dp-delta too",
        )
        if self.organisation_dp is not None:
            _require(
                self.method == PRIVATE_METHOD,
                f"organisation-level DP (--dp-clip) is built for --method {PRIVATE_METHOD} only: without"
                " the rank truncation its B update is linear in the sites' updates, so one site's effect"
                f" is bounded (docs/privacy.md); got --method {self.method}",
            )
            _require(
                self.weighting == "uniform",
                "organisation-level DP weighs every site alike (--weighting uniform): weights from"
                " sample counts would depend on the sites' data",
            )
            _require(
                self.max_update_norm is None,
                "--dp-clip already bounds every site's update; leave out --max-update-norm",
            )


# How a one-factor broadcast fits its random download mask (docs/algorithms.md, "The download"):
#   dare   the paper: least squares on the whole factor, then keep the masked elements and
#          divide them by 1 - p (DARE), an unbiased estimate with variance p / (1 - p)
#   lstsq  least squares on the kept elements: the best update the mask allows, never rescaled
#          (never farther from the target than sending nothing, but it delivers less per round)
DOWNLOAD_FITS = ("dare", "lstsq")
# Which factor a one-factor broadcast updates, per module:
#   fit     the one whose least-squares update fits the round's target better
#   parity  the paper: B in odd rounds, A in even ones
#   b       B in every round (A keeps its round-0 value): what organisation-level DP requires,
#           and what `fit` picks nearly always (docs/results.md)
#   both    two alternating least-squares steps, both sent: B for the target, then A for what
#           the sent B update leaves of it (docs/algorithms.md, "Few, long rounds")
FACTOR_CHOICES = ("fit", "parity", "b", "both")
# The coordinator's step rule (BroadcastConfig.step_rule): server_lr alone, or times FedExP's eta.
STEP_RULES = ("fixed", "fedexp")


def server_lr_for_round(server_lr: float, first_round: int, round_index: int | None) -> float:
    """The coordinator's step of round `round_index` under `--server-lr X --server-lr-from R`
    (simulate, the Flower run config): X from round R on, 1 before it; X when round_index is
    None (a coordinator running `broadcast` by hand passes the step it wants)."""
    return server_lr if round_index is None or round_index >= first_round else 1.0


@dataclass(frozen=True)
class BroadcastConfig:
    """Download decomposition and random sparsification (method section 3).

    damping: ridge weight of the one-factor least-squares solve, relative to sigma_max^2 of
    the factor that is inverted (0: the exact pseudo-inverse of the paper).
    download_fit: one of DOWNLOAD_FITS; factor_choice: one of FACTOR_CHOICES. None of the three
    matters to methods that send whole factors.
    noise_seed: organisation-level DP draws its noise from a secret key; a seed makes the
    noise reproducible, for tests only (it protects nothing).
    server_lr: the coordinator's step (FedOpt's server learning rate, Reddi et al., ICLR 2021):
    every factor update the broadcast sends is multiplied by it, X' = X + server_lr * dX for
    each factor X sent: below 1 a shorter step than the download, above 1 an extrapolation
    past it (up to MAX_SERVER_LR). 1 (the default) sends the download unchanged, bit for bit.
    calibrate_step: divide server_lr by the uploads' gain (the aggregate's upload_fidelity: how
    many times their own updates the sites' reconstructions carry along them), so the step is
    the same multiple of the sites' updates whatever the upload inflates; capped at
    MAX_SERVER_LR. Ignored where the aggregate records no gain (secure sums, whose projections
    are exact) and under organisation-level DP (the gain depends on the sites' data).
    step_rule: one of STEP_RULES. "fixed": the step is server_lr. "fedexp": server_lr times
    FedExP's extrapolation eta = max(1, sum_i w_i ||D_i||^2 / (2 ||sum_i w_i D_i||^2)) (Jhunjhunwala
    et al., ICLR 2023; math.extrapolation), read from an aggregate made with --update-spread;
    with calibrate_step also divided by the uploads' gain; capped at MAX_SERVER_LR.
    """

    download_sparsity: float = 0.8
    seed: int = 0
    value_dtype: str = DEFAULT_VALUE_DTYPE
    damping: float = 1e-3
    download_fit: str = "dare"
    factor_choice: str = "fit"
    noise_seed: int | None = None
    server_lr: float = 1.0
    calibrate_step: bool = False
    step_rule: str = "fixed"

    def __post_init__(self) -> None:
        _require(
            self.step_rule in STEP_RULES,
            f"--step-rule must be one of {list(STEP_RULES)}, got {self.step_rule!r}",
        )
        _require(
            0.0 <= self.download_sparsity <= 0.999,
            f"--download-sparsity must be in [0, 0.999], got {self.download_sparsity}",
        )
        _require(0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}")
        _require(
            self.value_dtype in DOWNLOAD_VALUE_DTYPES,
            f"--value-dtype must be one of {list(DOWNLOAD_VALUE_DTYPES)}, got {self.value_dtype!r}",
        )
        _require(
            math.isfinite(self.damping) and 0.0 <= self.damping <= 1.0,
            f"--damping must be in [0, 1], got {self.damping}",
        )
        _require(
            self.download_fit in DOWNLOAD_FITS,
            f"--download-fit must be one of {list(DOWNLOAD_FITS)}, got {self.download_fit!r}",
        )
        _require(
            self.factor_choice in FACTOR_CHOICES,
            f"--factor-choice must be one of {list(FACTOR_CHOICES)}, got {self.factor_choice!r}",
        )
        _require(
            math.isfinite(self.server_lr) and 0.0 < self.server_lr <= MAX_SERVER_LR,
            f"--server-lr must be in (0, {MAX_SERVER_LR:g}], got {self.server_lr}",
        )
