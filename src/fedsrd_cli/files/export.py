"""Export a global state as a standard PEFT adapter directory.

The directory holds adapter_config.json (PEFT's LoraConfig, dropout 0, task
CAUSAL_LM), adapter_model.safetensors (the state's tensors under the same
names: a fedsrd state already uses PEFT's adapter keys), so
`PeftModel.from_pretrained(base, DIR)` loads it, and fedsrd_lineage.json: the
exported state's content hash, round and base fingerprint (PEFT ignores the file).
peft is imported inside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import OutputExistsError
from fedsrd_cli.files.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORTED_FROM_KEY, LINEAGE_FILE
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.files.atomic import FileWrite, check_output_folder, ensure_output_dir, write_files_atomic
from fedsrd_cli.files.header import FORMAT_VERSION
from fedsrd_cli.files.safetensors_io import encode_safetensors

CONFIG_FILE = ADAPTER_CONFIG
WEIGHTS_FILE = ADAPTER_WEIGHTS


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
        return value.value
    return value


def peft_lora_config(lora: LoraSpec, base_name: str | None = None) -> Any:
    """PEFT's LoraConfig for fedsrd's LoRA settings: rank, alpha, target modules, no dropout and
    no bias, a causal LM. The one definition both `export` and a site's model (site/model.py) use."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )


def adapter_config(global_state: Artifact, base_name: str | None) -> dict[str, Any]:
    """PEFT's LoraConfig for the state's rank, alpha and target module names, as a dict."""
    return _jsonable(peft_lora_config(global_state.header.lora, base_name).to_dict())


def lineage_record(global_state: Artifact) -> dict[str, Any]:
    """What an exported adapter directory records about its state (LINEAGE_FILE)."""
    head = global_state.header
    return {
        "format_version": FORMAT_VERSION,
        "exported_from": head.content_hash,
        "round": head.round,
        "base_fingerprint": head.base_fingerprint,
        "lora": json.loads(head.lora.to_json()),
    }


def export_adapter(
    global_state: Artifact, out_dir: str | Path, base_name: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Write out_dir/adapter_config.json, out_dir/adapter_model.safetensors (fp32) and
    out_dir/fedsrd_lineage.json (the state's hash, round and base), all three or none.

    The weights' metadata records the same lineage (fedsrd.exported_from, fedsrd.round,
    fedsrd.base_fingerprint); the lineage file stays when PEFT saves a trained adapter
    over the export, so `sparsify` can tell which state the adapter was trained from.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        check_output_folder(out_dir.parent)  # like every other command: no missing folder is made
    ensure_output_dir(out_dir)
    config_path, weights_path = out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE
    lineage_path = out_dir / LINEAGE_FILE
    for path in (config_path, weights_path, lineage_path):
        if path.exists() and not force:
            raise OutputExistsError(f"{path}: already exists (pass --force to replace it)")
    config = adapter_config(global_state, base_name)
    head = global_state.header
    tensors = {name: tensor.float() for name, tensor in global_state.iter_tensors()}
    metadata = {
        "format": "pt",
        EXPORTED_FROM_KEY: head.content_hash,
        "fedsrd.round": str(head.round),
        "fedsrd.base_fingerprint": head.base_fingerprint,
    }
    files = [
        FileWrite(weights_path, encode_safetensors(tensors, metadata)),
        FileWrite(config_path, _json_bytes(config)),
        FileWrite(lineage_path, _json_bytes(lineage_record(global_state))),
    ]
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)  # its parent exists (ensure_output_dir): no folder is made on the way
    try:
        write_files_atomic(files, force)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return {
        "path": str(out_dir),
        "config": str(config_path),
        "weights": str(weights_path),
        "lineage": str(lineage_path),
        "tensors": len(tensors),
        "bytes": weights_path.stat().st_size,
        "round": head.round,
        "source_hash": head.content_hash,
    }


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
