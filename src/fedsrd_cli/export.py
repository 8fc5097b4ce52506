"""Export a global state as a standard PEFT adapter directory.

The directory holds adapter_config.json (PEFT's LoraConfig, dropout 0, task
CAUSAL_LM) and adapter_model.safetensors (the state's tensors under the same
names: a fedsrd state already uses PEFT's adapter keys), so
`PeftModel.from_pretrained(base, DIR)` loads it. peft is imported inside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsrd_cli.artifacts import Artifact, encode_safetensors, ensure_writable, write_bytes_atomic
from fedsrd_cli.errors import OutputExistsError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
        return value.value
    return value


def adapter_config(global_state: Artifact, base_name: str | None) -> dict[str, Any]:
    """PEFT's LoraConfig for the state's rank, alpha and target module names, as a dict."""
    from peft import LoraConfig

    lora = global_state.header.lora
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    return _jsonable(config.to_dict())


def export_adapter(
    global_state: Artifact, out_dir: str | Path, base_name: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Write out_dir/adapter_config.json and out_dir/adapter_model.safetensors (fp32)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a directory")
    config_path, weights_path = out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_writable(config_path, force)
    ensure_writable(weights_path, force)
    config = adapter_config(global_state, base_name)
    tensors = {name: tensor.float() for name, tensor in global_state.iter_tensors()}
    metadata = {
        "format": "pt",
        "fedsrd.exported_from": global_state.header.content_hash,
        "fedsrd.round": str(global_state.header.round),
    }
    write_bytes_atomic(weights_path, encode_safetensors(tensors, metadata), force)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(config_path, text.encode("utf-8"), force)
    return {
        "path": str(out_dir),
        "config": str(config_path),
        "weights": str(weights_path),
        "tensors": len(tensors),
        "bytes": weights_path.stat().st_size,
        "round": global_state.header.round,
        "source_hash": global_state.header.content_hash,
    }
