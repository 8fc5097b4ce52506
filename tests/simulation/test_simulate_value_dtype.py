"""simulate --value-dtype int8|int4: the uploads' values, passed through to every client's
sparsify (and to the broadcast unless --download-value-dtype says otherwise). A simulated round
of int4 uploads: test_simulate.py, beside its fixtures."""

from __future__ import annotations

import pytest

from fedsrd_cli.errors import UsageError
from fedsrd_cli.simulation.config import SimulateConfig

GOOD = dict(
    base="m", client_data=("a", "b"), client_ids=("a", "b"), eval_data=("e",), eval_names=("e",),
    algorithms=("fedsrd",), rounds=1,
)  # fmt: skip


@pytest.mark.parametrize("value_dtype", ["int8", "int4"])
def test_simulate_passes_a_quantized_value_dtype_to_the_uploads(value_dtype):
    config = SimulateConfig(**GOOD, value_dtype=value_dtype)
    assert config.sparsify_config(0.85).value_dtype == value_dtype
    assert config.broadcast_config(0.8, 0).value_dtype == value_dtype
    both = SimulateConfig(**GOOD, value_dtype=value_dtype, download_value_dtype="bf16")
    assert both.sparsify_config(0.85).value_dtype == value_dtype
    assert both.broadcast_config(0.8, 0).value_dtype == "bf16"


def test_simulate_refuses_quantized_uploads_where_they_cannot_be_sent():
    with pytest.raises(UsageError, match="--value-dtype must be one of"):
        SimulateConfig(**GOOD, value_dtype="int2")
    with pytest.raises(UsageError, match="--secure uploads are masked int32 sums"):
        SimulateConfig(**{**GOOD, "algorithms": ("fedsrd-e",)}, value_dtype="int4", secure=True)
