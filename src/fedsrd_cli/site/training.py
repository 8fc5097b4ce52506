"""Local training on a loaded model (model.py): plain steps or DP-SGD, from the state loaded.

`TrainConfig` holds a run's settings (its length, learning rate, batches, a frozen factor,
FedProx, DP-SGD). `train_local` puts the global state into the model (model.set_global),
trains its LoRA factors and returns fp32 factors under the global state's tensor names, with
`TrainStats`. The steps are `_plain_steps` (a seeded shuffle, the token-weighted loss) or
`_private_steps` (DP-SGD, privacy.dpsgd); `_check_converging` stops a run whose loss or
factors become NaN or Inf. Under torchrun (`ranks`, site/distributed.py) the plain steps run
data parallel: each process takes its share of every step's examples and the gradients are
summed, so the steps are those of one process.

Around a DP-SGD run: `private_training` plans the round before any training (its noise
multiplier and the site's ledger after it), `check_private_run` checks that the run did what
that ledger says, and `local_header` is the header of the state `train-local` writes.

Nothing here loads a model, evaluates or generates (transformers and peft: model.py).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from fedsrd_cli.config import _require
from fedsrd_cli.errors import DataError, MismatchError, TrainingDivergedError, UsageError
from fedsrd_cli.files.artifacts import Artifact, Header
from fedsrd_cli.files.safetensors_io import short
from fedsrd_cli.math.lowrank import scheduled_factor
from fedsrd_cli.privacy.budget import RecordDp, history_of, plan_round
from fedsrd_cli.privacy.dpsgd import DpSgdConfig
from fedsrd_cli.privacy.ledger import RECORD_LEVEL, Ledger, read_privacy
from fedsrd_cli.site import data as data_mod
from fedsrd_cli.site.distributed import Ranks, step_share, sum_gradients
from fedsrd_cli.site.model import (
    DEVICES,
    DTYPES,
    BaseModel,
    current_factors,
    example_losses,
    lora_parameters,
    set_global,
    token_losses,
)
from fedsrd_cli.site.quantization import NONE

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the largest learning rate AdamW can apply


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings. Exactly one of `steps` / `epochs` decides the length (default: 1 epoch).

    steps: optimizer steps; each takes batch_size * grad_accum examples.
    prox_mu: FedProx weight, loss += prox_mu / 2 * ||theta - theta_G||^2 over the trained factors.
    dp: DP-SGD settings (privacy.dpsgd): batches are then Poisson samples of expected size
        batch_size * grad_accum out of every example given, each record's gradient clipped to
        dp.max_grad_norm, with Gaussian noise; None trains without DP.
    freeze_a: keep every lora_A at the global value and train only lora_B (FFA-LoRA, and the
        odd rounds of `train-local --alternate`).
    freeze_b: keep every lora_B at the global value and train only lora_A (the even rounds of
        `train-local --alternate`).
    site_rank: `train-local --rank r_i`: train only the first r_i rank components of every
        module (lora_B's first r_i columns, lora_A's first r_i rows); the others stay at the
        global state's values (docs/algorithms.md, "A rank per site"). None trains all r.
    """

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    prox_mu: float = 0.0
    freeze_a: bool = False
    freeze_b: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dp: DpSgdConfig | None = None
    site_rank: int | None = None

    def __post_init__(self) -> None:
        _require(self.steps is None or self.epochs is None, "give --steps or --epochs, not both")
        _require(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        _require(
            self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0),
            f"--epochs must be > 0, got {self.epochs}",
        )
        _require(math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _require(self.lr <= FLOAT32_MAX, f"--lr must be at most {FLOAT32_MAX:.4g} (float32), got {self.lr:g}")
        _require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        _require(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        _require(0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}")
        _require(self.device in DEVICES, f"--device must be one of {list(DEVICES)}")
        _require(self.dtype in DTYPES, f"--dtype must be one of {list(DTYPES)}")
        _require(
            math.isfinite(self.prox_mu) and self.prox_mu >= 0, f"--prox-mu must be >= 0, got {self.prox_mu}"
        )
        _require(
            not (self.freeze_a and self.freeze_b), "freezing both lora_A and lora_B leaves nothing to train"
        )
        _require(self.weight_decay >= 0, "weight decay must be >= 0")
        _require(self.site_rank is None or self.site_rank >= 1, f"--rank must be >= 1, got {self.site_rank}")
        _require(self.max_grad_norm > 0, "max grad norm must be > 0")
        _require(
            self.dp is None or not self.gradient_checkpointing,
            "--gradient-checkpointing cannot be combined with DP-SGD (per-example gradients are"
            " taken from the forward pass it would recompute)",
        )

    def training_only(self, factor: str | None) -> TrainConfig:
        """Train only lora_`factor` ("A" or "B") and freeze the other; None trains both
        (what Algorithm.trained_factor returns for a round)."""
        return replace(self, freeze_a=factor == "B", freeze_b=factor == "A")

    def alternating(self, round_index: int) -> TrainConfig:
        """`train-local --alternate`: train only the factor round t's one-factor broadcast
        updates (math.lowrank.scheduled_factor: lora_B when t is odd, lora_A when t is even)."""
        return self.training_only(scheduled_factor(round_index))

    def total_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(num_examples / (self.batch_size * self.grad_accum))
        return max(1, math.ceil(per_epoch * (self.epochs if self.epochs is not None else 1.0)))


@dataclass
class TrainStats:
    """What one local training run did; `log` holds one record per optimizer step."""

    steps: int
    samples: int
    tokens: int
    seconds: float
    final_loss: float
    mean_loss: float
    first_loss: float
    log: list[dict[str, Any]] = field(default_factory=list)
    dp: dict[str, Any] | None = None  # DP-SGD: what ran (noise multiplier, clip, sample rate, ...)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("log")
        if data["dp"] is None:
            data.pop("dp")
        return data


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _batches(num: int, batch: int, generator: torch.Generator):
    """Endless stream of index lists: a fresh permutation each epoch."""
    while True:
        order = torch.randperm(num, generator=generator).tolist()
        for start in range(0, num, batch):
            yield order[start : start + batch]


def train_local(
    base: BaseModel,
    global_state: Artifact,
    datasets: Sequence[data_mod.Dataset],
    config: TrainConfig,
    on_step: Callable[[int, int, float | None, float], None] | None = None,
    ranks: Ranks | None = None,
) -> tuple[dict[str, torch.Tensor], TrainStats]:
    """Train the LoRA factors of `global_state` on the examples of `datasets`.

    Returns fp32 factors under exactly the global state's names and shapes, and the stats.
    on_step(step, total_steps, loss, tokens_per_second) is called after each optimizer step.
    Without DP: loss per step = sum of token losses over the step's micro-batches / their label
    tokens (+ prox_mu / 2 * ||theta - theta_G||^2); batches are a seeded shuffle, so a run is
    deterministic on CPU for a given seed. With config.dp: DP-SGD (privacy.dpsgd) over every
    example of the data files (the population whose records the guarantee covers), loss per
    step = the mean over the sampled records of each record's mean token loss (None when
    Poisson sampling took none); sampling and noise are secret, so a run is not reproducible.
    ranks: this process's place among the site's torchrun processes (site/distributed.py), which
    all call train_local alike and return the same factors; None for one process. Not with DP.
    """
    if ranks is not None and config.dp is not None:
        raise ValueError("DP-SGD runs in one process (site/distributed.py: refuse_distributed)")
    if base.fingerprint != global_state.header.base_fingerprint:
        raise MismatchError(
            f"{base.path}: is another base model (fingerprint {short(base.fingerprint)}) than"
            f" {global_state.path} was made for ({short(global_state.header.base_fingerprint)})"
        )
    check_site_rank(config.site_rank, global_state, config.dp is not None)
    _seed_everything(config.seed)
    set_global(base, global_state)
    examples = [ex for ds in datasets for ex in ds.examples]
    encoded = [data_mod.encode(base.tokenizer, ex, config.max_length) for ex in examples]
    usable = [pair for pair in encoded if any(label != data_mod.IGNORE_INDEX for label in pair[1][1:])]
    if not usable:
        raise DataError("no example has a response token within --max-length; nothing to train on")
    model = base.model
    params = lora_parameters(model)
    trained: dict[str, torch.nn.Parameter] = {}
    for name, param in params.items():
        train_it = not ((config.freeze_a and ".lora_A." in name) or (config.freeze_b and ".lora_B." in name))
        param.requires_grad_(train_it)
        if train_it:
            trained[name] = param
    optimizer = torch.optim.AdamW(trained.values(), lr=config.lr, weight_decay=config.weight_decay)
    handles = []  # hooks of a site rank, removed after training (simulate reuses the model)
    if config.site_rank is not None and config.site_rank < global_state.header.lora.rank:
        handles = _train_first_components(trained, config.site_rank, optimizer)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    population = encoded if config.dp is not None else usable
    total = config.total_steps(len(population))
    model.train()
    start = time.monotonic()
    try:
        if config.dp is not None:
            log, dp_record = _private_steps(base, population, trained, optimizer, config, total, on_step)
        else:
            log, dp_record = _plain_steps(base, population, trained, optimizer, config, total, on_step, ranks)
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
        for param in params.values():
            param.requires_grad_(False)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
    factors = current_factors(base)
    for name, shape in global_state.shapes.items():
        if tuple(factors[name].shape) != tuple(shape):
            raise MismatchError(f"trained {name} has shape {list(factors[name].shape)}, expected {shape}")
    losses = [r["loss"] for r in log if r["loss"] is not None] or [math.nan]
    stats = TrainStats(
        steps=total,
        samples=len(examples),
        tokens=sum(r["tokens"] for r in log),
        seconds=round(time.monotonic() - start, 3),
        final_loss=losses[-1],
        mean_loss=sum(losses) / len(losses),
        first_loss=losses[0],
        log=log,
        dp=dp_record,
    )
    return {name: factors[name] for name in global_state.names}, stats


def check_site_rank(site_rank: int | None, global_state: Artifact, private: bool) -> None:
    """UsageError for a site rank above the global rank, or below it with DP-SGD (`private`;
    its per-example clipping would have to leave the untrained components out: not built)."""
    rank = global_state.header.lora.rank
    if site_rank is None or site_rank == rank:
        return
    if site_rank > rank:
        raise UsageError(
            f"--rank {site_rank} is above the global state's rank {rank}: a site may train at"
            f" most the global rank (give --rank {rank} or less)"
        )
    if private:
        raise UsageError(
            f"--rank {site_rank} below the global rank {rank} is not supported with DP-SGD yet:"
            " train the global rank (leave out --rank) or train without --dp-*"
        )


def _train_first_components(
    trained: dict[str, torch.nn.Parameter], site_rank: int, optimizer: torch.optim.Optimizer
) -> list:
    """Train only rank components 0..site_rank-1: lora_A (r, d_in) rows and lora_B (d_out, r)
    columns past site_rank get zero gradients (so clipping and AdamW see a rank-r_i adapter),
    and after every optimizer step they are put back to their starting values (so weight decay
    cannot move them either)."""
    frozen: list[tuple[torch.nn.Parameter, tuple[slice, slice], torch.Tensor]] = []
    handles = []
    for name, param in trained.items():
        if ".lora_A." in name:
            index = (slice(site_rank, None), slice(None))  # rows r_i.. of (r, d_in)
        elif ".lora_B." in name:
            index = (slice(None), slice(site_rank, None))  # columns r_i.. of (d_out, r)
        else:
            continue
        keep = torch.ones_like(param)
        keep[index] = 0.0
        handles.append(param.register_hook(lambda grad, keep=keep: grad * keep))
        frozen.append((param, index, param.detach()[index].clone()))

    def restore(_optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for param, index, start in frozen:
                param[index] = start

    handles.append(optimizer.register_step_post_hook(restore))
    return handles


StepCallback = Callable[[int, int, float | None, float], None] | None


def _plain_steps(
    base: BaseModel,
    usable: list,
    trained: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    total: int,
    on_step: StepCallback,
    ranks: Ranks | None = None,
) -> tuple[list[dict[str, Any]], None]:
    """Seeded shuffled batches, token-weighted loss, the batch gradient clipped to max_grad_norm.
    With `ranks`, this process runs its share of each step and the ranks' gradients are summed."""
    pad = data_mod.pad_id(base.tokenizer)
    anchor = {name: p.detach().clone() for name, p in trained.items()} if config.prox_mu > 0 else {}
    generator = torch.Generator().manual_seed(config.seed)
    stream = _batches(len(usable), config.batch_size, generator)
    log: list[dict[str, Any]] = []
    for step in range(1, total + 1):
        step_start = time.monotonic()
        micro = [next(stream) for _ in range(config.grad_accum)]
        step_tokens = sum(_label_tokens(usable[i]) for batch in micro for i in batch)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for indices in step_share(micro, config.batch_size, ranks):
            batch = {
                k: v.to(base.device) for k, v in data_mod.collate([usable[i] for i in indices], pad).items()
            }
            loss, _count = token_losses(base.model, batch)
            (loss / step_tokens).backward()
            loss_sum += float(loss.detach())
        (loss_sum,) = sum_gradients(list(trained.values()), [loss_sum], ranks)
        prox = 0.0
        if config.prox_mu > 0:
            prox_term = sum(((p - anchor[n]) ** 2).sum() for n, p in trained.items())
            (config.prox_mu / 2 * prox_term).backward()
            prox = float(config.prox_mu / 2 * prox_term.detach())
        torch.nn.utils.clip_grad_norm_(list(trained.values()), config.max_grad_norm)
        optimizer.step()
        step_loss = loss_sum / step_tokens
        _check_converging(step, total, step_loss, trained, config.lr, base.lora.scaling)
        elapsed = time.monotonic() - step_start
        record = {"step": step, "loss": step_loss, "tokens": step_tokens, "seconds": round(elapsed, 4)}
        if config.prox_mu > 0:
            record["prox"] = prox
        log.append(record)
        if on_step is not None:
            on_step(step, total, step_loss, step_tokens / max(elapsed, 1e-9))
    return log, None


def _label_tokens(pair: tuple[list[int], list[int]]) -> int:
    """The positions of an encoded example whose next token is a label (token_losses counts them)."""
    return sum(label != data_mod.IGNORE_INDEX for label in pair[1][1:])


def _private_steps(
    base: BaseModel,
    population: list,
    trained: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    total: int,
    on_step: StepCallback,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """DP-SGD (privacy.dpsgd): Poisson batches of expected size batch_size * grad_accum from the
    whole population, processed in micro-batches of batch_size; the proximal term's gradient,
    which depends on no record, is added after the noise."""
    from fedsrd_cli.privacy.dpsgd import PrivateSteps

    assert config.dp is not None
    pad = data_mod.pad_id(base.tokenizer)
    anchor = {name: p.detach().clone() for name, p in trained.items()} if config.prox_mu > 0 else {}
    expected = config.batch_size * config.grad_accum
    private = PrivateSteps(base.model, trained, config.dp, expected, len(population))
    stream = private.batches()
    log: list[dict[str, Any]] = []
    try:
        with warnings.catch_warnings():
            # torch says the hooks Opacus puts on frozen-input modules fire for outputs only: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for step in range(1, total + 1):
                step_start = time.monotonic()
                indices = next(stream)
                optimizer.zero_grad(set_to_none=True)
                loss_sum, step_tokens = 0.0, 0
                for first in range(0, len(indices), config.batch_size):
                    chunk = indices[first : first + config.batch_size]
                    batch = data_mod.collate([population[i] for i in chunk], pad)
                    batch = {k: v.to(base.device) for k, v in batch.items()}
                    losses = example_losses(base.model, batch)  # (n,)
                    losses.sum().backward()
                    private.accumulate(len(chunk))
                    loss_sum += float(losses.detach().sum())
                    step_tokens += int((batch["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum())
                private.noisy_gradient()
                if config.prox_mu > 0:
                    with torch.no_grad():
                        for name, param in trained.items():
                            param.grad += config.prox_mu * (param - anchor[name])
                optimizer.step()
                step_loss = loss_sum / len(indices) if indices else None
                seen = 0.0 if step_loss is None else step_loss
                _check_converging(step, total, seen, trained, config.lr, base.lora.scaling)
                elapsed = time.monotonic() - step_start
                log.append(
                    {
                        "step": step,
                        "loss": step_loss,
                        "sampled": len(indices),
                        "tokens": step_tokens,
                        "seconds": round(elapsed, 4),
                    }
                )
                if on_step is not None:
                    on_step(step, total, step_loss, step_tokens / max(elapsed, 1e-9))
    finally:
        private.close()
    record = {
        "noise_multiplier": config.dp.noise_multiplier,
        "max_grad_norm": config.dp.max_grad_norm,
        "sample_rate": private.rate,
        "expected_batch": expected,
        "population": len(population),
        "steps": total,
    }
    return log, record


# A LoRA scale alpha / r above this, not the learning rate, is named as the likely cause of a
# divergence (alpha / r of 0.5 to 4 is usual; the factors' product is multiplied by it).
LARGE_LORA_SCALE = 1e3


def _check_converging(
    step: int, total: int, loss: float, trained: dict[str, torch.nn.Parameter], lr: float, scale: float
) -> None:
    """TrainingDivergedError (exit 6) once the loss or a trained factor is NaN or Inf; the message
    names the LoRA scale alpha / r when that is large enough to be the cause."""
    if math.isfinite(loss):
        with torch.no_grad():
            broken = next((name for name, p in trained.items() if not bool(torch.isfinite(p).all())), None)
        if broken is None:
            return
        what = f"{broken} became NaN or Inf"
    else:
        what = f"loss {loss}"
    if scale > LARGE_LORA_SCALE:
        raise TrainingDivergedError(
            f"training diverged at step {step} of {total} ({what}): the LoRA scale alpha / r = {scale:.3g}"
            " multiplies every update, so a lower --lr cannot help; make a global state with a smaller"
            " `init --alpha` (alpha / r of 1 to 4 is usual)"
        )
    raise TrainingDivergedError(
        f"training diverged at step {step} of {total} ({what}) with --lr {lr:g}; lower --lr (try {lr / 10:g})"
    )


def local_header(
    global_state: Artifact,
    num_samples: int,
    client_id: str,
    info: dict,
    ledger: Ledger | None = None,
    base_quantization: str = NONE,
    site_rank: int | None = None,
) -> Header:
    """Header of a locally trained state: same round/LoRA/base as G, parent = G's hash; with
    DP-SGD, the site's record-level ledger after this round; with a quantized base (nf4, fp4,
    int8), info.base_quantization, and with a site rank below the global rank, info.site_rank:
    each recorded only then, so a full-precision, full-rank site's files do not change."""
    head = global_state.header
    if base_quantization != NONE:
        info = {**info, "base_quantization": base_quantization}
    if site_rank is not None and site_rank < head.lora.rank:
        info = {**info, "site_rank": site_rank}
    return Header(
        kind="state",
        round=head.round,
        lora=head.lora,
        base_fingerprint=head.base_fingerprint,
        parent_hash=head.content_hash,
        method=head.method,
        client_id=client_id,
        num_samples=num_samples,
        info=info,
        privacy={} if ledger is None else {RECORD_LEVEL: ledger.to_json()},
    )


def private_training(
    settings: RecordDp,
    global_state: Artifact,
    client: str,
    datasets: Sequence[data_mod.Dataset],
    config: TrainConfig,
    own: Ledger | None = None,
    test_seed: int | None = None,
) -> tuple[TrainConfig, Ledger]:
    """Plan a DP-SGD round before any training (privacy.budget.plan_round): `config` with its
    DP-SGD settings, and the site's ledger after the round. PrivacyError when it may not run.

    The population is every example of `datasets`; the history is the one the global state
    recorded for `client`, or `own` (the site's previous ledger) when that is longer.
    """
    records = sum(len(ds.examples) for ds in datasets)
    steps = config.total_steps(records)
    privacy = read_privacy(global_state.header)
    recorded = (privacy.sites or {}).get(client)
    history = history_of(client, recorded, own, privacy.participants)
    expected = config.batch_size * config.grad_accum
    round_index = global_state.header.round + 1
    sigma, after = plan_round(settings, client, round_index, records, expected, steps, history)
    return replace(config, dp=DpSgdConfig(sigma, settings.max_grad_norm, test_seed)), after


def check_private_run(stats: TrainStats, ledger: Ledger) -> None:
    """The run did what its ledger says (sample rate, steps, records, noise, clip): an internal
    invariant, checked before the ledger is written."""
    release = ledger.releases[-1]
    ran = stats.dp or {}
    planned = {
        "noise_multiplier": release.noise_multiplier,
        "max_grad_norm": release.clip,
        "sample_rate": release.sample_rate,
        "steps": release.steps,
        "population": release.population,
    }
    if any(ran.get(key) != value for key, value in planned.items()):
        raise RuntimeError(f"DP-SGD ran {ran}, but its ledger records {planned}")
