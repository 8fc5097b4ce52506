"""count_kept against the dense seeded mask."""

from __future__ import annotations

import pytest

from fedsrd_cli.math.masks import count_kept, seeded_keep_mask


@pytest.mark.parametrize(
    ("numel", "p", "chunk"), [(1, 0.0, 7), (1000, 0.8, 7), (4097, 0.5, 1024), (50000, 0.999, 2**15)]
)
def test_count_matches_dense_mask(numel: int, p: float, chunk: int) -> None:
    dense = int(seeded_keep_mask(42, "layer.lora_B.weight", (numel,), p).sum())
    assert count_kept(42, "layer.lora_B.weight", numel, p, chunk=chunk) == dense


def test_refuses_more_than_2_32_elements() -> None:
    with pytest.raises(ValueError):
        count_kept(0, "x", 2**32, 0.5)
