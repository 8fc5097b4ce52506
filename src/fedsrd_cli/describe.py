"""Reports on artifacts: what `inspect` shows and what `unpack` writes.

Traffic is reported two ways: bytes on disk (what actually travels) and the
paper's accounting, where a sparse tensor costs fp32 values plus a 1-bit mask per
element and a dense tensor costs fp32 values; both are compared with dense fp32
LoRA factors (what FedAvg sends each way).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedsrd_cli import naming
from fedsrd_cli.artifacts import Artifact

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
    if head.kind in ("upload", "broadcast"):
        for name, shape in sorted(head.layout.items()):
            numel = math.prod(shape)
            values_shape = artifact.shapes[naming.values_key(name)]
            dense = list(values_shape) == list(shape) or (
                head.kind == "broadcast" and head.download_sparsity == 0.0
            )  # a download-sparsity-0 broadcast sends every element: no mask is needed
            kept = None if dense else values_shape[0]
            paper_total += paper_bytes(numel, kept)
            logical_numel += numel
            tensors.append(
                {
                    "name": name,
                    "shape": shape,
                    "nonzeros": numel if kept is None else kept,
                    "density": 1.0 if kept is None else kept / numel,
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
    if head.kind == "upload":
        report.update(client_id=head.client_id, num_samples=head.num_samples)
    if head.kind == "broadcast":
        report.update(
            result_hash=head.result_hash,
            aggregate_hash=head.aggregate_hash,
            seed=head.seed,
            download_sparsity=head.download_sparsity,
        )
    if head.info:
        report["info"] = head.info
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
            delta[artifact.broadcast_mask(name)] = artifact.tensor(naming.values_key(name)).float()
            out[name] = delta
        return out
    return dict(artifact.iter_tensors())
