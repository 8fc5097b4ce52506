"""A 4-bit or 8-bit base (QLoRA): `--base-quantization nf4|fp4|int8` of train-local, eval and simulate.

The base is loaded through transformers' `BitsAndBytesConfig` (bitsandbytes): NF4 or FP4 with
the run's --dtype as compute dtype and double quantization (as PEFT's QLoRA recipe does), or
LLM.int8. For training, PEFT's `prepare_model_for_kbit_training` freezes the base and casts its
remaining half-precision weights (norms, embeddings) to fp32; gradient checkpointing stays the
run's own setting (training.train_local turns it on and off).

Only the site's copy of the base is quantized: the base fingerprint is still computed from the
model's files, so a 4-bit site and a bf16 site join the same round. The LoRA factors stay fp32.

`check_quantization` refuses, before anything loads, what cannot work: bitsandbytes missing, a
GGUF base (transformers dequantizes it with its own GGUF quantizer; bitsandbytes cannot
quantize it on load), and a device other than cpu or cuda (the ones checked here). DP-SGD
needs nothing else: Opacus hooks PEFT's lora_A / lora_B, which stay plain nn.Linear layers on a
bitsandbytes base (their per-example gradients sum to the batch gradient; tests/site).

transformers, peft and bitsandbytes are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.errors import UsageError

NONE = "none"
QUANTIZATIONS = (NONE, "nf4", "fp4", "int8")
INSTALL = "pip install 'fedsrd[qlora]' (or: pip install 'bitsandbytes>=0.50')"
DEVICES_QUANTIZED = ("auto", "cpu", "cuda")


def check_quantization(quantization: str, base: str | Path | None = None, device: str = "auto") -> None:
    """UsageError (exit 2), in one line and before loading, for a quantization that cannot run."""
    flag = f"--base-quantization {quantization}"
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"--base-quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == NONE:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"{flag} needs bitsandbytes, which is not installed: {INSTALL}")
    if base is not None and Path(base).suffix.lower() == ".gguf":
        raise UsageError(
            f"{flag}: {base} is a GGUF file, which transformers dequantizes itself; bitsandbytes can"
            " quantize only a model directory (safetensors) on load"
        )
    if device not in DEVICES_QUANTIZED:
        raise UsageError(
            f"{flag} runs on {', '.join(DEVICES_QUANTIZED[1:])} only (bitsandbytes), not --device {device}"
        )


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for `quantization` (not "none")."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def prepare_for_training(model: Any) -> Any:
    """PEFT's prepare_model_for_kbit_training, without its gradient checkpointing: train_local
    turns that on for the runs that ask for it (--gradient-checkpointing) and off afterwards."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
