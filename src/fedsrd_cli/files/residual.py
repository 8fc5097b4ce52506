"""A site's secure residual: what the public positions of its secure rounds have not yet sent.

A secure round below density 1 sends each module's owed projection O = P + R (d_out, r) at the
roster's public positions only; the site keeps the rest, O * (1 - positions), and adds it to
its next round's projection (error feedback, algorithms/secure.py). That rest is this file. It
never travels: it is written beside the masked upload, all or none, and read back by the same
site's next `sparsify --secure --residual-in`.

A safetensors file, metadata (all strings):

    fedsrd.kind            "secure_residual"
    fedsrd.format_version  "1"
    fedsrd.client_id       the site
    fedsrd.round           the round whose upload left it
    fedsrd.state           content hash of the global state that round started from
    fedsrd.a_factors       content hash of that state's A factors: the residual is a projection on
                           their row space, so it carries over only while they are unchanged

tensors `<module>.lora_B.weight.residual`, float32 (d_out, r), unweighted (1 / sites is applied
when it is sent). This module reads and writes the file; what a residual must match is
algorithms.secure's concern.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsrd_cli.errors import ArtifactError
from fedsrd_cli.files import naming
from fedsrd_cli.files.atomic import FileWrite
from fedsrd_cli.files.header import SECURE_RESIDUAL
from fedsrd_cli.files.safetensors_io import (
    TensorFile,
    all_finite,
    encode_safetensors,
    open_safetensors,
    tensor_layout,
)

KIND = SECURE_RESIDUAL
VERSION = "1"
SUFFIX = ".residual"


@dataclass(frozen=True)
class Residual:
    """client, round, state, a_factors: the file's metadata; modules: {module: (d_out, r) float32}."""

    client: str
    round: int
    state: str
    a_factors: str
    modules: Mapping[str, torch.Tensor]


def residual_key(module: str) -> str:
    """<module>.lora_B.weight.residual"""
    return naming.factor_key(module, "B") + SUFFIX


def residual_write(path: str | os.PathLike, residual: Residual) -> FileWrite:
    """The file of `residual`, as a FileWrite to place with the upload (atomic.write_files_atomic).
    ArtifactError for a value that is not finite or a tensor that is not 2-D."""
    tensors = {}
    for module, tensor in residual.modules.items():
        if tensor.dim() != 2 or not all_finite(tensor):
            raise ArtifactError(f"refusing to write the residual: {module}'s is not a finite 2-D tensor")
        tensors[residual_key(module)] = tensor.detach().to(torch.float32).contiguous()
    metadata = {
        "fedsrd.kind": KIND,
        "fedsrd.format_version": VERSION,
        "fedsrd.client_id": residual.client,
        "fedsrd.round": str(residual.round),
        "fedsrd.state": residual.state,
        "fedsrd.a_factors": residual.a_factors,
    }
    return FileWrite(Path(path), encode_safetensors(tensors, metadata))


def read_residual(path: str | os.PathLike) -> Residual:
    """A residual file, its structure checked (ArtifactError: not one, malformed, not finite)."""
    path = Path(path)
    handle = open_safetensors(path)
    meta = handle.metadata() or {}
    shapes, dtypes = tensor_layout(handle)
    del handle
    if meta.get("fedsrd.kind") != KIND:
        found = meta.get("fedsrd.kind")
        raise ArtifactError(
            f"{path}: is {'a ' + found if found else 'no fedsrd'} file, not a secure residual"
            " (the file `sparsify --secure --residual-out` wrote)"
        )
    if meta.get("fedsrd.format_version") != VERSION:
        raise ArtifactError(f"{path}: a secure residual of version {meta.get('fedsrd.format_version')}")
    try:
        client, state, a_factors = meta["fedsrd.client_id"], meta["fedsrd.state"], meta["fedsrd.a_factors"]
        round_index = int(meta["fedsrd.round"])
    except (KeyError, ValueError) as err:
        raise ArtifactError(f"{path}: malformed secure residual metadata ({err})") from None
    reader = TensorFile.open(path)
    modules: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        parsed = naming.parse_factor_key(name.removesuffix(SUFFIX))
        if not name.endswith(SUFFIX) or parsed is None or parsed[1] != "B":
            raise ArtifactError(f"{path}: unexpected tensor {name!r} in a secure residual")
        if dtypes[name] != torch.float32 or len(shape) != 2:
            raise ArtifactError(
                f"{path}: {name} should be float32 (d_out, r), not {dtypes[name]} {list(shape)}"
            )
        tensor = reader.read(name, torch.float32, shape)
        if not all_finite(tensor):
            raise ArtifactError(f"{path}: {name} contains NaN or Inf")
        modules[parsed[0]] = tensor
    return Residual(client, round_index, state, a_factors, modules)
