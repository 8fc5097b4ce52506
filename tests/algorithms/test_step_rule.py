"""broadcast --step-rule fedexp: FedExP's extrapolation, read from `aggregate --update-spread`,
against a dense computation from the sites' own local states (methods with dense uploads)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.diagnostics import UPDATE_SKETCH_WIDTH, ModuleSpread, update_spread
from fedsrd_cli.algorithms.method import coordinator_step
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.errors import MismatchError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.privacy.ledger import OrganisationDp

from ..conftest import make_global
from .rounds import make_locals, upload, write


def _dense_updates(state, locals_) -> list[torch.Tensor]:
    """Each site's exact update D_i = B'_i A'_i - B A, every module's flattened and joined."""
    out = []
    for path in locals_:
        local = read_artifact(path)
        parts = []
        for module in state.modules():
            a, b = (t.double() for t in state.factors(module))
            a_i = local.tensor(naming.factor_key(module, "A")).double()
            b_i = local.tensor(naming.factor_key(module, "B")).double()
            parts.append((b_i @ a_i - b @ a).reshape(-1))
        out.append(torch.cat(parts))
    return out


def _round(tmp_path, method: str, weighting: str = "uniform", **aggregate):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 3, "s")
    uploads = [upload(tmp_path, method, g0, p, f"c{i}") for i, p in enumerate(locals_)]
    state = read_artifact(g0)
    config = AggregateConfig(method=method, weighting=weighting, update_spread=True, **aggregate)
    agg = read_artifact(write(get_algorithm(method).aggregate(state, uploads, config), tmp_path / "agg.st"))
    return state, locals_, agg


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_the_spread_is_fedexps_figures_on_the_dense_updates(tmp_path, weighting):
    state, locals_, agg = _round(tmp_path, "fedavg", weighting)
    weights = [c["weight"] for c in agg.header.info["clients"]]
    updates = _dense_updates(state, locals_)
    mean = sum(w * d for w, d in zip(weights, updates, strict=True))
    client_sq = sum(w * float(d.pow(2).sum()) for w, d in zip(weights, updates, strict=True))
    spread = agg.header.info["update_spread"]
    # fp32 uploads: each upload is the site's update to fp32 rounding
    assert spread["client_sq"] == pytest.approx(client_sq, rel=1e-6)
    assert spread["mean_sq"] == pytest.approx(float(mean.pow(2).sum()), rel=1e-5)
    assert spread["extrapolation"] == pytest.approx(
        max(1.0, client_sq / (2 * float(mean.pow(2).sum()))), rel=1e-5
    )
    assert spread["extrapolation"] > 1.0  # the toy sites' updates are independent noise


def test_clipped_sites_count_with_their_clipped_updates(tmp_path):
    state, locals_, agg = _round(tmp_path, "fedavg", max_update_norm=1e-3, on_outlier="clip")
    decisions = agg.header.info["update_norms"]
    scales = [d["scale"] for d in decisions]
    assert all(s < 1.0 for s in scales)
    weights = [c["weight"] for c in agg.header.info["clients"]]
    updates = [s * d for s, d in zip(scales, _dense_updates(state, locals_), strict=True)]
    mean = sum(w * d for w, d in zip(weights, updates, strict=True))
    spread = agg.header.info["update_spread"]
    assert spread["client_sq"] == pytest.approx(
        sum(w * float(d.pow(2).sum()) for w, d in zip(weights, updates, strict=True)), rel=1e-5
    )
    assert spread["mean_sq"] == pytest.approx(float(mean.pow(2).sum()), rel=1e-4)


@pytest.mark.parametrize("method", ["fedavg", "flexlora", "fedprox"])
def test_the_fedexp_step_is_server_lr_times_the_extrapolation(tmp_path, method):
    state, _, agg = _round(tmp_path, method)
    eta = agg.header.info["update_spread"]["extrapolation"]
    algorithm = get_algorithm(method)
    settings = {"seed": 5, "value_dtype": "fp32", "download_sparsity": 0.0}
    _, next_full = algorithm.broadcast(state, agg, BroadcastConfig(**settings))
    bc, next_step = algorithm.broadcast(
        state, agg, BroadcastConfig(server_lr=0.5, step_rule="fedexp", **settings)
    )
    assert bc.header.info["server_lr"] == pytest.approx(0.5 * eta)
    assert bc.header.info["step_calibration"] == {"target": 0.5, "rule": "fedexp", "extrapolation": eta}
    changed = 0
    for name, before in state.iter_tensors():
        full = next_full.tensors[name].double() - before.double()
        taken = next_step.tensors[name].double() - before.double()
        torch.testing.assert_close(taken, 0.5 * eta * full, rtol=1e-5, atol=1e-6)
        changed += int(bool(full.any()))
    assert changed > 0


def test_fedexp_with_a_calibrated_step_divides_by_the_uploads_gain(tmp_path):
    _, _, agg = _round(tmp_path, "fedavg")
    eta = agg.header.info["update_spread"]["extrapolation"]
    gain = agg.header.info["upload_fidelity"]["gain"]  # 1 to fp32 rounding: a dense upload
    config = BroadcastConfig(download_sparsity=0.0, server_lr=2.0, step_rule="fedexp", calibrate_step=True)
    step, record = coordinator_step(agg, config, private=False)
    assert step == pytest.approx(min(2.0 * eta / gain, 16.0))
    assert record == {"target": 2.0, "rule": "fedexp", "extrapolation": eta, "upload_gain": gain}


@pytest.mark.parametrize("method", ["fedsrd", "fed-dare"])
def test_sparsified_uploads_need_their_sketches(tmp_path, method):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 2, "u")
    uploads = [upload(tmp_path, method, g0, p, f"c{i}") for i, p in enumerate(locals_)]
    assert all("update_sketch" not in u.header.info for u in uploads)  # off unless asked for
    with pytest.raises(MismatchError, match="--update-sketch"):
        get_algorithm(method).aggregate(
            read_artifact(g0), uploads, AggregateConfig(method=method, update_spread=True)
        )


def test_sketches_estimate_the_mean_update_of_sparsified_uploads(tmp_path):
    # FedSRD's reconstructions are far from the sites' updates (L1 rescale, a few kept
    # elements); the sites' sketches of their exact updates give the mean update's norm and the
    # target's fidelity against it, checked here against the dense computation.
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 4, "k")
    sketched = SparsifyConfig(value_dtype="fp32", update_sketch=True)
    uploads = [upload(tmp_path, "fedsrd", g0, p, f"c{i}", sketched) for i, p in enumerate(locals_)]
    assert len(uploads[0].header.info["update_sketch"]["values"]) == UPDATE_SKETCH_WIDTH
    state = read_artifact(g0)
    config = AggregateConfig(update_spread=True, truncation="exact")
    agg = read_artifact(write(get_algorithm("fedsrd").aggregate(state, uploads, config), tmp_path / "agg.st"))
    spread = agg.header.info["update_spread"]
    assert spread["source"] == "sketches"
    weights = [c["weight"] for c in agg.header.info["clients"]]
    updates = _dense_updates(state, locals_)
    mean = sum(w * d for w, d in zip(weights, updates, strict=True))
    truth = float(mean.pow(2).sum())
    client_sq = sum(w * float(d.pow(2).sum()) for w, d in zip(weights, updates, strict=True))
    assert spread["client_sq"] == pytest.approx(client_sq, rel=1e-5)  # the sites' own exact norms
    assert spread["mean_sq"] == pytest.approx(truth, rel=0.1)  # the sketches' estimate
    # the target W - B A (the exact route: the sum of the reconstructions) against the mean
    target = []
    for module in state.modules():
        a, b = (t.double() for t in state.factors(module))
        left = agg.tensor(naming.aggregate_keys(module)[0]).double()
        right = agg.tensor(naming.aggregate_keys(module)[1]).double()
        target.append((left @ right - b @ a).reshape(-1))
    target_vec = torch.cat(target)
    cosine = float(target_vec @ mean) / (float(target_vec.norm()) * truth**0.5)
    assert spread["target"]["cosine"] == pytest.approx(cosine, abs=0.05)
    assert spread["target"]["norm_ratio"] == pytest.approx(float(target_vec.norm()) / truth**0.5, rel=0.1)


def test_fedexp_needs_a_spread_and_no_organisation_dp(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 2, "t")
    uploads = [upload(tmp_path, "fedavg", g0, p, f"c{i}") for i, p in enumerate(locals_)]
    state = read_artifact(g0)
    plain_payload = get_algorithm("fedavg").aggregate(state, uploads, AggregateConfig(method="fedavg"))
    plain = read_artifact(write(plain_payload, tmp_path / "a.st"))
    with pytest.raises(MismatchError, match="aggregate --update-spread"):
        get_algorithm("fedavg").broadcast(
            state, plain, BroadcastConfig(download_sparsity=0.0, step_rule="fedexp")
        )
    with pytest.raises(UsageError, match="organisation-level DP"):
        coordinator_step(plain, BroadcastConfig(step_rule="fedexp"), private=True)
    org = OrganisationDp(1.0, 1.0, 1.0, 1e-5, 2, 0)
    with pytest.raises(UsageError, match="--update-spread"):
        AggregateConfig(method="fedsrd-e", update_spread=True, organisation_dp=org)
    with pytest.raises(UsageError, match="--step-rule must be one of"):
        BroadcastConfig(step_rule="adam")


def test_a_sketched_estimate_of_zero_takes_no_extrapolation():
    # Sites whose sketches say their updates cancel exactly: the estimate is 0, which only the
    # sketches' noise could make it with real updates, so the step is not extrapolated.
    sketch = {"width": UPDATE_SKETCH_WIDTH, "values": [1.0] + [0.0] * (UPDATE_SKETCH_WIDTH - 1)}
    opposite = {"width": UPDATE_SKETCH_WIDTH, "values": [-1.0] + [0.0] * (UPDATE_SKETCH_WIDTH - 1)}
    uploads = [
        SimpleNamespace(
            path=f"u{i}", header=SimpleNamespace(info={"fidelity": {"exact_norm": 1.0}, "update_sketch": s})
        )
        for i, s in enumerate((sketch, opposite))
    ]
    spread = ModuleSpread([1.0, 1.0], 1.0, torch.zeros(UPDATE_SKETCH_WIDTH, dtype=torch.float64))
    record = update_spread(uploads, [0.5, 0.5], [1.0, 1.0], spread, dense=False, cap=16.0)["update_spread"]
    assert record["mean_sq"] == 0.0 and record["extrapolation"] == 1.0
    # the dense route's exact zero is the sites cancelling: the cap
    dense = update_spread(uploads, [0.5, 0.5], [1.0, 1.0], ModuleSpread([1.0, 1.0], 0.0, None), True, 16.0)
    assert dense["update_spread"]["extrapolation"] == 16.0
