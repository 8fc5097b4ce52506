"""Tensor names, and nothing else.

Every artifact names tensors after PEFT's adapter weights, so a state file is the
weights file of a PEFT adapter:
    <module>.lora_A.weight          (r, d_in)
    <module>.lora_B.weight          (d_out, r)
where <module> is PEFT's path, e.g. base_model.model.model.layers.0.self_attn.q_proj.
Sparse and factored tensors add a suffix to those names:
    <module>.lora_X.weight.values     kept values (uploads, broadcasts; int8 or packed int4 codes
                                      in a quantized broadcast)
    <module>.lora_X.weight.scales     float32 block scales of a quantized broadcast's codes
    <module>.lora_X.weight.mask       packed 1-bit mask (uploads), or instead
    <module>.lora_X.weight.positions  Rice-coded kept positions (uploads), where shorter
    <module>.aggregate.left           (d_out, k) and .right (k, d_in): W_r = left @ right
    <module>.lora_B.weight.masked     (d_out, r) int32: a masked projection (secure uploads)
    update_spread.masked              (limbs,): a secure upload's masked squared update norm
"""

from __future__ import annotations

import re
from collections.abc import Iterable

FACTORS = ("A", "B")
VALUES = ".values"
MASK = ".mask"
POSITIONS = ".positions"
SCALES = ".scales"
AGG_LEFT = ".aggregate.left"
AGG_RIGHT = ".aggregate.right"
MASKED = ".masked"
MASKED_SPREAD = "update_spread" + MASKED  # not a factor key: no module

_FACTOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def factor_key(module: str, factor: str) -> str:
    """PEFT name of factor "A" or "B" of a module."""
    return f"{module}.lora_{factor}.weight"


def parse_factor_key(name: str) -> tuple[str, str] | None:
    """(module, "A" | "B") for a PEFT LoRA weight name, else None."""
    match = _FACTOR_RE.match(name)
    return (match["module"], match["factor"]) if match else None


def values_key(name: str) -> str:
    return name + VALUES


def scales_key(name: str) -> str:
    return name + SCALES


def mask_key(name: str) -> str:
    return name + MASK


def positions_key(name: str) -> str:
    return name + POSITIONS


def aggregate_keys(module: str) -> tuple[str, str]:
    return module + AGG_LEFT, module + AGG_RIGHT


def strip_suffix(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.endswith(suffix) else None


def natural_key(text: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def sorted_modules(modules: Iterable[str]) -> list[str]:
    return sorted(set(modules), key=natural_key)


def masked_key(module: str) -> str:
    """A secure upload's masked projection of `module`: <module>.lora_B.weight.masked."""
    return factor_key(module, "B") + MASKED
