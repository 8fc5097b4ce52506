"""The model a site works on: load a base once, attach LoRA, put a state or an adapter into it.

`load_base` loads a causal LM and its tokenizer from a local directory or GGUF file (never
from a hub) onto the device and dtype `resolve_device` / `resolve_dtype` pick, optionally in 4
or 8 bits through bitsandbytes (quantization.py);
`check_fingerprint` tells, before loading, whether a base is the one a global state was made
for. `attach_lora` wraps the loaded base with PEFT LoRA for a global state's LoRA config, once;
`set_global` then loads any state of that config into it, so a simulation can reuse one model
across clients and rounds, and `current_factors` reads the factors back. `load_adapter`
instead puts a PEFT adapter directory (from `fedsrd export`) on the base, for `fedsrd eval`.

`token_losses` and `example_losses` are the model's next-token cross-entropies on a batch:
summed over the label tokens (plain training, evaluation), or one mean per record (DP-SGD).

transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import DataError, MismatchError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lineage
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.files.model_spec import fingerprint_base, resolve_base
from fedsrd_cli.files.safetensors_io import open_safetensors, short
from fedsrd_cli.site import data as data_mod
from fedsrd_cli.site.quantization import NONE, bnb_config, check_quantization, prepare_for_training

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")


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
    quantization: str = "none"  # "nf4", "fp4" or "int8": loaded through bitsandbytes (quantization.py)


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


def load_base(
    model_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str = "none",
    for_training: bool = False,
) -> BaseModel:
    """Load a causal LM and its tokenizer from a local directory or GGUF file (never from a hub).

    A GGUF file is dequantized to `dtype` by transformers and then made a plain model
    (`_plain_model`), so it trains, casts and saves like one loaded from a directory.
    quantization "nf4", "fp4" or "int8" loads the base's linear layers through bitsandbytes
    (quantization.py; refused before loading when it cannot work), prepared for LoRA training
    when `for_training`; the fingerprint is still the files'.
    """
    check_quantization(quantization, model_dir, device)
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
    if quantization != NONE:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8: "inputs will be cast" each call
        extra.update(quantization_config=bnb_config(quantization, torch_dtype), device_map={"": torch_device})
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
            if quantization != NONE and for_training:
                model = prepare_for_training(model)
    except Exception as err:
        raise DataError(f"{model_dir}: cannot load the model ({type(err).__name__}: {err})") from None
    if quantization == NONE:
        model.to(torch_device)  # a bitsandbytes model is placed by device_map, and refuses .to
    model.eval()
    return BaseModel(model_dir, model, tokenizer, fingerprint, torch_device, torch_dtype, None, quantization)


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
    from peft import get_peft_model

    from fedsrd_cli.files.export import peft_lora_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.model = get_peft_model(base.model, peft_lora_config(lora))
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


# --------------------------------------------------------------------------- adapters


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
