"""model_spec: which path is a base model (directory or GGUF file), its fingerprint and LoRA modules."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from fedsrd_cli.errors import DataError
from fedsrd_cli.files.model_spec import (
    base_fingerprint,
    fingerprint_base,
    lora_module_shapes,
    read_model_config,
    resolve_base,
)


def test_gguf_fingerprint_is_the_sha256_of_its_bytes(tiny_gguf: Path) -> None:
    expected = "sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert fingerprint_base(tiny_gguf) == expected
    source = resolve_base(tiny_gguf)
    assert source.is_gguf and source.folder == str(tiny_gguf.parent)
    assert source.pretrained_kwargs() == {"gguf_file": str(tiny_gguf.resolve())}


def test_gguf_fingerprint_follows_the_bytes(tiny_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(tiny_gguf, copy)
    assert fingerprint_base(copy) == fingerprint_base(tiny_gguf)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    copy.write_bytes(bytes(data))
    assert fingerprint_base(copy) != fingerprint_base(tiny_gguf)


def test_directory_fingerprint_is_unchanged(tiny_model: Path) -> None:
    assert fingerprint_base(tiny_model) == base_fingerprint(read_model_config(tiny_model))
    assert not resolve_base(tiny_model).is_gguf
    assert resolve_base(tiny_model).pretrained_kwargs() == {}


def test_gguf_and_directory_give_the_same_lora_modules(tiny_model: Path, tiny_gguf: Path) -> None:
    from_dir = lora_module_shapes(tiny_model, "all-linear", 4, 8.0)
    from_gguf = lora_module_shapes(tiny_gguf, "all-linear", 4, 8.0)
    assert from_gguf == from_dir
    assert len(from_dir[1]) == 2 * 7  # q, k, v, o, gate, up, down per layer


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "no such file or directory (expected a model directory"),
        (lambda d: _write(d / "pytorch_model.bin", b"PK\x03\x04"), "not a model directory or a GGUF"),
        (lambda d: _write(d / "fake.gguf", b"GGU"), "not a model directory or a GGUF"),
        (lambda d: _mkdir(d / "empty"), "no config.json (expected a model saved by save_pretrained)"),
        (lambda d: _write(_mkdir(d / "bad") / "config.json", b"{").parent, "unreadable model config"),
    ],
)
def test_a_path_that_is_no_model_gives_one_line(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        resolve_base(path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(path))
    with pytest.raises(DataError):
        lora_module_shapes(path, "all-linear", 4, 8.0)


def test_a_gguf_transformers_cannot_read_is_a_data_error(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert fingerprint_base(path).startswith("sha256:")
    with pytest.raises(DataError, match="transformers cannot read this model config"):
        lora_module_shapes(path, "all-linear", 4, 8.0)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_config_json_of_a_directory_is_still_required(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert fingerprint_base(tmp_path) == base_fingerprint({"model_type": "llama", "hidden_size": 8})
