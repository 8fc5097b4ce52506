"""Without --dp-* every file is, bit for bit, what fedsrd wrote before privacy existed.

The digest below was computed from the files of this same round written by the commit before
the privacy work (170b35e): one round of FedSRD, FedSRD-e, FedAvg and FFA-LoRA with three
clients, every local state, upload, aggregate, broadcast and next state (37 files).

Updated on 2026-11-30: the one-factor broadcasts (FedSRD, FedSRD-e) now record
info.one_factor_residual. Comparing this round's 37 files with those of 9ceea1b showed that
this key is the only change: every tensor, and every other file, is byte for byte the same.

Updated on 2026-12-06: every upload now records info.fidelity (its reconstruction against the
site's exact update) and every aggregate info.upload_fidelity (the uploads' figures). Comparing
this round's 37 files with those of b08b9db showed that these two keys, in the 12 uploads and
the 4 aggregates, are the only change: every tensor and every other header field is the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact, write_artifact

from ..conftest import make_global

BEFORE_PRIVACY = "2edbe11ea946b099ddd0b5acbd3f11718079134686dabd5629f362d50b538839"


def write_round(out: Path) -> list[Path]:
    g0 = make_global(out / "g0.safetensors")
    g = read_artifact(g0)
    for method in ("fedsrd", "fedsrd-e", "fedavg", "ffa-lora"):
        algorithm = get_algorithm(method)
        uploads = []
        for i in range(3):
            generator = torch.Generator().manual_seed(i + 1)
            tensors = {}
            for name, tensor in g.iter_tensors():
                frozen = method == "ffa-lora" and ".lora_A." in name
                tensors[name] = (
                    tensor if frozen else tensor + torch.randn(tensor.shape, generator=generator) * 0.01
                )
            header = replace(
                g.header, parent_hash=g.header.content_hash, num_samples=10, info={}, client_id=f"c{i}"
            )
            local = out / f"{method}-local{i}.safetensors"
            write_artifact(local, header, tensors)
            upload = algorithm.upload(g, read_local(local), f"c{i}", 10, SparsifyConfig())
            write_artifact(out / f"{method}-up{i}.safetensors", upload.header, upload.tensors)
            uploads.append(read_artifact(out / f"{method}-up{i}.safetensors"))
        aggregate = algorithm.aggregate(g, uploads, AggregateConfig(method=method))
        write_artifact(out / f"{method}-agg.safetensors", aggregate.header, aggregate.tensors)
        agg = read_artifact(out / f"{method}-agg.safetensors")
        broadcast, state = algorithm.broadcast(
            g, agg, BroadcastConfig(download_sparsity=algorithm.default_download_sparsity, seed=7)
        )
        write_artifact(out / f"{method}-bc.safetensors", broadcast.header, broadcast.tensors)
        write_artifact(out / f"{method}-g1.safetensors", state.header, state.tensors)
    return sorted(out.iterdir())


def test_files_without_dp_are_byte_for_byte_unchanged(tmp_path):
    files = write_round(tmp_path)
    assert len(files) == 37
    listing = "\n".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}" for f in files)
    assert hashlib.sha256(listing.encode()).hexdigest() == BEFORE_PRIVACY
    assert not any(b"fedsrd.privacy" in f.read_bytes()[:4096] for f in files)
