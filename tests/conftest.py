"""Shared fixtures: tiny synthetic global states and locally 'trained' adapters.

Nothing here downloads anything or imports transformers: shapes are given
directly, as a 2-layer Llama-like model would have them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms.protocol import initial_state
from fedsrd_cli.artifacts import read_artifact, write_artifact
from fedsrd_cli.config import LoraSpec

# A 2-layer toy decoder: q, v (d x d) and an MLP up/down pair, d = 32, intermediate 48.
TOY_SHAPES = {
    f"base_model.model.model.layers.{i}.{name}": shape
    for i in range(2)
    for name, shape in {
        "self_attn.q_proj": (32, 32),
        "self_attn.v_proj": (16, 32),
        "mlp.up_proj": (48, 32),
        "mlp.down_proj": (32, 48),
    }.items()
}
TOY_FINGERPRINT = "sha256:" + "ab" * 32


def make_global(path: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    """Write a round-0 global state for TOY_SHAPES."""
    lora = LoraSpec(rank, alpha, ("down_proj", "q_proj", "up_proj", "v_proj"))
    payload = initial_state(TOY_SHAPES, lora, seed, TOY_FINGERPRINT)
    write_artifact(path, payload.header, payload.tensors)
    return path


def make_local(global_path: Path, path: Path, seed: int, scale: float = 0.01, num_samples: int = 10) -> Path:
    """Simulated local training: add N(0, scale^2) noise to every A and B of the global state.

    Each matrix also gets a few larger entries (heavy tails), as real LoRA deltas have.
    """
    state = read_artifact(global_path, kind="state")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in state.iter_tensors():
        noise = torch.randn(tensor.shape, generator=generator) * scale
        spikes = torch.rand(tensor.shape, generator=generator) < 0.02
        tensors[name] = tensor + noise + spikes * noise * 10
    header = replace(state.header, parent_hash=state.header.content_hash, num_samples=num_samples, info={})
    write_artifact(path, header, tensors)
    return path


@pytest.fixture
def global_path(tmp_path: Path) -> Path:
    return make_global(tmp_path / "global-r0.safetensors")


@pytest.fixture
def locals_for(tmp_path: Path):
    """Factory: locals_for(global_path, n) -> n simulated local states trained from it."""

    def build(global_file: Path, n: int = 3, scale: float = 0.01) -> list[Path]:
        return [
            make_local(
                global_file,
                tmp_path / f"local-{global_file.stem}-{i}.safetensors",
                seed=i + 1,
                scale=scale,
                num_samples=10 * (i + 1),
            )
            for i in range(n)
        ]

    return build
