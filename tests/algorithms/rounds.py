"""Helpers for algorithm tests: locals, uploads and whole rounds through the library API."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import Artifact, read_artifact, write_artifact

from ..conftest import make_local

_serial = itertools.count()


def write(payload, path: Path) -> Path:
    write_artifact(path, payload.header, payload.tensors)
    return path


def train_only(global_file: Path, local_file: Path, factor: str) -> Path:
    """Rewrite a local state so only `factor` ("A" or "B") differs from the global state, as
    if the other factor had been frozen in training."""
    state = read_artifact(global_file, kind="state")
    local = read_artifact(local_file, kind="state")
    tensors = {
        name: local.tensor(name) if name.endswith(f"lora_{factor}.weight") else state.tensor(name)
        for name in local.names
    }
    out = local_file.with_name(f"{local_file.stem}-only-{factor}.safetensors")
    write_artifact(out, replace(local.header, content_hash=""), tensors)
    return out


def freeze_a(global_file: Path, local_file: Path) -> Path:
    """Rewrite a local state with every A factor reset to the global one (FFA-LoRA training)."""
    return train_only(global_file, local_file, "B")


def make_locals(tmp: Path, global_file: Path, n: int, tag: str, frozen_a: bool = False) -> list[Path]:
    paths = []
    for i in range(n):
        path = make_local(
            global_file, tmp / f"local-{tag}-{i}.safetensors", seed=200 + i, num_samples=4 + 3 * i
        )
        paths.append(freeze_a(global_file, path) if frozen_a else path)
    return paths


def upload(tmp: Path, method: str, global_file: Path, local_file: Path, client: str, config=None) -> Artifact:
    algorithm = get_algorithm(method)
    global_state = read_artifact(global_file)
    local = read_local(local_file)
    num_samples = local.header.num_samples if local.header else 0
    payload = algorithm.upload(
        global_state, local, client, num_samples, config or SparsifyConfig(value_dtype="fp32")
    )
    return read_artifact(
        write(payload, tmp / f"upload-{method}-{client}-{global_file.stem}-{next(_serial)}.safetensors")
    )


# The paper's one-factor download: exact pseudo-inverse, DARE rescale, B odd / A even.
# Rounds here carry fp32 values (the default is bf16), so dense fp32/fp64 references are exact;
# tests/algorithms/test_value_dtype.py covers bf16.
PAPER_DOWNLOAD = {"damping": 0.0, "download_fit": "dare", "factor_choice": "parity"}


def run_round(
    tmp: Path,
    method: str,
    global_file: Path,
    local_files: list[Path],
    weighting: str = "uniform",
    download_sparsity: float | None = None,
    tag: str = "r",
    download: dict | None = None,
):
    """(uploads, aggregate, broadcast, next state) of one round, all read back from disk.

    download: BroadcastConfig settings (damping, download_fit, factor_choice) other than the
    defaults, e.g. PAPER_DOWNLOAD."""
    algorithm = get_algorithm(method)
    global_state = read_artifact(global_file)
    uploads = [upload(tmp, method, global_file, p, f"c{i}") for i, p in enumerate(local_files)]
    agg = read_artifact(
        write(
            algorithm.aggregate(global_state, uploads, AggregateConfig(method, weighting)),
            tmp / f"agg-{method}-{tag}.safetensors",
        )
    )
    sparsity = algorithm.default_download_sparsity if download_sparsity is None else download_sparsity
    bc, nxt = algorithm.broadcast(
        global_state, agg, BroadcastConfig(sparsity, seed=5, value_dtype="fp32", **(download or {}))
    )
    bc_art = read_artifact(write(bc, tmp / f"bc-{method}-{tag}.safetensors"))
    next_file = write(nxt, tmp / f"g-{method}-{tag}.safetensors")
    return uploads, agg, bc_art, next_file


def local_factors(local_file: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a local state, float64."""
    a, b = read_artifact(local_file).factors(module)
    return a.double(), b.double()


def state_factors(state_file: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = read_artifact(state_file).factors(module)
    return a.double(), b.double()


def factor_names(artifact: Artifact, factor: str) -> list[str]:
    return [n for n in artifact.header.layout if naming.parse_factor_key(n)[1] == factor]
