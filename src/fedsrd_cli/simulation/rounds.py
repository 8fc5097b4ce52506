"""`fedsrd simulate`: every client and the coordinator in one process, for comparing methods.

Each round runs the same functions the commands run, on real files: `training.train_local`
per participating client, `Algorithm.upload` (the client's upload, written with
`artifacts.write_artifact` and read back, so its size is the real bytes), `Algorithm.aggregate`
and `Algorithm.broadcast` (the coordinator), `protocol.apply_broadcast` (what every client
does with the broadcast; it checks the result hash), and `evaluation.evaluate` on the eval files.
No math is repeated here.

Layout of RESULTS_DIR:
    config.json          the run's settings; a rerun must give the same ones (only --rounds may grow)
    results.json         per algorithm, per seed, per round: eval losses, bytes, server seconds
                         (and with --metrics each eval file's task score and their mean)
    results.md           a table of the final round (mean +- std over seeds); with --metrics the
                         task scores of the final round and the mean task score of every round
    traffic_vs_loss.png  mean eval loss against cumulative traffic per client (with --metrics a
                         second panel: the mean task score)
    work/ALG/seed-S/     global-rT.safetensors, and round-T/ with uploads, aggregate, broadcast
    assets/              the demo's base model (--model) and data (only when no --base was given)

results.json is rewritten (atomically) after every completed round, so a killed run resumes
from its last completed global state.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsrd_cli.config import _require
from fedsrd_cli.errors import ArtifactError, MismatchError, OutputExistsError, UsageError
from fedsrd_cli.privacy.budget import RecordDp

RESULTS_VERSION = 1
PROX_MU_DEFAULT = 0.01
MB = 1024 * 1024


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
    value_dtype: dtype of the values every upload and broadcast carries; damping, download_fit,
    factor_choice, download_sparsity: the download's settings (config.BroadcastConfig). None =
    the commands' defaults (download_sparsity: each method's). download_value_dtype: the
    broadcasts' values (config.DOWNLOAD_VALUE_DTYPES), when not value_dtype.
    server_lr: broadcast --server-lr, every method's coordinator step (1: none), from round
    server_lr_from on (the rounds before it take the whole step); calibrate_step: broadcast
    --calibrate-step (the step divided by the uploads' gain).
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
    rescale: bool = True
    record_dp: RecordDp | None = None
    organisation_dp: tuple[float, float, float, float] | None = None
    secure: bool = False
    secure_clip: float = 1.0
    task_metrics: bool = False
    metrics_max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        from fedsrd_cli.algorithms import get_algorithm
        from fedsrd_cli.config import PRIVATE_METHOD, SparsifyConfig

        if self.base_sparsity is not None:
            SparsifyConfig(base_sparsity=self.base_sparsity)  # its checks and messages
        self.broadcast_config(0.0, 0)  # its checks and messages for the download settings
        _require(self.server_lr_from >= 1, f"--server-lr-from must be >= 1, got {self.server_lr_from}")
        if self.download_sparsity is not None:
            for name in self.algorithms:
                _require(
                    not get_algorithm(name).dense_download or self.download_sparsity == 0.0,
                    f"--download-sparsity {self.download_sparsity:g}: {name} sends whole factors down;"
                    " run it in a separate simulation",
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
                math.isfinite(self.secure_clip) and 0 < self.secure_clip <= 1e6,
                f"--secure-clip must be in (0, 1e6], got {self.secure_clip}",
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

    def sparsify_config(self, algorithm_base_sparsity: float) -> Any:
        """The upload settings of every client (base sparsity: this run's, else the method's)."""
        from fedsrd_cli.config import SparsifyConfig

        base_sparsity = algorithm_base_sparsity if self.base_sparsity is None else self.base_sparsity
        given = {} if self.value_dtype is None else {"value_dtype": self.value_dtype}
        return SparsifyConfig(base_sparsity=base_sparsity, rescale=self.rescale, **given)

    def broadcast_config(self, download_sparsity: float, seed: int, round_index: int | None = None) -> Any:
        """The coordinator's broadcast settings: this run's where given, else broadcast's defaults
        (download_sparsity: the method's default, used when the run gives none); server_lr
        applies from round server_lr_from on (round_index None: the run's server_lr)."""
        from fedsrd_cli.config import BroadcastConfig

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
        damped = round_index is None or round_index >= self.server_lr_from
        return BroadcastConfig(
            download_sparsity=download_sparsity,
            seed=seed,
            server_lr=self.server_lr if damped else 1.0,
            calibrate_step=self.calibrate_step,
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
        if not self.secure:  # recorded only when on, so runs from before the flag resume
            data.pop("secure")
            data.pop("secure_clip")
        if not self.task_metrics:  # likewise
            data.pop("task_metrics")
            data.pop("metrics_max_new_tokens")
        elif data["metrics_max_new_tokens"] is None:
            data["metrics_max_new_tokens"] = METRICS_MAX_NEW_TOKENS
        if data["demo_model"] in (None, "toy"):  # demo runs recorded before --model existed were toy
            data.pop("demo_model")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass
class RoundRecord:
    """One completed round of one algorithm and seed (round 0: the initial state, no traffic)."""

    round: int
    eval_loss: dict[str, float]
    mean_eval_loss: float
    participants: list[str]
    upload_bytes: float  # mean over the participating clients
    download_bytes: int  # the broadcast, which every client receives
    traffic_per_client: float  # this round, averaged over all clients: sum(uploads) / n + download
    cumulative_traffic_per_client: float
    server_seconds: float  # aggregate + broadcast
    train_loss: float | None
    global_state: str  # relative to RESULTS_DIR
    global_hash: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def initial(
        cls,
        round_index: int,
        eval_loss: dict[str, float],
        mean_eval_loss: float,
        global_state: str,
        global_hash: str,
        extra: dict[str, Any] | None = None,
    ) -> RoundRecord:
        """The record of a run's starting state: evaluated, nothing trained or sent yet."""
        return cls(
            round=round_index,
            eval_loss=eval_loss,
            mean_eval_loss=mean_eval_loss,
            participants=[],
            upload_bytes=0.0,
            download_bytes=0,
            traffic_per_client=0.0,
            cumulative_traffic_per_client=0.0,
            server_seconds=0.0,
            train_loss=None,
            global_state=global_state,
            global_hash=global_hash,
            extra=dict(extra or {}),
        )


def output_is_new(out_dir: Path) -> bool:
    """True for a missing or empty directory; False for an earlier simulate run; else refuse."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return True
    if (out_dir / "config.json").is_file():
        return False
    if [p.name for p in out_dir.iterdir()] == ["assets"] and (out_dir / "assets" / "manifest.json").is_file():
        return True  # a run stopped after writing the demo assets
    raise OutputExistsError(
        f"{out_dir}: exists, is not empty and holds no simulate run (no config.json); choose another --out"
    )


def _write_json(path: Path, data: Any) -> None:
    from fedsrd_cli.files.atomic import write_bytes_atomic

    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), force=True)


def with_recorded_defaults(out_dir: Path, config: SimulateConfig) -> SimulateConfig:
    """`config` with its defaults (None) settled: --metrics-max-new-tokens is what a resumed run
    recorded (256 for runs started before the default became 128), else METRICS_MAX_NEW_TOKENS.
    A value given explicitly stays, and is checked against the record as every setting is."""
    if config.metrics_max_new_tokens is not None:
        return config
    value = METRICS_MAX_NEW_TOKENS
    config_path = out_dir / "config.json"
    if config.task_metrics and config_path.is_file():
        try:
            recorded = json.loads(config_path.read_text())
        except (OSError, ValueError):
            recorded = {}  # _load_results reports it
        if isinstance(recorded, dict) and isinstance(recorded.get("metrics_max_new_tokens"), int):
            value = recorded["metrics_max_new_tokens"]
    return replace(config, metrics_max_new_tokens=value)


def _load_results(out_dir: Path, config: SimulateConfig) -> dict[str, Any]:
    """The recorded results of an earlier run, or a fresh skeleton; refuses another configuration.
    Writes nothing (`_start` writes config.json once every input has been checked)."""
    config_path = out_dir / "config.json"
    if config_path.is_file():
        try:
            recorded = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{config_path}: unreadable ({err})") from None
        new = config.record()
        if recorded != new:
            changed = sorted(k for k in set(recorded) | set(new) if recorded.get(k) != new.get(k))
            raise UsageError(
                f"{out_dir}: holds a run with other settings ({', '.join(changed)} differ:"
                f" recorded {', '.join(f'{k}={recorded.get(k)!r}' for k in changed)});"
                " rerun with the same flags (only --rounds may change) or choose another --out"
            )
        results_path = out_dir / "results.json"
        if results_path.is_file():
            try:
                return json.loads(results_path.read_text())
            except (OSError, ValueError) as err:
                raise ArtifactError(f"{results_path}: unreadable ({err})") from None
    return {"version": RESULTS_VERSION, "config": config.record(), "runs": {}}


def _start(out_dir: Path, config: SimulateConfig) -> None:
    """A new run's config.json (an earlier run's stays as it is)."""
    if not (out_dir / "config.json").is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "config.json", config.record())


def privacy_summary(privacy: dict[str, Any]) -> dict[str, Any]:
    """results.json's epsilons of a round, from the next global state's ledgers: {"privacy":
    {"sites": {client: {"epsilon", "delta", "rounds"}}, "organisation": {...}}} (epsilon None:
    infinite); {} without DP."""

    def brief(ledger: dict[str, Any]) -> dict[str, Any]:
        return {"epsilon": ledger["epsilon"], "delta": ledger["delta"], "rounds": len(ledger["rounds"])}

    out: dict[str, Any] = {}
    if "sites" in privacy:
        out["sites"] = {site: brief(ledger) for site, ledger in sorted(privacy["sites"].items())}
    if "organisation_level" in privacy:
        out["organisation"] = brief(privacy["organisation_level"])
    return {"privacy": out} if out else {}


def _choose(config: SimulateConfig, seed: int, round_index: int) -> list[int]:
    """Indices of the clients that train in this round: all, a seeded choice of --sample-clients
    (the same for every algorithm), or under organisation-level DP a secret Poisson sample."""
    n = len(config.client_data)
    if config.organisation_dp is not None:
        from fedsrd_cli.privacy.randomness import SecretRandom

        return SecretRandom().poisson_sample(n, config.organisation_dp[2])
    if config.participants == n:
        return list(range(n))
    rng = random.Random(f"fedsrd-simulate:{seed}:{round_index}")
    return sorted(rng.sample(range(n), config.participants))


def client_train_seed(seed: int, round_index: int, client_index: int) -> int:
    """The `train-local --seed` a client uses in a round: differs per seed, round and client."""
    return (seed * 1_000_003 + round_index * 1009 + client_index) % 2**32


def simulate(
    config: SimulateConfig,
    out_dir: str | Path,
    on_progress: Callable[[int, int, str], None] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the simulation; write results.json, results.md and traffic_vs_loss.png.

    on_progress(done, total, label) is called after each completed round, counting the
    rounds of every algorithm and seed. threads: torch's thread count; None picks one per idle
    core before every client's training (math.threads.use_threads), as the load may change
    during a long run. Returns a summary: the output paths, the rounds run now and those
    found done.
    """
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.algorithms.diagnostics import mean_update_fidelity, update_error_warning
    from fedsrd_cli.algorithms.protocol import apply_broadcast, default_download_seed, initial_state
    from fedsrd_cli.algorithms.secure import masked_upload, secure_aggregate
    from fedsrd_cli.config import ALIGNABLE_METHODS, AggregateConfig
    from fedsrd_cli.files.adapters import read_local
    from fedsrd_cli.files.artifacts import read_artifact, write_artifact
    from fedsrd_cli.files.model_spec import lora_module_shapes
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.site.data import load_datasets
    from fedsrd_cli.site.evaluation import evaluate
    from fedsrd_cli.site.model import load_base, set_global
    from fedsrd_cli.site.training import (
        TrainConfig,
        check_private_run,
        local_header,
        private_training,
        train_local,
    )
    from fedsrd_cli.trust.agreement import AgreementKey
    from fedsrd_cli.trust.roster import make_roster

    out_dir = Path(out_dir)
    config = with_recorded_defaults(out_dir, config)
    results = _load_results(out_dir, config)
    runs: dict[str, Any] = results.setdefault("runs", {})
    seeds = config.seed_values()
    total = len(config.algorithms) * len(seeds) * config.rounds
    done_before = sum(
        min(len(runs.get(a, {}).get(str(s), [])) - 1, config.rounds)
        for a in config.algorithms
        for s in seeds
        if runs.get(a, {}).get(str(s))
    )
    if done_before >= total:
        return _finish(out_dir, config, results, ran=[], done_before=done_before)

    agreement: dict[str, Any] = {}
    published: dict[str, bytes] = {}
    if config.secure:  # the clients' X25519 keys, made for this run (secure/agreement.py)
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        for client in config.client_ids:
            agreement[client] = AgreementKey(client, X25519PrivateKey.generate())
            published[client] = agreement[client].public
    use_threads(threads)
    # Every input is read and checked before anything is written.
    client_sets = [load_datasets([path]) for path in config.client_data]
    eval_sets = load_datasets(list(config.eval_data))
    if config.task_metrics:
        from fedsrd_cli.site.task_eval import file_kind

        kinds = {name: file_kind(ds) for name, ds in zip(config.eval_names, eval_sets, strict=True)}
        if all(kind is None for kind in kinds.values()):
            raise UsageError(
                "--metrics: no --eval-data file has task records (the real-task suite's files do:"
                " `fedsrd demo-assets --suite real`)"
            )
    lora, module_shapes = lora_module_shapes(config.base, config.targets, config.rank, config.alpha)
    base = load_base(config.base, config.device)
    _start(out_dir, config)
    ran: list[dict[str, Any]] = []
    done = done_before
    # Every start has B = 0, so its model is exactly the base model whatever the seed's A: round 0
    # is scored once per run, not once per seed (on a CPU the real-task scores take minutes).
    initial_eval: dict[str, Any] = {}

    def scores(state_path: Path) -> tuple[dict[str, float], float, dict[str, Any]]:
        """(eval loss per file, their mean, the round's task scores for its record's extra)."""
        state = read_artifact(state_path, kind="state")
        set_global(base, state)
        metrics = evaluate(
            base,
            eval_sets,
            config.eval_batch_size,
            config.max_length,
            tasks=config.task_metrics,
            task_max_new_tokens=config.metrics_max_new_tokens,
        )
        named = dict(zip(config.eval_names, metrics["files"].values(), strict=True))
        losses = {name: float(m["loss"]) for name, m in named.items()}
        tasks: dict[str, Any] = {}
        if config.task_metrics:
            tasks["task_scores"] = {
                name: float(m["task"]["score"]) for name, m in named.items() if "task" in m
            }
            tasks["mean_task_score"] = float(metrics["mean"]["task_score"])
            results["tasks"] = {
                name: {
                    "kind": m["task"]["kind"],
                    "metric": m["task"]["metric"],
                    "examples": m["task"]["examples"],
                }
                for name, m in named.items()
                if "task" in m
            }
        return losses, float(metrics["mean"]["loss"]), tasks

    for name in config.algorithms:
        algorithm = get_algorithm(name)
        sparsify_config = config.sparsify_config(algorithm.default_base_sparsity)
        for seed in seeds:
            records = runs.setdefault(name, {}).setdefault(str(seed), [])
            run_dir = out_dir / "work" / name / f"seed-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if not records:
                start_path = run_dir / "global-r0.safetensors"
                payload = initial_state(module_shapes, lora, seed, base.fingerprint)
                head = write_artifact(start_path, payload.header, payload.tensors, force=True)
                if not initial_eval:
                    initial_eval.update(zip(("eval_loss", "mean", "tasks"), scores(start_path), strict=True))
                records.append(
                    asdict(
                        RoundRecord.initial(
                            0,
                            initial_eval["eval_loss"],
                            initial_eval["mean"],
                            str(start_path.relative_to(out_dir)),
                            head.content_hash,
                            initial_eval["tasks"],
                        )
                    )
                )
                _write_json(out_dir / "results.json", results)
            while len(records) - 1 < config.rounds:
                last = records[-1]
                round_index = last["round"] + 1
                state_path = out_dir / last["global_state"]
                global_state = read_artifact(state_path, kind="state")
                if global_state.header.content_hash != last["global_hash"]:
                    raise MismatchError(
                        f"{state_path}: is not the global state results.json recorded for {name},"
                        f" seed {seed}, round {last['round']}; the run directory was changed"
                    )
                round_dir = run_dir / f"round-{round_index}"
                round_dir.mkdir(exist_ok=True)
                chosen = _choose(config, seed, round_index)
                only = algorithm.trained_factor(round_index)  # None: clients train both factors
                roster = None
                if config.secure:  # every chosen client masks for every other one
                    head = global_state.header
                    names = [config.client_ids[i] for i in chosen]
                    roster = make_roster(head.content_hash, round_index, names, 1, config.secure_clip)
                uploads, upload_sizes, train_losses = [], [], []
                trained: list[dict[str, Any]] = []  # every chosen client's factors: the exact mean update
                for index in chosen:
                    client = config.client_ids[index]
                    train_config = TrainConfig(
                        steps=config.local_steps,
                        lr=config.lr,
                        batch_size=config.batch_size,
                        max_length=config.max_length,
                        seed=client_train_seed(seed, round_index, index),
                        device=config.device,
                        prox_mu=config.prox_mu if name == "fedprox" else 0.0,
                    ).training_only(only)
                    ledger = None
                    if config.record_dp is not None:
                        train_config, ledger = private_training(
                            config.record_dp,
                            global_state,
                            client,
                            client_sets[index],
                            train_config,
                        )
                    use_threads(threads)
                    tensors, stats = train_local(base, global_state, client_sets[index], train_config)
                    if ledger is not None:
                        check_private_run(stats, ledger)
                    train_losses.append(stats.final_loss)
                    trained.append(tensors)
                    info = {"train": {**asdict(train_config), "final_loss": stats.final_loss}}
                    local_path = round_dir / f"local-{client}.safetensors"
                    write_artifact(
                        local_path,
                        local_header(global_state, stats.samples, client, info, ledger),
                        tensors,
                        force=True,
                    )
                    if roster is None:
                        upload = algorithm.upload(
                            global_state, read_local(local_path), client, stats.samples, sparsify_config
                        )
                    else:  # --secure: the client's masked projection for this round's roster
                        upload = masked_upload(
                            global_state, read_local(local_path), client, stats.samples, roster,
                            agreement[client], published,
                        )  # fmt: skip
                    upload_path = round_dir / f"upload-{client}.safetensors"
                    write_artifact(upload_path, upload.header, upload.tensors, force=True)
                    local_path.unlink()
                    uploads.append(read_artifact(upload_path, kind=upload.header.kind))
                    upload_sizes.append(upload_path.stat().st_size)

                aggregate_config = AggregateConfig(
                    method=name, align=config.align and name in ALIGNABLE_METHODS
                )
                if config.organisation_dp is not None:
                    aggregate_config = replace(
                        aggregate_config, organisation_dp=config.organisation_settings(len(chosen))
                    )
                start = time.perf_counter()
                if roster is None:
                    aggregate = algorithm.aggregate(global_state, uploads, aggregate_config)
                else:
                    aggregate = secure_aggregate(global_state, uploads, roster, aggregate_config)
                server = time.perf_counter() - start
                aggregate_path = round_dir / "aggregate.safetensors"
                write_artifact(aggregate_path, aggregate.header, aggregate.tensors, force=True)
                aggregate_file = read_artifact(aggregate_path, kind="aggregate")
                broadcast_config = config.broadcast_config(
                    algorithm.default_download_sparsity,
                    default_download_seed(global_state, aggregate_file),
                    round_index,
                )
                start = time.perf_counter()
                broadcast, next_state = algorithm.broadcast(global_state, aggregate_file, broadcast_config)
                server += time.perf_counter() - start
                broadcast_path = round_dir / "broadcast.safetensors"
                write_artifact(broadcast_path, broadcast.header, broadcast.tensors, force=True)
                # What every client does with the broadcast; it checks the coordinator's result hash.
                followed = apply_broadcast(global_state, read_artifact(broadcast_path, kind="broadcast"))
                next_path = run_dir / f"global-r{round_index}.safetensors"
                next_head = write_artifact(next_path, next_state.header, next_state.tensors, force=True)
                if next_head.content_hash != broadcast.header.result_hash:
                    raise MismatchError(f"{next_path}: differs from the state its broadcast announces")
                del followed

                weights = [c["weight"] for c in aggregate_file.header.info["clients"]]
                fidelity = (
                    {}
                    if roster is not None or config.organisation_dp is not None  # W is not the mean of D_i
                    else {
                        "mean_update_fidelity": mean_update_fidelity(
                            global_state, trained, weights, aggregate_file, next_state.tensors
                        )
                    }
                )
                upload_figures = aggregate_file.header.info.get("upload_fidelity")
                if upload_figures:
                    fidelity["upload_fidelity"] = {k: upload_figures[k] for k in ("norm_ratio", "cosine")}
                del trained
                losses, mean_loss, task_scores = scores(next_path)
                warning = update_error_warning(broadcast.header)  # what `broadcast` would print
                download = broadcast_path.stat().st_size
                n = len(config.client_data)
                traffic = sum(upload_sizes) / n + download
                records.append(
                    asdict(
                        RoundRecord(
                            round=round_index,
                            eval_loss=losses,
                            mean_eval_loss=mean_loss,
                            participants=[config.client_ids[i] for i in chosen],
                            upload_bytes=sum(upload_sizes) / max(len(upload_sizes), 1),
                            download_bytes=download,
                            traffic_per_client=traffic,
                            cumulative_traffic_per_client=last["cumulative_traffic_per_client"] + traffic,
                            server_seconds=server,
                            train_loss=sum(train_losses) / len(train_losses) if train_losses else None,
                            global_state=str(next_path.relative_to(out_dir)),
                            global_hash=next_head.content_hash,
                            extra={
                                "download_sparsity": broadcast_config.download_sparsity,
                                "update_error": broadcast.header.info.get("update_error", {}).get("overall"),
                                "update_step": broadcast.header.info["update_step"]["max"],
                            }
                            | (
                                {"one_factor_residual": broadcast.header.info["one_factor_residual"]}
                                if "one_factor_residual" in broadcast.header.info
                                else {}
                            )
                            | fidelity
                            | ({"warning": warning} if warning else {})
                            | privacy_summary(next_state.header.privacy)
                            | ({"prox_mu": config.prox_mu} if name == "fedprox" else {})
                            | ({"trained_factor": only} if only else {})
                            | task_scores,
                        )
                    )
                )
                _write_json(out_dir / "results.json", results)
                ran.append({"algorithm": name, "seed": seed, "round": round_index})
                done += 1
                if on_progress is not None:
                    label = f"{name} seed {seed} round {round_index}: loss {mean_loss:.4f}"
                    label += task_label(task_scores, results.get("tasks", {}))
                    on_progress(done, total, label + (f"; warning: {warning}" if warning else ""))
    return _finish(out_dir, config, results, ran, done_before)


def _finish(
    out_dir: Path,
    config: SimulateConfig,
    results: dict[str, Any],
    ran: list[dict[str, Any]],
    done_before: int,
) -> dict[str, Any]:
    table = summary_table(config, results)
    from fedsrd_cli.files.atomic import write_bytes_atomic

    write_bytes_atomic(out_dir / "results.md", render_markdown(config, table).encode("utf-8"), force=True)
    plot_traffic_vs_loss(config, results, out_dir / "traffic_vs_loss.png")
    return {
        "out": str(out_dir),
        "results": str(out_dir / "results.json"),
        "table": str(out_dir / "results.md"),
        "plot": str(out_dir / "traffic_vs_loss.png"),
        "rounds_run_now": ran,
        "rounds_already_done": done_before,
        "summary": table,
    }


def _rounds(config: SimulateConfig, results: dict[str, Any], name: str) -> list[list[dict[str, Any]]]:
    """Per seed, the records of rounds 0..config.rounds of one algorithm."""
    per_seed = results["runs"].get(name, {})
    return [per_seed[str(s)][: config.rounds + 1] for s in config.seed_values() if str(s) in per_seed]


def _spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_table(config: SimulateConfig, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per algorithm: final-round eval losses, traffic and server time per round, over seeds.

    Traffic per round per participating client = mean upload + download, averaged over rounds.
    """
    rows = []
    for name in config.algorithms:
        seeds = _rounds(config, results, name)
        if not seeds or any(len(r) < config.rounds + 1 for r in seeds):
            continue
        row: dict[str, Any] = {"algorithm": name, "round": config.rounds, "seeds": len(seeds)}
        row["eval_loss"] = {
            domain: _spread([r[-1]["eval_loss"][domain] for r in seeds]) for domain in config.eval_names
        }
        row["mean_eval_loss"] = _spread([r[-1]["mean_eval_loss"] for r in seeds])
        row["upload_mb_per_round"] = _spread(
            [statistics.fmean(x["upload_bytes"] for x in r[1:]) / MB for r in seeds]
        )
        row["download_mb_per_round"] = _spread(
            [statistics.fmean(x["download_bytes"] for x in r[1:]) / MB for r in seeds]
        )
        row["traffic_mb_per_round"] = _spread(
            [statistics.fmean(x["upload_bytes"] + x["download_bytes"] for x in r[1:]) / MB for r in seeds]
        )
        row["server_seconds_per_round"] = _spread(
            [statistics.fmean(x["server_seconds"] for x in r[1:]) for r in seeds]
        )
        if config.task_metrics:
            names = list(seeds[0][-1]["extra"]["task_scores"])
            row["task_score"] = {
                domain: _spread([r[-1]["extra"]["task_scores"][domain] for r in seeds]) for domain in names
            }
            row["mean_task_score"] = _spread([r[-1]["extra"]["mean_task_score"] for r in seeds])
            row["task_scores_per_round"] = [
                {
                    "round": t,
                    **{d: statistics.fmean(r[t]["extra"]["task_scores"][d] for r in seeds) for d in names},
                    "mean": statistics.fmean(r[t]["extra"]["mean_task_score"] for r in seeds),
                }
                for t in range(config.rounds + 1)
            ]
        rows.append(row)
    return rows


def task_label(task_scores: dict[str, Any], tasks: dict[str, Any]) -> str:
    """ ", math exact_match 12.0%, law accuracy 30.0%, mean 21.0%" for a progress line; "" without."""
    if not task_scores:
        return ""
    parts = [
        f"{name} {tasks.get(name, {}).get('metric', 'score')} {score:.1%}"
        for name, score in task_scores["task_scores"].items()
    ]
    return ", " + ", ".join([*parts, f"mean {task_scores['mean_task_score']:.1%}"])


def _cell(pair: tuple[float, float], digits: int, seeds: int) -> str:
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def render_markdown(config: SimulateConfig, table: list[dict[str, Any]]) -> str:
    seeds = config.seeds
    lines = [
        f"# fedsrd simulate: round {config.rounds}",
        "",
        f"{len(config.client_data)} clients, {config.participants} training per round;"
        f" rank {config.rank}, alpha {config.alpha:g}; {config.local_steps} local steps, lr {config.lr:g},"
        f" batch {config.batch_size}; seeds {', '.join(map(str, config.seed_values()))}"
        + (" (mean ± std)" if seeds > 1 else "")
        + (f"; upload base sparsity {config.base_sparsity:g}" if config.base_sparsity is not None else "")
        + ("" if config.rescale else "; uploads not rescaled")
        + ("" if config.download_sparsity is None else f"; download sparsity {config.download_sparsity:g}")
        + ("" if config.download_value_dtype is None else f"; download values {config.download_value_dtype}")
        + ("; aggregates aligned to the clients' factors" if config.align else "")
        + (f"; factor choice {config.factor_choice}" if config.factor_choice is not None else "")
        + (f"; download fit {config.download_fit}" if config.download_fit is not None else "")
        + ".",
        "",
        "Eval loss (response tokens) of the global state after the final round. Traffic: bytes of the",
        "files one participating client sends (upload) and receives (broadcast) per round, in MB",
        "(2^20 bytes). Server: aggregate + broadcast seconds per round.",
        "",
    ]
    head = ["algorithm", *config.eval_names, "mean", "up MB", "down MB", "MB / round", "server s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for row in table:
        cells = [row["algorithm"]]
        cells += [_cell(row["eval_loss"][d], 4, seeds) for d in config.eval_names]
        cells.append(_cell(row["mean_eval_loss"], 4, seeds))
        cells += [
            _cell(row[k], 4, seeds)
            for k in ("upload_mb_per_round", "download_mb_per_round", "traffic_mb_per_round")
        ]
        cells.append(_cell(row["server_seconds_per_round"], 3, seeds))
        lines.append("| " + " | ".join(cells) + " |")
    if config.task_metrics and table:
        lines += _task_markdown(config, table)
    return "\n".join(lines) + "\n"


def _task_markdown(config: SimulateConfig, table: list[dict[str, Any]]) -> list[str]:
    """results.md's task scores: the final round's per eval file (as a percentage), and the
    mean over seeds of every round's scores per algorithm, round 0 being the base model."""
    seeds = config.seeds
    names = list(table[0]["task_score"])
    lines = [
        "",
        f"## Task scores, round {config.rounds}",
        "",
        "Accuracy (multiple choice, by option log-likelihood), exact match (GSM8K final answer) or",
        "pass@1 (MBPP, sandboxed) of the global state on each eval file's task records, in %.",
        "",
        "| " + " | ".join(["algorithm", *names, "mean"]) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(names) + 1)) + "|",
    ]
    for row in table:
        cells = [_cell(tuple(100 * v for v in row["task_score"][d]), 1, seeds) for d in names]
        cells.append(_cell(tuple(100 * v for v in row["mean_task_score"]), 1, seeds))
        lines.append("| " + " | ".join([row["algorithm"], *cells]) + " |")
    lines += ["", "## Task scores per round (round 0: the base model)", ""]
    for row in table:
        lines += [
            f"{row['algorithm']}" + (" (mean over seeds)" if seeds > 1 else "") + ":",
            "",
            "| " + " | ".join(["round", *names, "mean"]) + " |",
            "|" + "|".join(["---:"] * (len(names) + 2)) + "|",
        ]
        for point in row["task_scores_per_round"]:
            cells = [f"{100 * point[d]:.1f}" for d in [*names, "mean"]]
            lines.append("| " + " | ".join([str(point["round"]), *cells]) + " |")
        lines.append("")
    return lines


def plot_traffic_vs_loss(config: SimulateConfig, results: dict[str, Any], path: Path) -> None:
    """Mean eval loss against cumulative traffic per client (MB), one line per algorithm,
    with a band of +- one std over seeds."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from fedsrd_cli.files.atomic import write_bytes_atomic

    figure = Figure(figsize=(12, 4.5) if config.task_metrics else (7, 4.5), dpi=120)
    axes = figure.add_subplot(1, 2, 1) if config.task_metrics else figure.add_subplot()
    task_axes = figure.add_subplot(1, 2, 2) if config.task_metrics else None
    for name in config.algorithms:
        seeds = _rounds(config, results, name)
        if not seeds:
            continue
        length = min(len(r) for r in seeds)
        xs = [
            statistics.fmean(r[t]["cumulative_traffic_per_client"] for r in seeds) / MB for t in range(length)
        ]
        spreads = [_spread([r[t]["mean_eval_loss"] for r in seeds]) for t in range(length)]
        ys = [m for m, _ in spreads]
        (line,) = axes.plot(xs, ys, marker="o", markersize=3, label=name)
        if len(seeds) > 1:
            axes.fill_between(
                xs,
                [m - s for m, s in spreads],
                [m + s for m, s in spreads],
                color=line.get_color(),
                alpha=0.2,
            )
        if task_axes is not None:
            task = [_spread([100 * r[t]["extra"]["mean_task_score"] for r in seeds]) for t in range(length)]
            task_axes.plot(
                xs, [m for m, _ in task], marker="o", markersize=3, label=name, color=line.get_color()
            )
    if task_axes is not None:
        task_axes.set_xlabel("cumulative traffic per client (MB)")
        task_axes.set_ylabel("mean task score (%)")
        task_axes.set_title("task score vs traffic (round 0: the base model)")
        task_axes.grid(True, alpha=0.3)
        task_axes.legend()
    axes.set_xlabel("cumulative traffic per client (MB)")
    axes.set_ylabel("mean eval loss")
    axes.set_title(f"eval loss vs traffic ({config.seeds} seed{'s' if config.seeds > 1 else ''})")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue(), force=True)
