"""Client side on a real model: load a base once, put a global state into it, train, evaluate.

The base model is loaded once (`load_base`) and wrapped with PEFT LoRA for a
global state's LoRA config (`attach_lora`); `set_global` then loads any state of
that config into it, so a simulation can reuse one model across clients and
rounds. `train_local` trains from the state currently loaded and returns fp32
factors under the global state's tensor names; `evaluate` scores data files.
transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.config import LoraSpec, _require
from fedsrd_cli.errors import DataError, MismatchError, TrainingDivergedError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lineage
from fedsrd_cli.files.artifacts import Artifact, Header
from fedsrd_cli.files.model_spec import fingerprint_base, resolve_base
from fedsrd_cli.files.safetensors_io import open_safetensors, short
from fedsrd_cli.math.lowrank import scheduled_factor
from fedsrd_cli.privacy.budget import RecordDp, history_of, plan_round
from fedsrd_cli.privacy.dpsgd import DpSgdConfig
from fedsrd_cli.privacy.ledger import RECORD_LEVEL, Ledger, read_privacy
from fedsrd_cli.site import data as data_mod

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
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


@dataclass
class BaseModel:
    """A loaded base model: the transformers model (PEFT-wrapped once a LoRA is attached)."""

    path: Path
    model: Any
    tokenizer: Any
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    lora: LoraSpec | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def check_fingerprint(model_dir: str | Path, global_state: Artifact) -> str:
    """The base model's fingerprint (a directory or a GGUF file); MismatchError if it is not the
    global state's base."""
    found = fingerprint_base(model_dir)
    expected = global_state.header.base_fingerprint
    if found != expected:
        raise MismatchError(
            f"{model_dir}: is another base model (fingerprint {short(found)}) than {global_state.path}"
            f" was made for ({short(expected)})"
        )
    return found


def load_base(model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> BaseModel:
    """Load a causal LM and its tokenizer from a local directory or GGUF file (never from a hub).

    A GGUF file is dequantized to `dtype` by transformers and then made a plain model
    (`_plain_model`), so it trains, casts and saves like one loaded from a directory.
    """
    model_dir = Path(model_dir)
    source = resolve_base(model_dir)
    fingerprint = source.fingerprint()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    extra = source.pretrained_kwargs()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, local_files_only=True, **extra)
    except Exception as err:  # transformers raises many types for a bad directory
        raise DataError(f"{model_dir}: cannot load its tokenizer ({type(err).__name__}: {err})") from None
    try:
        with warnings.catch_warnings(), _no_gguf_progress_bar():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                source.folder, local_files_only=True, dtype=torch_dtype, **extra
            )
            if source.is_gguf:
                model = _plain_model(model, torch_dtype)
    except Exception as err:
        raise DataError(f"{model_dir}: cannot load the model ({type(err).__name__}: {err})") from None
    model.to(torch_device)
    model.eval()
    return BaseModel(model_dir, model, tokenizer, fingerprint, torch_device, torch_dtype)


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """Hide the tqdm bar transformers' GGUF reader draws while dequantizing.

    That reader uses tqdm directly, so `disable_progress_bar()` does not reach it; commands
    report progress through output.Output instead. Does nothing if transformers moves it.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _plain_model(model: Any, dtype: torch.dtype) -> Any:
    """The same model without transformers' GGUF "quantizer", around the same tensors (no copy).

    A model loaded from a GGUF file keeps that quantizer even once its weights are plain
    floats: it refuses save_pretrained, .float() and .half() and reports itself not trainable.
    Rebuilding the class from the config minus `quantization_config`, with the loaded state
    dict, gives an ordinary model with the identical weights (and buffers such as RoPE's
    computed afresh).
    """
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(model.config).from_dict(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model).from_pretrained(None, config=config, state_dict=model.state_dict(), dtype=dtype)


def attach_lora(base: BaseModel, lora: LoraSpec) -> None:
    """Wrap the base with PEFT LoRA (dropout 0) for `lora`; once per loaded base."""
    if base.lora is not None:
        if base.lora != lora:
            raise MismatchError(
                f"the loaded model carries LoRA {base.lora.describe()}, not {lora.describe()}"
            )
        return
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.model = get_peft_model(base.model, config)
    base.lora = lora


def lora_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """{PEFT adapter state-dict key: parameter} for every LoRA factor of the model."""
    found = {}
    for name, param in model.named_parameters():
        if ".lora_A.default." in name or ".lora_B.default." in name:
            found[name.replace(".default.", ".")] = param
    return found


def set_global(base: BaseModel, global_state: Artifact) -> None:
    """Load a global state's factors into the model; every key must load, with its shape."""
    attach_lora(base, global_state.header.lora)
    from peft import set_peft_model_state_dict

    params = lora_parameters(base.model)
    names = set(global_state.names)
    if set(params) != names:
        missing = sorted(set(params) - names)
        unknown = sorted(names - set(params))
        example = (missing or unknown)[0]
        raise MismatchError(
            f"{global_state.path}: its tensors do not match the model's LoRA modules"
            f" ({len(missing)} missing, {len(unknown)} unknown, e.g. {example})"
        )
    tensors = {}
    for name, tensor in global_state.iter_tensors():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise MismatchError(
                f"{global_state.path}: {name} has shape {list(tensor.shape)}, the model"
                f" {list(params[name].shape)}"
            )
        tensors[name] = tensor
    result = set_peft_model_state_dict(base.model, tensors)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    not_loaded = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or not_loaded:
        raise MismatchError(
            f"{global_state.path}: PEFT did not load every tensor"
            f" (unexpected {unexpected[:1]}, missing {not_loaded[:1]})"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if not torch.equal(params[name].detach().float().cpu(), tensor.float()):
                raise MismatchError(f"{global_state.path}: {name} did not load into the model")


def current_factors(base: BaseModel) -> dict[str, torch.Tensor]:
    """The model's LoRA factors as fp32 CPU tensors under PEFT's adapter keys."""
    return {
        name: param.detach().to("cpu", torch.float32).clone()
        for name, param in lora_parameters(base.model).items()
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _batches(num: int, batch: int, generator: torch.Generator):
    """Endless stream of index lists: a fresh permutation each epoch."""
    while True:
        order = torch.randperm(num, generator=generator).tolist()
        for start in range(0, num, batch):
            yield order[start : start + batch]


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over label positions, number of those positions)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=data_mod.IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != data_mod.IGNORE_INDEX).sum())


