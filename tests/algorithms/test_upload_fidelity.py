"""Upload fidelity: every upload records how its reconstruction compares with the site's exact
update (norm ratio and cosine), computed from thin factors; checked here against dense matrices."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.algorithms.diagnostics import Fidelity
from fedsrd_cli.config import SparsifyConfig
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact

from ..conftest import make_global, make_local
from .rounds import upload


def _dense_fidelity(global_file, local_file, uploaded) -> dict[str, float]:
    """The same three figures from dense (d_out, d_in) matrices: D = B'A' - BA, E from the upload."""
    state, local = read_artifact(global_file), read_local(local_file)
    exact2 = estimate2 = inner = 0.0
    for module in state.modules():
        a, b = (t.double() for t in state.factors(module))
        a_new, b_new = (t.double() for t in local.factors(module))
        sent = {}
        for factor, prev in (("A", a), ("B", b)):
            name = naming.factor_key(module, factor)
            entries = uploaded.upload_entries(name)
            delta = torch.zeros(prev.numel(), dtype=torch.float64)
            if entries is not None:
                positions, values = entries
                if positions is None:
                    delta = values.double().reshape(-1)
                else:
                    delta[positions.long()] = values.double()
            sent[factor] = prev + delta.reshape(prev.shape)
        exact = b_new @ a_new - b @ a  # (d_out, d_in)
        estimate = sent["B"] @ sent["A"] - b @ a
        exact2 += float((exact * exact).sum())
        estimate2 += float((estimate * estimate).sum())
        inner += float((exact * estimate).sum())
    return {
        "exact_norm": math.sqrt(exact2),
        "norm_ratio": math.sqrt(estimate2 / exact2),
        "cosine": inner / math.sqrt(exact2 * estimate2),
    }


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("fedsrd", SparsifyConfig(value_dtype="fp32")),  # the L1 rescale inflates the update
        ("fedsrd", SparsifyConfig(value_dtype="bf16", rescale=False)),
        ("fed-dare", SparsifyConfig(value_dtype="fp32")),
        ("fedavg", SparsifyConfig(value_dtype="bf16")),  # dense: only the rounding differs
    ],
)
def test_upload_fidelity_matches_a_dense_computation(tmp_path, method, config):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "local.safetensors", seed=3)
    uploaded = upload(tmp_path, method, g0, local, "c0", config)
    recorded = uploaded.header.info["fidelity"]
    dense = _dense_fidelity(g0, local, uploaded)
    for key in ("exact_norm", "norm_ratio", "cosine"):
        assert recorded[key] == pytest.approx(dense[key], rel=1e-5, abs=1e-8), key


def test_a_dense_fp32_upload_is_its_update_and_importance_pruning_is_not(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "local.safetensors", seed=4)
    dense = upload(tmp_path, "fedavg", g0, local, "c0", SparsifyConfig(value_dtype="fp32"))
    assert dense.header.info["fidelity"]["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert dense.header.info["fidelity"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    pruned = upload(tmp_path, "fedsrd", g0, local, "c0", SparsifyConfig(value_dtype="fp32", rescale=False))
    assert pruned.header.info["fidelity"]["cosine"] < 0.99
    assert pruned.header.info["fidelity"]["norm_ratio"] < 1.0  # kept elements only, none inflated


def test_fidelity_of_an_estimate_that_is_a_multiple_of_the_update():
    generator = torch.Generator().manual_seed(0)
    left, right = (
        torch.randn(6, 2, generator=generator, dtype=torch.float64),
        torch.randn(2, 5, generator=generator, dtype=torch.float64),
    )
    fidelity = Fidelity()
    fidelity.add([(left, right)], [(-3.0 * left, right)])
    record = fidelity.record()
    assert record["norm_ratio"] == pytest.approx(3.0) and record["cosine"] == pytest.approx(-1.0)
    assert record["exact_norm"] == pytest.approx(float((left @ right).norm()))
    assert Fidelity().record() == {"exact_norm": 0.0, "norm_ratio": 0.0, "cosine": 0.0}


@pytest.mark.parametrize("method", ["fedsrd", "fedavg"])
def test_mean_update_fidelity_matches_dense_matrices(tmp_path, method):
    from fedsrd_cli.algorithms.diagnostics import mean_update_fidelity

    from .rounds import make_locals, run_round

    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 3, "m")
    _, agg, _, next_file = run_round(tmp_path, method, g0, locals_)
    state, after = read_artifact(g0), read_artifact(next_file)
    trained = [dict(read_artifact(p).iter_tensors()) for p in locals_]
    weights = [c["weight"] for c in agg.header.info["clients"]]
    recorded = mean_update_fidelity(state, trained, weights, agg, dict(after.iter_tensors()))
    sums = {"target": [0.0, 0.0, 0.0], "delivered": [0.0, 0.0, 0.0]}  # ||D||^2, ||E||^2, <D, E>
    for module in state.modules():
        a, b = (t.double() for t in state.factors(module))
        mean = sum(w * (lb.double() @ la.double()) for w, (la, lb) in zip(
            weights, (read_artifact(p).factors(module) for p in locals_), strict=True
        )) - b @ a  # fmt: skip
        left_name, right_name = naming.aggregate_keys(module)
        target = agg.tensor(left_name).double() @ agg.tensor(right_name).double() - b @ a
        a_next, b_next = (t.double() for t in after.factors(module))
        for key, estimate in (("target", target), ("delivered", b_next @ a_next - b @ a)):
            sums[key][0] += float((mean * mean).sum())
            sums[key][1] += float((estimate * estimate).sum())
            sums[key][2] += float((mean * estimate).sum())
    for key, (d2, e2, inner) in sums.items():
        assert recorded[key]["exact_norm"] == pytest.approx(math.sqrt(d2), rel=1e-6)
        assert recorded[key]["norm_ratio"] == pytest.approx(math.sqrt(e2 / d2), rel=1e-5)
        assert recorded[key]["cosine"] == pytest.approx(inner / math.sqrt(d2 * e2), rel=1e-5, abs=1e-6)
