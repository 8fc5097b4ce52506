"""The safetensors bytes: the content hash and the finiteness check (safetensors_io.py)."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.files.safetensors_io import all_finite, content_hash


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_finds_any_nan_or_inf(dtype):
    tensor = torch.randn(50, 40).to(dtype)
    assert all_finite(tensor) and all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = tensor.clone()
        broken[37, 3] = bad
        assert not all_finite(broken)