def example_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) each example's mean next-token cross-entropy over its own label positions (0 for an
    example with none): DP-SGD's per-record loss, so a record's weight does not grow with its length."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=data_mod.IGNORE_INDEX,
        reduction="none",
    ).reshape(shift_labels.shape)
    counts = (shift_labels != data_mod.IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counts


def load_datasets(paths: Sequence[str | Path]) -> list[data_mod.Dataset]:
    if not paths:
        raise UsageError("give at least one --data file")
    return [data_mod.read_jsonl(p) for p in paths]


def train_local(
    base: BaseModel,
    global_state: Artifact,
    datasets: Sequence[data_mod.Dataset],
    config: TrainConfig,
    on_step: Callable[[int, int, float | None, float], None] | None = None,
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
    """
    if base.fingerprint != global_state.header.base_fingerprint:
        raise MismatchError(
            f"{base.path}: is another base model (fingerprint {short(base.fingerprint)}) than"
            f" {global_state.path} was made for ({short(global_state.header.base_fingerprint)})"
        )
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
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    loop = _private_steps if config.dp is not None else _plain_steps
    population = encoded if config.dp is not None else usable
    total = config.total_steps(len(population))
    model.train()
    start = time.monotonic()
    try:
        log, dp_record = loop(base, population, trained, optimizer, config, total, on_step)
    finally:
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


StepCallback = Callable[[int, int, float | None, float], None] | None


def _plain_steps(
    base: BaseModel,
    usable: list,
    trained: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    total: int,
    on_step: StepCallback,
) -> tuple[list[dict[str, Any]], None]:
    """Seeded shuffled batches, token-weighted loss, the batch gradient clipped to max_grad_norm."""
    pad = data_mod.pad_id(base.tokenizer)
    anchor = {name: p.detach().clone() for name, p in trained.items()} if config.prox_mu > 0 else {}
    generator = torch.Generator().manual_seed(config.seed)
    stream = _batches(len(usable), config.batch_size, generator)
    log: list[dict[str, Any]] = []
    for step in range(1, total + 1):
        step_start = time.monotonic()
        micro = [data_mod.collate([usable[i] for i in next(stream)], pad) for _ in range(config.grad_accum)]
        step_tokens = sum(int((b["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum()) for b in micro)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for batch in micro:
            batch = {k: v.to(base.device) for k, v in batch.items()}
            loss, _count = token_losses(base.model, batch)
            (loss / step_tokens).backward()
            loss_sum += float(loss.detach())
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
    global_state: Artifact, num_samples: int, client_id: str, info: dict, ledger: Ledger | None = None
) -> Header:
    """Header of a locally trained state: same round/LoRA/base as G, parent = G's hash; with
    DP-SGD, the site's record-level ledger after this round."""
    head = global_state.header
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


# --------------------------------------------------------------------------- evaluation


def check_adapter_base(adapter_dir: str | Path, base_path: str | Path) -> None:
    """Before loading anything: a folder `fedsrd export` wrote records its state's base model
    fingerprint, which must be --base's (MismatchError naming both, exit 4)."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise DataError(f"{adapter_dir}: no {ADAPTER_CONFIG} (expected a PEFT adapter directory)")
    if not weights.is_file():
        raise DataError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (expected a PEFT adapter directory)")
    lineage = read_lineage(weights)
    if lineage is None or not lineage.base_fingerprint:
        return
    found = fingerprint_base(base_path)
    if found != lineage.base_fingerprint:
        raise MismatchError(
            f"{adapter_dir}: was exported for another base model (fingerprint"
            f" {short(lineage.base_fingerprint)}, recorded in {lineage.source}) than --base {base_path}"
            f" ({short(found)})"
        )


def load_adapter(base: BaseModel, adapter_dir: str | Path) -> None:
    """Load a PEFT adapter directory (e.g. from `fedsrd export`) onto the base with PEFT itself.

    Every LoRA tensor must fit a module of the base (MismatchError naming both models, exit 4)
    before PEFT sees the adapter; anything else PEFT refuses is one line, exit 6.
    """
    adapter_dir = Path(adapter_dir)
    check_adapter_base(adapter_dir, base.path)
    _check_adapter_fits(base, adapter_dir)
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base.model = PeftModel.from_pretrained(base.model, str(adapter_dir), local_files_only=True)
    except Exception as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise DataError(
            f"{adapter_dir}: PEFT cannot load this adapter ({type(err).__name__}: {first})"
        ) from None
    base.model.eval()


def _check_adapter_fits(base: BaseModel, adapter_dir: Path) -> None:
    """Each lora_A (r, d_in) and lora_B (d_out, r) must sit on a linear module of that shape."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        made_for = (config.get("base_model_name_or_path") if isinstance(config, dict) else None) or "?"
    except (OSError, ValueError) as err:
        raise DataError(f"{adapter_dir / ADAPTER_CONFIG}: unreadable ({err})") from None
    handle = open_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    other = (
        f"{adapter_dir}: was made for another base model ({ADAPTER_CONFIG} names {made_for})"
        f" than --base {base.path}"
    )
    for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
        parsed = naming.parse_factor_key(name)
        if parsed is None:
            continue
        module_name, factor = parsed
        path = module_name.removeprefix("base_model.model.")
        try:
            module = base.model.get_submodule(path)
        except AttributeError:
            raise MismatchError(f"{other}: it adapts {path}, which --base does not have") from None
        shape = list(handle.get_slice(name).get_shape())
        if factor == "A" and getattr(module, "in_features", shape[1]) != shape[1]:
            raise MismatchError(
                f"{other}: its {path} takes {shape[1]} inputs, in --base {module.in_features}"
            )
        if factor == "B" and getattr(module, "out_features", shape[0]) != shape[0]:
            raise MismatchError(
                f"{other}: its {path} gives {shape[0]} outputs, in --base {module.out_features}"
            )


@torch.no_grad()
def evaluate(
    base: BaseModel,
    datasets: Sequence[data_mod.Dataset],
    batch_size: int = 8,
    max_length: int = 512,
    generate: bool = False,
    max_new_tokens: int = 32,
    on_batch: Callable[[], None] | None = None,
    answers: int = 0,
    tasks: bool = False,
    task_max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Loss and perplexity on response tokens, per file and their mean; exact match with generate.

    loss(file) = sum of token cross-entropies over response tokens / their count;
    perplexity = exp(loss); "mean" averages the per-file figures (one file per domain).
    exact_match: greedy generation from the prompt, compared with the reference after strip().
    answers: also the greedy answers to the first `answers` examples of each file, as
    {"prompt", "reference", "answer"} records under the file's "answers".
    tasks: also each file's task metric (task_eval.score_tasks) under its "task", and their
    mean over the files that have one as "mean"'s "task_score"; generation tasks get at most
    task_max_new_tokens tokens.
    """
    if answers < 0:
        raise UsageError("--answers must be >= 0")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    model, tokenizer = base.model, base.tokenizer
    model.eval()
    pad = data_mod.pad_id(tokenizer)
    files: dict[str, dict[str, Any]] = {}
    names = file_labels([ds.path for ds in datasets])
    for index, ds in enumerate(datasets):
        encoded = [data_mod.encode(tokenizer, ex, max_length) for ex in ds.examples]
        total_loss, total_tokens = 0.0, 0
        for start in range(0, len(encoded), batch_size):
            batch = data_mod.collate(encoded[start : start + batch_size], pad)
            batch = {k: v.to(base.device) for k, v in batch.items()}
            loss, count = token_losses(model, batch)
            total_loss += float(loss)
            total_tokens += count
            if on_batch is not None:
                on_batch()
        if total_tokens == 0:
            raise DataError(f"{ds.path}: no response token within --max-length to score")
        mean = total_loss / total_tokens
        metrics: dict[str, Any] = {
            "path": str(ds.path),
            "format": ds.format,
            "examples": len(ds.examples),
            "tokens": total_tokens,
            "loss": mean,
            "perplexity": math.exp(min(mean, 700.0)),
        }
        if generate and ds.format != "text":
            metrics["exact_match"] = _exact_match(base, ds, batch_size, max_length, max_new_tokens, pad)
        if answers:
            shown = ds.examples[:answers]
            texts = generate_answers(base, shown, batch_size, max_length, max_new_tokens, pad)
            metrics["answers"] = [
                {"prompt": ex.prompt, "reference": ex.response, "answer": text}
                for ex, text in zip(shown, texts, strict=True)
            ]
        if tasks:
            from fedsrd_cli.site.task_eval import score_tasks

            scored = score_tasks(base, ds, batch_size, max_length, task_max_new_tokens, on_batch)
            if scored is not None:
                metrics["task"] = scored
        files[names[index]] = metrics
    result: dict[str, Any] = {"files": files}
    result["mean"] = {
        key: sum(m[key] for m in files.values()) / len(files)
        for key in ("loss", "perplexity", "exact_match")
        if all(key in m for m in files.values())
    }
    task_scores = [m["task"]["score"] for m in files.values() if "task" in m]
    if task_scores:
        result["mean"]["task_score"] = sum(task_scores) / len(task_scores)
    return result


def file_labels(paths: Sequence[Path]) -> list[str]:
    """A short unique label per data file: its stem, or parent/stem when stems repeat
    (clients/code/eval.jsonl -> "code/eval"), else the whole path."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    labels = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(labels)) == len(labels):
        return labels
    return [str(p) for p in paths]


def _exact_match(
    base: BaseModel, ds: data_mod.Dataset, batch_size: int, max_length: int, max_new_tokens: int, pad: int
) -> float:
    answers = generate_answers(base, ds.examples, batch_size, max_length, max_new_tokens, pad)
    hits = sum(a.strip() == ex.response.strip() for a, ex in zip(answers, ds.examples, strict=True))
    return hits / len(ds.examples)


def generate_answers(
    base: BaseModel,
    examples: Sequence[data_mod.Example],
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    pad: int,
) -> list[str]:
    """Greedy answers of the model to the examples' prompts (special tokens removed)."""
    tokenizer, model = base.tokenizer, base.model
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [data_mod.prompt_ids(tokenizer, ex)[-max_length:] for ex in chunk]
        batch = data_mod.collate([(p, p) for p in prompts], pad, left=True)
        input_ids = batch["input_ids"].to(base.device)
        attention = batch["attention_mask"].to(base.device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in output[:, input_ids.shape[1] :]:
            answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return answers
