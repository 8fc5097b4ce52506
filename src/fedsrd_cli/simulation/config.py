"""The settings of a `simulate` run: `SimulateConfig`, its checks, and what a rerun must share.

`SimulateConfig` holds every flag of `fedsrd simulate` (paths as given, resolved by the CLI).
Building one checks every value, with the commands' own messages where a command has the same
flag (config.SparsifyConfig, config.BroadcastConfig), so a bad flag is refused before anything
is read or written. Its methods give the settings each command of a round would get:

    sparsify_config        every client's upload (the run's base sparsity, else the method's)
    broadcast_config       the coordinator's download (server_lr from round server_lr_from on)
    organisation_settings  organisation-level DP for a round that sampled some clients
    record                 config.json: the settings a resumed run must share (records.py)

`local_training_defaults` is what the CLI fills in for the local-training flags not given:
small steps for real bases, bigger ones for the toy model.

Nothing here reads a file or imports anything heavy; rounds.py runs a SimulateConfig,
records.py keeps it on disk, report.py prints its results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fedsrd_cli.config import _require
from fedsrd_cli.privacy.budget import RecordDp
from fedsrd_cli.site.quantization import NONE, QUANTIZATIONS
from fedsrd_cli.trust.roster import MIN_DENSITY

PROX_MU_DEFAULT = 0.01


@dataclass(frozen=True)
class LocalTraining:
    """Local training per client and round: what `simulate` uses when a flag is not given."""

    local_steps: int
    lr: float
    batch_size: int
    max_length: int


# FedSRD's one-factor download wants many short rounds: on a real pretrained model
# (docs/results.md) small local steps at a small lr hold, 30 steps at lr 1e-3 do not. The toy
# model, pretrained here for a few minutes, needs the bigger steps to move at all.
LOCAL_TRAINING_REAL = LocalTraining(local_steps=10, lr=1e-4, batch_size=8, max_length=128)
# --metrics-max-new-tokens of a new run: what the measured real-task runs used (docs/results.md);
# runs recorded before it became the default have 256 and keep it when resumed.
METRICS_MAX_NEW_TOKENS = 128
LOCAL_TRAINING_TOY = LocalTraining(local_steps=30, lr=1e-3, batch_size=16, max_length=512)


def local_training_defaults(demo_model: str | None) -> LocalTraining:
    """The defaults for `--model toy`, or for every other base (SmolLM2, or the user's own)."""
    return LOCAL_TRAINING_TOY if demo_model == "toy" else LOCAL_TRAINING_REAL


@dataclass(frozen=True)
class SimulateConfig:
    """What a simulation runs. Paths are stored as given (resolved by the caller).

    client_data[i] trains client client_ids[i]; eval_data[j] is scored under eval_names[j].
    seeds: number of repetitions, with seeds seed, seed + 1, ...; each seed draws its own
    round-0 state, data order, client sample and download masks.
    sample_clients: K clients train each round (a seeded choice per round and seed, the same
    for every algorithm); None = all.
    prox_mu is used by fedprox only; ffa-lora trains with A frozen.
    base_sparsity: the upload's base sparsity alpha for every importance-sparsifying method
    (FedSRD, its ablations, fedsrd-alternate); None = each method's default.
    demo_model: the demo's base model ("smollm2" or "toy") when the run is the demo; None for
    your own --base. The demo's base is always RESULTS_DIR/assets/base, so its path cannot tell
    the two apart: the model is recorded instead.
    value_dtype: dtype of the values every upload and broadcast carries (int8 / int4: block
    codes; not with secure); damping, download_fit, factor_choice, download_sparsity: the
    download's settings (config.BroadcastConfig). None =
    the commands' defaults (download_sparsity: each method's). download_value_dtype: the
    broadcasts' values (config.DOWNLOAD_VALUE_DTYPES), when not value_dtype.
    server_lr: broadcast --server-lr, every method's coordinator step (1: none), from round
    server_lr_from on (the rounds before it take the whole step); calibrate_step: broadcast
    --calibrate-step (the step divided by the uploads' gain); step_rule: broadcast --step-rule
    ("fedexp": every round's aggregate is made with --update-spread, and the sites of a
    sparsifying method sparsify with --update-sketch).
    align: aggregate --align-factors for fedsrd and fedsrd-e (the other methods have no
    full-rank aggregate to refactor).
    rescale: the importance-sparsified upload restores the L1 norm of the kept values
    (sparsify's default; False = sparsify --no-rescale).
    record_dp: every client trains with DP-SGD (train-local --dp-*; a resumed run keeps the plan,
        so its rounds past record_dp.planned_rounds are refused); None trains without DP.
    organisation_dp: organisation-level DP at the coordinator (aggregate --dp-clip ...): each
        round Poisson-samples the clients that train at (clip, noise multiplier, sampling
        rate, delta); FedSRD-e only. None: none.
    task_metrics: also score every eval file's task records each round, round 0 included
        (eval --metrics; task_eval.py); generated answers get at most metrics_max_new_tokens
        (None: METRICS_MAX_NEW_TOKENS, or what a resumed run recorded: with_recorded_defaults).
    base_quantization: every client loads the base in "nf4", "fp4" or "int8" through bitsandbytes
        (train-local --base-quantization; site/quantization.py); "none": full precision.
    site_ranks: one rank r_i <= rank per client, in client order (train-local --rank); None:
        every client trains the global rank. rank_padding: aggregate --rank-padding.
    """

    base: str
    client_data: tuple[str, ...]
    client_ids: tuple[str, ...]
    eval_data: tuple[str, ...]
    eval_names: tuple[str, ...]
    algorithms: tuple[str, ...]
    rounds: int
    sample_clients: int | None = None
    seed: int = 0
    seeds: int = 1
    local_steps: int = 30
    lr: float = 1e-3
    batch_size: int = 16
    rank: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"
    prox_mu: float = PROX_MU_DEFAULT
    max_length: int = 512
    eval_batch_size: int = 16
    device: str = "auto"
    base_sparsity: float | None = None
    demo_model: str | None = None
    value_dtype: str | None = None
    damping: float | None = None
    download_fit: str | None = None
    factor_choice: str | None = None
    download_sparsity: float | None = None
    download_value_dtype: str | None = None
    align: bool = False
    server_lr: float = 1.0
    server_lr_from: int = 1
    calibrate_step: bool = False
    step_rule: str = "fixed"
    rescale: bool = True
    record_dp: RecordDp | None = None
    organisation_dp: tuple[float, float, float, float] | None = None
    secure: bool = False
    secure_clip: float = 1.0
    secure_density: float = 1.0
    word_bits: int = 32
    task_metrics: bool = False
    metrics_max_new_tokens: int | None = None
    base_quantization: str = "none"
    site_ranks: tuple[int, ...] | None = None
    rank_padding: str = "global"

    def __post_init__(self) -> None:
        from fedsrd_cli.algorithms import get_algorithm
        from fedsrd_cli.config import PRIVATE_METHOD, QUANTIZED_VALUE_DTYPES, AggregateConfig, SparsifyConfig

        if self.base_sparsity is not None:
            SparsifyConfig(base_sparsity=self.base_sparsity)  # its checks and messages
        if self.value_dtype is not None:
            SparsifyConfig(value_dtype=self.value_dtype)  # its checks and messages
        self.broadcast_config(0.0, 0)  # its checks and messages for the download settings
        _require(self.server_lr_from >= 1, f"--server-lr-from must be >= 1, got {self.server_lr_from}")
        _require(
            self.step_rule == "fixed" or self.organisation_dp is None,
            "--step-rule fedexp reads each site's own update norm: not with organisation-level DP",
        )
        if self.download_sparsity is not None:
            for name in self.algorithms:
                _require(
                    not get_algorithm(name).dense_download or self.download_sparsity == 0.0,
                    f"--download-sparsity {self.download_sparsity:g}: {name} sends whole factors down;"
                    " run it in a separate simulation",
                )

        _require(
            self.base_quantization in QUANTIZATIONS,
            f"--base-quantization must be one of {list(QUANTIZATIONS)}, got {self.base_quantization!r}",
        )
        AggregateConfig(rank_padding=self.rank_padding)  # its checks and messages
        if self.site_ranks is not None:
            _require(
                len(self.site_ranks) == len(self.client_ids),
                f"--site-ranks gives {len(self.site_ranks)} ranks for {len(self.client_ids)} clients",
            )
            _require(
                all(1 <= r <= self.rank for r in self.site_ranks),
                f"--site-ranks must each be 1 to --rank {self.rank}, got {list(self.site_ranks)}",
            )
            _require(
                self.record_dp is None or all(r == self.rank for r in self.site_ranks),
                "--site-ranks below --rank are not supported with DP-SGD yet",
            )
        _require(len(self.algorithms) > 0, "--algorithms names no algorithm")
        for name in self.algorithms:
            get_algorithm(name)
        _require(len(set(self.algorithms)) == len(self.algorithms), "--algorithms names an algorithm twice")
        _require(len(self.client_data) > 0, "give at least one --clients-data file")
        _require(len(self.client_ids) == len(self.client_data), "one client id per --clients-data file")
        _require(len(set(self.client_ids)) == len(self.client_ids), "client ids must differ")
        _require(len(self.eval_data) > 0, "give at least one --eval-data file")
        _require(len(self.eval_names) == len(self.eval_data), "one name per --eval-data file")
        _require(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        _require(
            self.sample_clients is None or 1 <= self.sample_clients <= len(self.client_data),
            f"--sample-clients must be in [1, {len(self.client_data)}], got {self.sample_clients}",
        )
        _require(0 <= self.seed < 2**31, f"--seed must be in [0, 2^31), got {self.seed}")
        _require(1 <= self.seeds <= 100, f"--seeds must be in [1, 100], got {self.seeds}")
        _require(self.local_steps >= 1, f"--local-steps must be >= 1, got {self.local_steps}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _require(self.rank >= 1, f"--rank must be >= 1, got {self.rank}")
        _require(math.isfinite(self.alpha) and self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        _require(
            math.isfinite(self.prox_mu) and self.prox_mu >= 0, f"--prox-mu must be >= 0, got {self.prox_mu}"
        )
        _require(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        _require(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        _require(
            self.metrics_max_new_tokens is None or 1 <= self.metrics_max_new_tokens <= 65_536,
            f"--metrics-max-new-tokens must be in [1, 65,536], got {self.metrics_max_new_tokens}",
        )
        _require(
            self.demo_model in (None, "smollm2", "toy"),
            f"--model must be smollm2 or toy, got {self.demo_model!r}",
        )
        if self.secure:
            _require(
                self.algorithms == (PRIVATE_METHOD,) and self.organisation_dp is None,
                f"--secure runs on --algorithms {PRIVATE_METHOD} alone, without organisation-level DP",
            )
            _require(len(self.client_data) >= 2, "--secure needs at least two clients")
            _require(
                self.value_dtype not in QUANTIZED_VALUE_DTYPES,
                f"--value-dtype {self.value_dtype} quantizes sparse uploads, but --secure uploads are masked"
                " int32 sums; quantize the broadcast with --download-value-dtype instead",
            )
            _require(
                math.isfinite(self.secure_clip) and 0 < self.secure_clip <= 1e6,
                f"--secure-clip must be in (0, 1e6], got {self.secure_clip}",
            )
            _require(
                math.isfinite(self.secure_density) and MIN_DENSITY <= self.secure_density <= 1.0,
                f"--secure-density must be in [{MIN_DENSITY}, 1], got {self.secure_density}",
            )
            _require(self.word_bits in (16, 32), f"--word-bits must be 16 or 32, got {self.word_bits}")
        else:
            _require(
                (self.secure_density, self.word_bits) == (1.0, 32),
                "--secure-density and --word-bits set a secure round's roster: add --secure",
            )
        if self.organisation_dp is not None:
            self.organisation_settings(len(self.client_data))  # its checks and messages
            _require(
                self.algorithms == (PRIVATE_METHOD,),
                f"organisation-level DP (--dp-org-clip) runs on --algorithms {PRIVATE_METHOD} alone",
            )
            _require(
                self.sample_clients is None,
                "organisation-level DP samples the clients itself (--dp-org-sampling-rate):"
                " leave out --sample-clients",
            )

    def organisation_settings(self, sampled: int) -> Any:
        """This run's organisation-level DP for a round that sampled `sampled` clients."""
        from fedsrd_cli.privacy.ledger import OrganisationDp

        assert self.organisation_dp is not None
        clip, noise, rate, delta = self.organisation_dp
        return OrganisationDp(clip, noise, rate, delta, len(self.client_data), sampled)

    @property
    def participants(self) -> int:
        return self.sample_clients or len(self.client_data)

    def seed_values(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]

    def sparsify_config(self, algorithm_base_sparsity: float, dense_upload: bool = True) -> Any:
        """The upload settings of every client (base sparsity: this run's, else the method's);
        sparsified uploads carry their update sketch under --step-rule fedexp."""
        from fedsrd_cli.config import SparsifyConfig

        base_sparsity = algorithm_base_sparsity if self.base_sparsity is None else self.base_sparsity
        given = {} if self.value_dtype is None else {"value_dtype": self.value_dtype}
        sketch = self.step_rule == "fedexp" and not dense_upload
        return SparsifyConfig(
            base_sparsity=base_sparsity, rescale=self.rescale, update_sketch=sketch, **given
        )

    def broadcast_config(self, download_sparsity: float, seed: int, round_index: int | None = None) -> Any:
        """The coordinator's broadcast settings: this run's where given, else broadcast's defaults
        (download_sparsity: the method's default, used when the run gives none); server_lr
        applies from round server_lr_from on (round_index None: the run's server_lr)."""
        from fedsrd_cli.config import BroadcastConfig, server_lr_for_round

        given = {
            key: value
            for key, value in (
                ("value_dtype", self.download_value_dtype or self.value_dtype),
                ("damping", self.damping),
                ("download_fit", self.download_fit),
                ("factor_choice", self.factor_choice),
            )
            if value is not None
        }
        if self.organisation_dp is not None or self.secure:
            given.setdefault("factor_choice", "b")  # the only choice DP's and secure rounds allow
        if self.download_sparsity is not None:
            download_sparsity = self.download_sparsity
        return BroadcastConfig(
            download_sparsity=download_sparsity,
            seed=seed,
            server_lr=server_lr_for_round(self.server_lr, self.server_lr_from, round_index),
            calibrate_step=self.calibrate_step,
            step_rule=self.step_rule,
            **given,
        )

    def record(self) -> dict[str, Any]:
        """The settings a resumed run must share (everything but --rounds and --device)."""
        data = asdict(self)
        for key in ("rounds", "device"):
            data.pop(key)
        # Settings given as None (the defaults) are left out, so runs recorded before the
        # flag existed still resume.
        for key in (
            "base_sparsity",
            "value_dtype",
            "damping",
            "download_fit",
            "factor_choice",
            "download_sparsity",
            "download_value_dtype",
            "record_dp",
            "organisation_dp",
        ):
            if data[key] is None:
                data.pop(key)
        if self.base_quantization == NONE:  # recorded only when used, so earlier runs resume
            data.pop("base_quantization")
        if self.site_ranks is None:  # likewise
            data.pop("site_ranks")
        if self.rank_padding == "global":
            data.pop("rank_padding")
        if self.rescale:  # recorded only when off, so runs from before the flag resume
            data.pop("rescale")
        if not self.align:  # recorded only when on, so runs from before the flag resume
            data.pop("align")
        if self.server_lr == 1.0:  # likewise: recorded only when set
            data.pop("server_lr")
        if self.server_lr_from == 1:
            data.pop("server_lr_from")
        if not self.calibrate_step:
            data.pop("calibrate_step")
        if self.step_rule == "fixed":  # likewise
            data.pop("step_rule")
        if not self.secure:  # recorded only when on, so runs from before the flag resume
            data.pop("secure")
            data.pop("secure_clip")
        if (self.secure_density, self.word_bits) == (1.0, 32):  # likewise
            data.pop("secure_density")
            data.pop("word_bits")
        if not self.task_metrics:  # likewise
            data.pop("task_metrics")
            data.pop("metrics_max_new_tokens")
        elif data["metrics_max_new_tokens"] is None:
            data["metrics_max_new_tokens"] = METRICS_MAX_NEW_TOKENS
        if data["demo_model"] in (None, "toy"):  # demo runs recorded before --model existed were toy
            data.pop("demo_model")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
