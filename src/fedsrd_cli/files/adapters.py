"""Local adapters: a client's trained factors, as a fedsrd local state or as a PEFT adapter
saved elsewhere (adapter_config.json + adapter_model.safetensors), and the lineage `fedsrd
export` records in the adapters it writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import ArtifactError, MismatchError
from fedsrd_cli.files.artifacts import Artifact, read_artifact
from fedsrd_cli.files.header import Header
from fedsrd_cli.files.layout import check_layout
from fedsrd_cli.files.safetensors_io import (
    TensorFile,
    all_finite,
    checked_exists,
    open_safetensors,
    tensor_layout,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# `fedsrd export` records the state an adapter directory was exported from (docs/format.md,
# "Exported adapters"), in this file beside the weights and in the weights' metadata.
LINEAGE_FILE = "fedsrd_lineage.json"
EXPORTED_FROM_KEY = "fedsrd.exported_from"


@dataclass(frozen=True)
class ExportLineage:
    """What `fedsrd export` recorded: the state's content hash, round and base fingerprint."""

    exported_from: str
    round: int
    base_fingerprint: str = ""
    source: str = ""  # the file it was read from, for messages


@dataclass
class LocalAdapter:
    """A client's trained factors: a fedsrd state, or a PEFT adapter saved elsewhere.

    header is None for a PEFT adapter (it carries no lineage or fingerprint of its own);
    lineage is what `fedsrd export` recorded when the adapter started as an export, else None.
    lora_from: where the LoRA settings came from (the header, adapter_config.json, or the
    global state when a bare weights file has no config beside it).
    """

    path: Path
    lora: LoraSpec
    header: Header | None
    artifact: Artifact
    lineage: ExportLineage | None = None
    lora_from: str = ""

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.artifact.factors(module)


def read_local(path: str | os.PathLike, like: Artifact | None = None) -> LocalAdapter:
    """Read a local adapter: a fedsrd state file, a PEFT adapter directory, or its weights file.

    like: the global state the adapter was trained from. A PEFT weights file without an
    adapter_config.json beside it is read with `like`'s LoRA settings when its tensor names
    and shapes are exactly `like`'s (a rank or alpha cannot be told from the tensors alone
    otherwise).
    """
    path = Path(path)
    if checked_exists(path) and path.is_dir():
        weights = path / ADAPTER_WEIGHTS
        if not weights.exists():
            raise ArtifactError(
                f"{path}: directory without {ADAPTER_WEIGHTS} (expected a PEFT adapter"
                " saved with save_pretrained, or a fedsrd state file)"
            )
        return _read_peft(weights, path / ADAPTER_CONFIG, like)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    handle = open_safetensors(path)
    if "fedsrd.kind" in (handle.metadata() or {}):
        artifact = read_artifact(path, kind="state")
        return LocalAdapter(path, artifact.header.lora, artifact.header, artifact, lora_from="its header")
    return _read_peft(path, path.parent / ADAPTER_CONFIG, like)


def read_lineage(weights: str | os.PathLike) -> ExportLineage | None:
    """The export lineage of an adapter weights file: its own metadata (a file as `export` wrote
    it), else the lineage file beside it (kept when PEFT saves a trained adapter over the
    export); None when neither is there."""
    weights = Path(weights)
    meta = open_safetensors(weights).metadata() or {}
    if EXPORTED_FROM_KEY in meta:
        try:
            round_index = int(meta.get("fedsrd.round", "0"))
        except ValueError:
            raise ArtifactError(f"{weights}: unreadable fedsrd.round in its metadata") from None
        return ExportLineage(
            meta[EXPORTED_FROM_KEY], round_index, meta.get("fedsrd.base_fingerprint", ""), str(weights)
        )
    record_path = weights.parent / LINEAGE_FILE
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        return ExportLineage(
            str(record["exported_from"]),
            int(record["round"]),
            str(record.get("base_fingerprint", "")),
            str(record_path),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(
            f"{record_path}: unreadable export lineage ({type(err).__name__}: {err})"
        ) from None


def _read_peft(weights: Path, config_path: Path, like: Artifact | None) -> LocalAdapter:
    handle = open_safetensors(weights)
    shapes, dtypes = tensor_layout(handle)
    if config_path.exists():
        lora = _peft_lora(config_path)
        lora_from = str(config_path)
    elif like is not None:
        _check_same_tensors_as(like, shapes, weights)
        lora = like.header.lora
        lora_from = f"{like.path} (no {ADAPTER_CONFIG} beside it; every tensor matches)"
    else:
        raise ArtifactError(
            f"{weights}: no fedsrd metadata and no {ADAPTER_CONFIG} beside it; cannot tell its"
            " LoRA configuration"
        )
    placeholder = Header(kind="state", round=0, lora=lora, base_fingerprint="")
    check_layout(placeholder, shapes, dtypes, str(weights))
    artifact = Artifact(weights, placeholder, TensorFile.open(weights), shapes, dtypes)
    for name, tensor in artifact.iter_tensors():
        if not all_finite(tensor):
            raise ArtifactError(f"{weights}: tensor {name} contains NaN or Inf")
    return LocalAdapter(weights, lora, None, artifact, read_lineage(weights), lora_from)


def _peft_lora(config_path: Path) -> LoraSpec:
    """The LoRA settings of a PEFT adapter_config.json."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{config_path}: unreadable adapter config ({err})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{config_path}: not a PEFT adapter config (not a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise MismatchError(f"{config_path}: a {config.get('peft_type')} adapter, expected LoRA")
    if config.get("use_dora"):
        raise MismatchError(f"{config_path}: DoRA adapters are not supported, only plain LoRA")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    try:
        return LoraSpec(int(config["r"]), float(config["lora_alpha"]), tuple(targets))
    except (KeyError, ValueError, TypeError) as err:
        raise ArtifactError(f"{config_path}: incomplete LoRA config ({err})") from None


def _check_same_tensors_as(like: Artifact, shapes: Mapping[str, tuple[int, ...]], weights: Path) -> None:
    """A bare weights file must hold exactly `like`'s tensor names and shapes to borrow its LoRA."""
    why = f"{weights}: has no {ADAPTER_CONFIG} beside it, and"
    missing = sorted(set(like.shapes) - set(shapes))
    unknown = sorted(set(shapes) - set(like.shapes))
    if unknown:
        raise MismatchError(f"{why} holds {len(unknown)} tensors {like.path} does not, e.g. {unknown[0]}")
    if missing:
        raise MismatchError(f"{why} lacks {len(missing)} of {like.path}'s LoRA tensors, e.g. {missing[0]}")
    for name, shape in like.shapes.items():
        if tuple(shapes[name]) != tuple(shape):
            raise MismatchError(
                f"{why} its {name} has shape {list(shapes[name])}, {like.path}'s {list(shape)}; cannot"
                " take the LoRA settings from the global state"
            )
