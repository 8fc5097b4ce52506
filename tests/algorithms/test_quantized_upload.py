"""sparsify --value-dtype int8 / int4: uploads carry block codes and float32 scales.

Each test compares what a reader decodes against a plain dense reference built from an fp32
upload of the same local state (the same mask: the value dtype does not change what is kept).
"""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.protocol import apply_broadcast
from fedsrd_cli.algorithms.steps import client_factors
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.errors import UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.math.quantize import QUANTIZED_BITS, dequantize_blocks, quantize_blocks

from ..conftest import make_global
from .rounds import make_locals, upload, write


def _reference_delta(fp32, name: str, value_dtype: str) -> torch.Tensor:
    """The dense delta (rows, cols) an int8 / int4 upload must decode to: the fp32 upload's kept
    values, quantized and dequantized in blocks of 64, scattered into its mask (or, dense, every
    element row-major)."""
    shape = tuple(fp32.header.layout[name])
    kept = fp32.upload_kept(name)
    values = fp32.tensor(naming.values_key(name)).reshape(-1)  # (kept,) or (rows * cols,)
    codes, scales = quantize_blocks(values, QUANTIZED_BITS[value_dtype])
    decoded = dequantize_blocks(codes, scales)
    if kept is None:
        return decoded.reshape(shape)
    dense = torch.zeros(shape)
    dense[kept] = decoded
    return dense


@pytest.mark.parametrize("method", ["fedsrd", "fedavg", "fed-dare"])
@pytest.mark.parametrize("base_sparsity", [0.55, 0.85])
def test_a_quantized_upload_decodes_to_its_dequantized_values_in_the_mask(tmp_path, method, base_sparsity):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "q")
    fp32 = upload(tmp_path, method, g0, local, "c0", SparsifyConfig(base_sparsity, value_dtype="fp32"))
    odd = 0
    for value_dtype in ("int8", "int4"):
        up = upload(tmp_path, method, g0, local, "c0", SparsifyConfig(base_sparsity, value_dtype=value_dtype))
        assert up.header.layout == fp32.header.layout
        assert up.header.info["value_dtype"] == value_dtype
        assert up.header.info["sparsify"]["value_dtype"] == value_dtype
        state = read_artifact(g0)
        for module in state.modules():
            clients = client_factors(state, [up], module)  # what aggregate reads
            assert clients.module == module
        for name in fp32.header.layout:
            reference = _reference_delta(fp32, name, value_dtype)
            assert torch.equal(up.upload_delta(name), reference)
            kept = fp32.upload_kept(name)
            assert up.upload_value_count(name) == (None if kept is None else int(kept.sum()))
            assert up.mask_storage(name) == fp32.mask_storage(name)
            odd += value_dtype == "int4" and kept is not None and int(kept.sum()) % 2 == 1
    if method != "fedavg":
        assert odd > 0  # an odd count, whose int4 codes leave the last high nibble 0, was read back


def test_the_fidelity_of_a_quantized_upload_is_that_of_the_values_sent(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local_path,) = make_locals(tmp_path, g0, 1, "f")
    state, local = read_artifact(g0), read_artifact(local_path)
    for value_dtype in ("int8", "int4"):
        up = upload(tmp_path, "fedsrd", g0, local_path, "c0", SparsifyConfig(0.55, value_dtype=value_dtype))
        inner = norm_e = norm_d = 0.0
        for module in state.modules():
            a, b = (t.double() for t in state.factors(module))
            a_new, b_new = (t.double() for t in local.factors(module))
            delta_a = up.upload_delta(naming.factor_key(module, "A"))
            delta_b = up.upload_delta(naming.factor_key(module, "B"))
            sent_a = a if delta_a is None else a + delta_a.double()
            sent_b = b if delta_b is None else b + delta_b.double()
            exact = b_new @ a_new - b @ a  # (d_out, d_in)
            sent = sent_b @ sent_a - b @ a
            inner += float((exact * sent).sum())
            norm_e += float((sent * sent).sum())
            norm_d += float((exact * exact).sum())
        fidelity = up.header.info["fidelity"]
        assert fidelity["cosine"] == pytest.approx(inner / (norm_e * norm_d) ** 0.5, abs=2e-6)
        assert fidelity["norm_ratio"] == pytest.approx((norm_e / norm_d) ** 0.5, abs=2e-6)


def test_a_round_of_int4_uploads_applies_bit_for_bit(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    state = read_artifact(g0)
    algorithm = get_algorithm("fedsrd")
    uploads = [
        upload(tmp_path, "fedsrd", g0, p, f"c{i}", SparsifyConfig(0.55, value_dtype="int4"))
        for i, p in enumerate(make_locals(tmp_path, g0, 2, "r"))
    ]
    agg = read_artifact(
        write(algorithm.aggregate(state, uploads, AggregateConfig()), tmp_path / "a.safetensors")
    )
    assert agg.header.info["upload_fidelity"]["cosine"] > 0
    bc, nxt = algorithm.broadcast(state, agg, BroadcastConfig(seed=1))
    applied = apply_broadcast(state, read_artifact(write(bc, tmp_path / "bc.safetensors")))
    assert all(torch.equal(applied.tensors[n], t) for n, t in nxt.tensors.items())


def test_sparsify_config_lists_the_value_dtypes_it_accepts():
    assert SparsifyConfig(value_dtype="int4").value_dtype == "int4"
    with pytest.raises(
        UsageError, match=r"--value-dtype must be one of \['fp32', 'bf16', 'fp16', 'int8', 'int4'\]"
    ):
        SparsifyConfig(value_dtype="int2")
