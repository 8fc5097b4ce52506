"""The header: what files a reader refuses or still reads by their metadata (header.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import ArtifactError
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.files.header import Header
from fedsrd_cli.files.safetensors_io import content_hash, encode_safetensors

LORA = LoraSpec(2, 4.0, ("q_proj",))


def _state() -> tuple[Header, dict]:
    tensors = {
        "m.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "m.lora_B.weight": torch.ones(4, 2),
    }
    return Header(kind="state", round=0, lora=LORA, base_fingerprint="sha256:00"), tensors


def test_plain_safetensors_and_future_versions_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ArtifactError, match="not a fedsrd artifact"):
        read_artifact(tmp_path / "plain.safetensors")
    header, tensors = _state()
    meta = {**header.to_metadata(), "fedsrd.format_version": "99"}
    (tmp_path / "v99.safetensors").write_bytes(b"".join(encode_safetensors(tensors, meta)))
    with pytest.raises(ArtifactError, match="format version 99"):
        read_artifact(tmp_path / "v99.safetensors")


def test_version_1_files_still_read(tmp_path):
    """Files written before coded positions (format version 1) read as they did."""
    header, tensors = _state()
    header = replace(header, content_hash=content_hash(tensors))
    assert header.to_metadata()["fedsrd.format_version"] == "2"
    meta = {**header.to_metadata(), "fedsrd.format_version": "1"}
    (tmp_path / "v1.safetensors").write_bytes(b"".join(encode_safetensors(tensors, meta)))
    state = read_artifact(tmp_path / "v1.safetensors")
    assert state.header.kind == "state"
    for name, tensor in tensors.items():
        assert torch.equal(state.tensor(name), tensor)


def test_malformed_metadata_is_an_artifact_error(tmp_path):
    header, tensors = _state()
    meta = {**header.to_metadata(), "fedsrd.lora": json.dumps({"r": "x"})}
    (tmp_path / "m.safetensors").write_bytes(b"".join(encode_safetensors(tensors, meta)))
    with pytest.raises(ArtifactError, match="malformed fedsrd metadata"):
        read_artifact(tmp_path / "m.safetensors")
