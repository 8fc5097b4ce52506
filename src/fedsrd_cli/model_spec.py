"""What fedsrd needs to know about a base model without loading its weights.

`base_fingerprint` reads config.json only. `lora_module_shapes` builds the model on
the meta device (no memory, no weights) and lets PEFT choose the adapted modules,
so names and shapes are exactly PEFT's. transformers and peft are imported inside
the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import DataError

_FINGERPRINT_SKIP_SUFFIX = "_token_id"


def read_model_config(model_dir: str | Path) -> dict:
    """config.json of a local model directory, as a dict (DataError if absent or unreadable)."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise DataError(f"{model_dir}: not a directory (expected a local transformers model)")
    if not path.exists():
        raise DataError(f"{model_dir}: no config.json (expected a model saved by save_pretrained)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable model config ({err})") from None


def base_fingerprint(config: dict) -> str:
    """sha256 of the architecture: model_type plus every integer field except token ids.

    fingerprint = "sha256:" + sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")))
    It tells architectures and sizes apart (Llama-3.2-1B vs 3B, Qwen vs Llama), not two
    checkpoints of one architecture.
    """
    fields: dict[str, object] = {"model_type": config.get("model_type", "")}
    for key, value in config.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int and not key.endswith(_FINGERPRINT_SKIP_SUFFIX) and not key.startswith("_"):
            fields[key] = value
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def parse_targets(targets: str) -> list[str] | str:
    """--targets: "all-linear" or a comma-separated list of module names."""
    if targets.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise DataError("--targets names no module")
    return names


def lora_module_shapes(
    model_dir: str | Path, targets: str, rank: int, alpha: float
) -> tuple[LoraSpec, dict[str, tuple[int, int]]]:
    """PEFT's adapted modules of a local model: (LoRA spec with expanded targets, {module: (d_out, d_in)}).

    Module names are PEFT's state-dict prefixes (base_model.model.<path>).
    """
    read_model_config(model_dir)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # transformers raises many types for a bad directory
        raise DataError(f"{model_dir}: transformers cannot read this model config ({err})") from None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
        try:
            peft_model = get_peft_model(
                model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=parse_targets(targets))
            )
        except ValueError as err:
            raise DataError(f"--targets {targets}: {err}") from None
    shapes: dict[str, tuple[int, int]] = {}
    for name, param in peft_model.named_parameters():
        if name.endswith(".lora_A.default.weight"):
            module = name.removesuffix(".lora_A.default.weight")
            b_param = peft_model.get_parameter(module + ".lora_B.default.weight")
            shapes[module] = (int(b_param.shape[0]), int(param.shape[1]))
    if not shapes:
        raise DataError(f"--targets {targets}: no module of {model_dir} matches")
    leaf_names = tuple(sorted({module.rsplit(".", 1)[-1] for module in shapes}))
    return LoraSpec(rank, alpha, leaf_names), shapes
