"""Reading, validating, hashing and writing artifacts."""

from __future__ import annotations

import os
import resource
import time

import pytest
import torch

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import ArtifactError, MismatchError, OutputExistsError
from fedsrd_cli.files.artifacts import Header, read_artifact, serialize, write_artifact
from fedsrd_cli.files.atomic import write_bytes_atomic
from fedsrd_cli.files.safetensors_io import content_hash, encode_safetensors

from ..conftest import make_global

LORA = LoraSpec(2, 4.0, ("q_proj",))


def _state(tensors=None) -> tuple[Header, dict]:
    tensors = tensors or {
        "m.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "m.lora_B.weight": torch.ones(4, 2),
    }
    return Header(kind="state", round=0, lora=LORA, base_fingerprint="sha256:00"), tensors


def test_round_trip_keeps_header_and_tensors(tmp_path):
    header, tensors = _state()
    written = write_artifact(tmp_path / "s.safetensors", header, tensors)
    art = read_artifact(tmp_path / "s.safetensors", kind="state")
    assert art.header == written
    assert art.header.content_hash == content_hash(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(art.tensor(name), tensor)


def test_files_are_canonical_and_readable_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    header, tensors = _state()
    _, parts_a = serialize(header, tensors)
    _, parts_b = serialize(header, dict(reversed(list(tensors.items()))))
    assert b"".join(parts_a) == b"".join(parts_b)
    write_artifact(tmp_path / "s.safetensors", header, tensors)
    loaded = load_file(tmp_path / "s.safetensors")
    assert torch.equal(loaded["m.lora_B.weight"], tensors["m.lora_B.weight"])


def test_flipped_data_byte_is_a_hash_mismatch(tmp_path):
    path = make_global(tmp_path / "g.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        read_artifact(path)


def test_truncated_file_is_refused(tmp_path):
    path = make_global(tmp_path / "g.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        read_artifact(path)


def test_wrong_kind_is_a_mismatch(tmp_path):
    path = make_global(tmp_path / "g.safetensors")
    with pytest.raises(MismatchError, match="is a state artifact, expected an upload"):
        read_artifact(path, kind="upload")


def test_nan_is_refused_on_write_and_on_read(tmp_path):
    header, tensors = _state()
    tensors["m.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        write_artifact(tmp_path / "s.safetensors", header, tensors)
    assert not (tmp_path / "s.safetensors").exists()
    # A file written by something else, with a correct hash over the bad values:
    meta = {**header.to_metadata(), "fedsrd.content_hash": content_hash(tensors)}
    (tmp_path / "bad.safetensors").write_bytes(b"".join(encode_safetensors(tensors, meta)))
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        read_artifact(tmp_path / "bad.safetensors")


def test_layout_rules_are_checked_before_writing(tmp_path):
    header, tensors = _state()
    del tensors["m.lora_B.weight"]
    with pytest.raises(ArtifactError, match="lacks lora_A or lora_B"):
        write_artifact(tmp_path / "s.safetensors", header, tensors)
    header, tensors = _state()
    tensors["m.lora_A.weight"] = torch.zeros(3, 3)
    with pytest.raises(ArtifactError, match="not rank 2"):
        write_artifact(tmp_path / "s.safetensors", header, tensors)


def test_atomic_write_never_replaces_without_force_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    write_bytes_atomic(target, b"first", force=False)
    with pytest.raises(OutputExistsError, match="--force"):
        write_bytes_atomic(target, b"second", force=False)
    assert target.read_bytes() == b"first"
    write_bytes_atomic(target, b"third", force=True)
    assert target.read_bytes() == b"third"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_file_changed_after_it_was_read_is_refused_not_read(tmp_path):
    path = make_global(tmp_path / "g.safetensors")
    artifact = read_artifact(path)
    name = artifact.names[0]
    original = artifact.tensor(name)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes, a later modification time
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ArtifactError, match="changed while it was being read"):
        artifact.tensor(name)
    assert original.shape == artifact.shapes[name]


def test_many_artifacts_hold_no_open_files(tmp_path):
    """Reading keeps no descriptor or mapping open: 60 artifacts read under a limit of
    (files open now + 8)."""
    paths = [make_global(tmp_path / f"g{i}.safetensors", seed=i) for i in range(60)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        artifacts = [read_artifact(p) for p in paths]
        assert all(a.tensor(a.names[0]).numel() > 0 for a in artifacts)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
