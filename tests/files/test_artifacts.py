"""Reading, validating, hashing and writing artifacts."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import replace

import pytest
import torch

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import ArtifactError, MismatchError, OutputExistsError
from fedsrd_cli.files.artifacts import (
    Header,
    content_hash,
    encode_safetensors,
    read_artifact,
    serialize,
    write_artifact,
)
from fedsrd_cli.files.atomic import write_bytes_atomic

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


def test_content_hash_is_sensitive_to_names_dtypes_shapes_and_values():
    base = {"x": torch.zeros(2, 3)}
    variants = [
        {"y": torch.zeros(2, 3)},
        {"x": torch.zeros(2, 3, dtype=torch.float16)},
        {"x": torch.zeros(3, 2)},
        {"x": torch.zeros(2, 3).index_fill_(1, torch.tensor([0]), 1.0)},
    ]
    hashes = {content_hash(base)} | {content_hash(v) for v in variants}
    assert len(hashes) == 5


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_finds_any_nan_or_inf(dtype):
    from fedsrd_cli.files.artifacts import all_finite

    tensor = torch.randn(50, 40).to(dtype)
    assert all_finite(tensor) and all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = tensor.clone()
        broken[37, 3] = bad
        assert not all_finite(broken)
