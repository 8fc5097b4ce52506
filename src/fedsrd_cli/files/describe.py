"""Reports on files: what `inspect` shows and what `unpack` writes.

A fedsrd artifact is described as one (`describe`): identity, lineage, LoRA config,
tensors and traffic. Traffic is reported two ways: bytes on disk (what actually
travels) and the paper's accounting, where a sparse tensor costs fp32 values plus a
1-bit mask per element and a dense tensor costs fp32 values; both are compared with
dense fp32 LoRA factors (what FedAvg sends each way). An upload's masks are also reported
as stored: a bitmap (X.mask) or coded positions (X.positions), with their bytes.

Any other safetensors file (an exported adapter, unpack's output, a model's weights)
is described by `describe_plain`: its tensors, shapes and dtypes, its metadata, what
fedsrd recorded in it, and the PEFT adapter_config.json beside it, if any.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import ADAPTER_CONFIG, read_lineage
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.files.safetensors_io import open_safetensors

FP32_BYTES = 4


def paper_bytes(numel: int, kept: int | None) -> float:
    """Paper accounting of one tensor: kept * 4 + numel / 8 if sparse, numel * 4 if dense."""
    return numel * FP32_BYTES if kept is None else kept * FP32_BYTES + numel / 8


def describe(artifact: Artifact) -> dict[str, Any]:
    """A JSON-ready summary: identity, lineage, LoRA config, tensors and traffic."""
    head = artifact.header
    tensors = []
    paper_total = 0.0
    logical_numel = 0
    mask_bytes, paper_mask_bytes = 0, 0.0
    if head.kind in ("upload", "broadcast"):
        for name, shape in sorted(head.layout.items()):
            numel = math.prod(shape)
            if head.kind == "upload":  # kept: the mask's count (int4 codes hold two a byte)
                kept = artifact.upload_value_count(name)
                dense = kept is None
            else:
                values_shape = artifact.shapes[naming.values_key(name)]
                dense = head.download_sparsity == 0.0  # sends every element: no mask is needed
                kept = None if dense else values_shape[0]
                if kept is not None and head.info.get("value_dtype") == "int4":
                    kept = int(artifact.broadcast_mask(name).sum())  # two codes a byte
            paper_total += paper_bytes(numel, kept)
            logical_numel += numel
            if head.kind == "upload":
                mask = artifact.mask_storage(name)  # X.mask or X.positions, as stored
            else:
                mask = None if dense else {"stored": "seeded", "bytes": 0}
            if mask is not None:
                mask_bytes += mask["bytes"]
                paper_mask_bytes += numel / 8
            tensors.append(
                {
                    "name": name,
                    "shape": shape,
                    "nonzeros": numel if kept is None else kept,
                    "density": 1.0 if kept is None else kept / numel,
                    "mask": mask,
                }
            )
    else:
        for name in artifact.names:
            tensor = artifact.tensor(name)
            numel = tensor.numel()
            paper_total += paper_bytes(numel, None)
            logical_numel += numel
            tensors.append(
                {
                    "name": name,
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                    "nonzeros": int(torch.count_nonzero(tensor)),
                    "density": None,
                }
            )
    lora_numel = int(head.info.get("lora_numel", logical_numel if head.kind == "state" else 0))
    dense_bytes = lora_numel * FP32_BYTES
    size = artifact.path.stat().st_size
    report: dict[str, Any] = {
        "path": str(artifact.path),
        "kind": head.kind,
        "round": head.round,
        "method": head.method or None,
        "content_hash": head.content_hash,
        "parent_hash": head.parent_hash or None,
        "base_fingerprint": head.base_fingerprint,
        "lora": {
            "r": head.lora.rank,
            "lora_alpha": head.lora.alpha,
            "target_modules": list(head.lora.target_modules),
        },
        "modules": len(artifact.modules()),
        "tensors": tensors,
        "bytes_on_disk": size,
        "paper_bytes": paper_total,
        "dense_fp32_bytes": dense_bytes or None,
        "ratio_to_dense": (size / dense_bytes) if dense_bytes else None,
        "paper_ratio_to_dense": (paper_total / dense_bytes) if dense_bytes else None,
    }
    if head.kind in ("upload", "masked_upload"):
        report.update(trained_at=_trained_at(head))
    if head.kind == "upload":
        report.update(client_id=head.client_id, num_samples=head.num_samples)
        # What the masks cost: bytes stored (bitmaps, or coded positions where shorter) and the
        # paper's 1 bit per element, which paper_bytes counts whatever is stored.
        report.update(mask_bytes=mask_bytes, paper_mask_bytes=paper_mask_bytes)
    if head.kind == "state":
        local = bool(head.client_id or head.num_samples or "train" in head.info)
        report["state_role"] = "local" if local else "global"
        if local:
            report.update(client_id=head.client_id or None, num_samples=head.num_samples)
            report.update(trained_at=_trained_at(head))
    if head.kind == "broadcast":
        report.update(
            result_hash=head.result_hash,
            aggregate_hash=head.aggregate_hash,
            seed=head.seed,
            download_sparsity=head.download_sparsity,
        )
    if head.info:
        report["info"] = head.info
    if head.privacy:
        report["privacy"] = privacy_report(head)
    return report


def _trained_at(head: Any) -> dict[str, Any]:
    """What a site trained at: its LoRA rank (train-local --rank, info.site_rank; the global
    rank when not recorded) of the global rank, and the base's quantization (train-local
    --base-quantization; "none" when not recorded: a full-precision base)."""
    site_rank = head.site_rank()
    return {
        "rank": head.lora.rank if site_rank is None else site_rank,
        "global_rank": head.lora.rank,
        "base_quantization": head.info.get("base_quantization") or "none",
    }


def privacy_report(header: Any) -> dict[str, Any]:
    """A header's privacy ledgers as recorded, each with its epsilon recomputed from its history
    (privacy.accounting) and whether the two agree; `agree` covers them all."""
    from fedsrd_cli.privacy.ledger import Ledger, read_privacy

    parsed = read_privacy(header)

    def checked(ledger: Ledger) -> dict[str, Any]:
        recomputed = ledger.recomputed()
        return {
            **ledger.to_json(),
            "recomputed_epsilon": recomputed if math.isfinite(recomputed) else None,
            "agrees": ledger.agrees(),
        }

    report: dict[str, Any] = {}
    if parsed.record_level is not None:
        report["record_level"] = checked(parsed.record_level)
    if parsed.sites:
        report["sites"] = {site: checked(ledger) for site, ledger in sorted(parsed.sites.items())}
    if parsed.organisation_level is not None:
        report["organisation_level"] = checked(parsed.organisation_level)
    if parsed.organisation_dp is not None:
        report["organisation_dp"] = parsed.organisation_dp.to_json()
    if parsed.participants is not None:
        report["participants"] = {site: list(rounds) for site, rounds in sorted(parsed.participants.items())}
    ledgers = [
        report.get("record_level"),
        report.get("organisation_level"),
        *report.get("sites", {}).values(),
    ]
    report["agree"] = all(ledger["agrees"] for ledger in ledgers if ledger is not None)
    return report


def dense_tensors(artifact: Artifact) -> dict[str, torch.Tensor]:
    """Plain dense tensors: deltas under PEFT names (uploads, broadcasts); others as stored."""
    head = artifact.header
    if head.kind == "upload":
        return {name: artifact.upload_delta(name) for name in head.layout}
    if head.kind == "broadcast":
        out = {}
        for name, shape in head.layout.items():
            delta = torch.zeros(tuple(shape), dtype=torch.float32)
            delta[artifact.broadcast_mask(name)] = artifact.broadcast_values(name)
            out[name] = delta
        return out
    return dict(artifact.iter_tensors())


def is_artifact(path: Path) -> bool:
    """Whether a safetensors file carries fedsrd metadata (ArtifactError if it is unreadable)."""
    return "fedsrd.kind" in (open_safetensors(path).metadata() or {})


def describe_plain(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a safetensors file that is not a fedsrd artifact.

    kind is None; `what` says in words what the file looks like (PEFT adapter weights,
    an export, unpack's output, or just tensors).
    """
    path = Path(path)
    handle = open_safetensors(path)
    meta = dict(handle.metadata() or {})
    tensors = []
    for name in naming.sorted_modules(handle.keys()):  # noqa: SIM118 (safe_open is not a dict)
        piece = handle.get_slice(name)
        shape = [int(d) for d in piece.get_shape()]
        tensors.append({"name": name, "shape": shape, "dtype": piece.get_dtype(), "numel": math.prod(shape)})
    dtypes: dict[str, int] = {}
    for tensor in tensors:
        dtypes[tensor["dtype"]] = dtypes.get(tensor["dtype"], 0) + 1
    lora_tensors = sum(naming.parse_factor_key(t["name"]) is not None for t in tensors)
    report: dict[str, Any] = {
        "path": str(path),
        "kind": None,
        "format": "safetensors",
        "tensor_count": len(tensors),
        "parameters": sum(t["numel"] for t in tensors),
        "dtypes": dtypes,
        "lora_tensors": lora_tensors,
        "tensors": tensors,
        "metadata": meta,
        "bytes_on_disk": path.stat().st_size,
    }
    lineage = read_lineage(path) if lora_tensors else None
    if lineage is not None:
        report["exported_from"] = {
            "content_hash": lineage.exported_from,
            "round": lineage.round,
            "base_fingerprint": lineage.base_fingerprint or None,
            "recorded_in": lineage.source,
        }
    if "fedsrd.unpacked_from" in meta:
        report["unpacked_from"] = {
            "kind": meta["fedsrd.unpacked_from"],
            "content_hash": meta.get("fedsrd.source_hash"),
            "round": int(meta["fedsrd.round"]) if meta.get("fedsrd.round", "").isdigit() else None,
        }
    config_path = path.parent / ADAPTER_CONFIG
    if config_path.is_file():
        report["peft_config"] = _peft_config_summary(config_path)
    report["what"] = _what(report, lora_tensors)
    return report


def _peft_config_summary(config_path: Path) -> dict[str, Any]:
    """The LoRA fields of an adapter_config.json, or {"path", "error"} when it cannot be read."""
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return {"path": str(config_path), "error": f"unreadable ({err})"}
    keys = ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path", "task_type")
    return {"path": str(config_path), **{key: config.get(key) for key in keys}}


def _what(report: dict[str, Any], lora_tensors: int) -> str:
    if "unpacked_from" in report:
        source = report["unpacked_from"]
        return f"dense tensors unpacked from a fedsrd {source['kind']} (round {source['round']})"
    if not lora_tensors or lora_tensors != report["tensor_count"]:
        return "safetensors file (not a fedsrd artifact)"
    what = "PEFT LoRA adapter weights"
    lineage = report.get("exported_from")
    if lineage is None:
        return what + (f" ({ADAPTER_CONFIG} beside it)" if "peft_config" in report else "")
    if lineage["recorded_in"] == report["path"]:
        return f"{what} exported by fedsrd from a round-{lineage['round']} state"
    return f"{what} in a folder fedsrd exported from a round-{lineage['round']} state"
