"""Quantized upload files (int8 / int4 codes with X.scales): round trip, format version and the
layout refusals, each one line with nothing written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.config import SparsifyConfig
from fedsrd_cli.errors import ArtifactError
from fedsrd_cli.files import header as header_module
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.header import Header
from fedsrd_cli.files.safetensors_io import open_safetensors

from ..conftest import make_global, make_local


def _payload(tmp_path: Path, value_dtype: str, base_sparsity: float = 0.55, method: str = "fedsrd"):
    g0, local = tmp_path / "g0.safetensors", tmp_path / "local.safetensors"
    if not g0.exists():
        make_local(make_global(g0), local, seed=3)
    config = SparsifyConfig(base_sparsity, value_dtype=value_dtype)
    return get_algorithm(method).upload(read_artifact(g0), read_local(local), "c0", 10, config)


@pytest.mark.parametrize("value_dtype", ["int8", "int4"])
@pytest.mark.parametrize("method", ["fedsrd", "fedavg"])
def test_a_quantized_upload_round_trips_through_write_and_read(tmp_path, value_dtype, method):
    payload = _payload(tmp_path, value_dtype, method=method)
    path = tmp_path / "up.safetensors"
    written = write_artifact(path, payload.header, payload.tensors)
    back = read_artifact(path, "upload")
    assert back.header == written and back.header.info["value_dtype"] == value_dtype
    assert set(back.names) == set(payload.tensors)
    for name, tensor in payload.tensors.items():
        assert back.dtypes[name] == tensor.dtype and torch.equal(back.tensor(name), tensor)
    code_dtype = torch.int8 if value_dtype == "int8" else torch.uint8
    for name in back.header.layout:
        assert back.dtypes[naming.values_key(name)] == code_dtype
        assert back.dtypes[naming.scales_key(name)] == torch.float32
    assert open_safetensors(path).metadata()["fedsrd.format_version"] == "4"


def test_only_a_quantized_upload_is_format_version_4(tmp_path):
    plain = _payload(tmp_path, "bf16").header
    quantized = _payload(tmp_path, "int4").header
    assert plain.to_metadata()["fedsrd.format_version"] == "2"  # default uploads as before
    assert quantized.to_metadata()["fedsrd.format_version"] == "4"
    meta = replace(quantized, content_hash="sha256:" + "0" * 64).to_metadata()
    with pytest.raises(ArtifactError, match="only an upload with int8 or int4 values"):
        Header.from_metadata({**meta, "fedsrd.format_version": "2"}, "f")
    meta = replace(plain, content_hash="sha256:" + "0" * 64).to_metadata()
    with pytest.raises(ArtifactError, match="only an upload with int8 or int4 values"):
        Header.from_metadata({**meta, "fedsrd.format_version": "4"}, "f")


def test_a_reader_without_version_4_refuses_a_quantized_upload(tmp_path, monkeypatch):
    payload = _payload(tmp_path, "int8")
    path = tmp_path / "up.safetensors"
    write_artifact(path, payload.header, payload.tensors)
    monkeypatch.setattr(header_module, "READABLE_FORMAT_VERSIONS", (1, 2, 3))  # an older fedsrd
    with pytest.raises(ArtifactError, match=r"format version 4, .*upgrade fedsrd"):
        read_artifact(path)


def _sparse_name(payload) -> str:
    return next(n for n in payload.header.layout if naming.mask_key(n) in payload.tensors)


@pytest.mark.parametrize(
    "value_dtype, break_it, message",
    [
        (
            "int4",
            lambda t, n: {**t, naming.values_key(n): t[naming.values_key(n)].view(torch.int8)},
            r"\.values of an int4 upload should be 1-D U8, not I8",
        ),
        (
            "int8",
            lambda t, n: {**t, naming.values_key(n): t[naming.values_key(n)].to(torch.bfloat16)},
            r"\.values of an int8 upload should be 1-D I8, not BF16",
        ),
        (
            "int4",
            lambda t, n: {**t, naming.scales_key(n): t[naming.scales_key(n)][:-1]},
            r"\.scales should hold \d+ scales \(one per 64 values of .*\.values\), not \d+",
        ),
        (
            "int8",
            lambda t, n: {**t, naming.scales_key(n): torch.cat([t[naming.scales_key(n)], torch.ones(1)])},
            r"\.scales should hold \d+ scales",
        ),
        (
            "int8",
            lambda t, n: {k: v for k, v in t.items() if k != naming.scales_key(n)},
            r"\.scales is missing \(int8 values need their scales\)",
        ),
        (
            "int4",
            lambda t, n: {**t, naming.scales_key(n): t[naming.scales_key(n)].double()},
            r"\.scales should be 1-D F32, not F64",
        ),
    ],
)
def test_a_malformed_quantized_upload_is_refused_in_one_line_and_not_written(
    tmp_path, value_dtype, break_it, message
):
    payload = _payload(tmp_path, value_dtype)
    name = _sparse_name(payload)
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ArtifactError, match=message) as caught:
        write_artifact(path, payload.header, break_it(payload.tensors, name))
    assert "\n" not in str(caught.value) and name in str(caught.value)
    assert not path.exists()


def test_codes_that_do_not_fit_the_mask_are_refused_on_read(tmp_path):
    payload = _payload(tmp_path, "int8")
    name = _sparse_name(payload)
    tensors = dict(payload.tensors)
    values = tensors[naming.values_key(name)]
    assert values.numel() % 64 != 1  # one code fewer keeps the block count: the layout passes
    tensors[naming.values_key(name)] = values[: values.numel() - 1]
    path = tmp_path / "short.safetensors"
    write_artifact(path, payload.header, tensors)  # the layout alone cannot see the mask's count
    with pytest.raises(ArtifactError, match=f"the mask of {name} keeps") as caught:
        read_artifact(path)
    assert "\n" not in str(caught.value)


def test_a_dense_quantized_upload_holds_every_code(tmp_path):
    payload = _payload(tmp_path, "int4", method="fedavg")
    name = next(iter(payload.header.layout))
    rows, cols = payload.header.layout[name]
    assert payload.tensors[naming.values_key(name)].shape == ((rows * cols + 1) // 2,)
    tensors = {**payload.tensors, naming.values_key(name): payload.tensors[naming.values_key(name)][:-1]}
    with pytest.raises(ArtifactError, match=f"dense {name}.values of an int4 upload should hold"):
        write_artifact(tmp_path / "bad.safetensors", payload.header, tensors)
