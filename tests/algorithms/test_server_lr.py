"""broadcast --server-lr: the coordinator's step, X' = X + server_lr * dX, for every method."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.method import coordinator_step
from fedsrd_cli.algorithms.protocol import apply_broadcast
from fedsrd_cli.config import AggregateConfig, BroadcastConfig
from fedsrd_cli.errors import UsageError
from fedsrd_cli.files.artifacts import read_artifact

from ..conftest import make_global
from .rounds import make_locals, upload, write


def _round(tmp_path, method: str, step: float = 0.5, **download):
    """One round's state and aggregate, and the broadcast's whole step and `step` (fp32 values)."""
    g0 = make_global(tmp_path / "g0.safetensors")
    uploads = [
        upload(tmp_path, method, g0, p, f"c{i}") for i, p in enumerate(make_locals(tmp_path, g0, 3, "s"))
    ]
    algorithm = get_algorithm(method)
    state = read_artifact(g0)
    agg = read_artifact(
        write(algorithm.aggregate(state, uploads, AggregateConfig()), tmp_path / "agg.safetensors")
    )
    settings = {"seed": 5, "value_dtype": "fp32", **download}
    full = algorithm.broadcast(state, agg, BroadcastConfig(**settings))
    half = algorithm.broadcast(state, agg, BroadcastConfig(server_lr=step, **settings))
    return state, full, half


@pytest.mark.parametrize("step", [0.5, 2.0])
@pytest.mark.parametrize(
    ("method", "download"),
    [
        ("fedsrd", {}),
        ("fedsrd", {"factor_choice": "both", "download_fit": "lstsq", "download_sparsity": 0.5}),
        ("fedsrd", {"download_fit": "lstsq", "factor_choice": "parity", "damping": 0.0}),
        ("fedavg", {"download_sparsity": 0.0}),
        ("flexlora", {"download_sparsity": 0.0}),
    ],
)
def test_a_step_moves_every_factor_that_multiple_of_the_full_download(tmp_path, method, download, step):
    state, (bc_full, next_full), (bc_half, next_half) = _round(tmp_path, method, step, **download)
    assert bc_half.header.layout == bc_full.header.layout  # the same factors and masks
    changed = 0
    for name, before in state.iter_tensors():
        full_step = next_full.tensors[name].double() - before.double()
        half_step = next_half.tensors[name].double() - before.double()
        # fp32 values: each stored value is rounded once, so compare at fp32's precision
        torch.testing.assert_close(half_step, step * full_step, rtol=1e-5, atol=1e-6)
        changed += int(bool(full_step.any()))
    assert changed > 0
    assert bc_half.header.info["server_lr"] == step and "server_lr" not in bc_full.header.info


def test_clients_applying_a_damped_broadcast_hold_the_coordinators_state(tmp_path):
    state, _, (bc_half, next_half) = _round(tmp_path, "fedsrd")
    applied = apply_broadcast(state, read_artifact(write(bc_half, tmp_path / "bc.safetensors")))
    assert all(torch.equal(applied.tensors[n], t) for n, t in next_half.tensors.items())


def test_the_update_error_records_the_shorter_step(tmp_path):
    _, (bc_full, _), (bc_half, _) = _round(
        tmp_path, "fedsrd", factor_choice="b", download_fit="lstsq", download_sparsity=0.0, damping=0.0
    )
    # One factor, nothing masked: the update lands at the target's projection P; half a step
    # lands half way, so miss^2 = e^2 + (1 - e^2) / 4 for the full step's error e.
    full = bc_full.header.info["update_error"]["overall"]
    half = bc_half.header.info["update_error"]["overall"]
    assert half == pytest.approx(math.sqrt(full**2 + (1 - full**2) / 4), rel=1e-4)


@pytest.mark.parametrize("value", [0.0, -0.5, 16.5, float("nan"), float("inf")])
def test_server_lr_outside_its_range_is_refused(value):
    with pytest.raises(UsageError, match="--server-lr must be in"):
        BroadcastConfig(server_lr=value)


def test_a_calibrated_step_divides_the_step_by_the_uploads_gain(tmp_path):
    state, (bc_full, next_full), _ = _round(tmp_path, "fedsrd")
    agg = read_artifact(tmp_path / "agg.safetensors")
    gain = agg.header.info["upload_fidelity"]["gain"]
    assert gain > 1.0  # the default upload's L1 rescale carries more than the sites' own updates
    calibrated, next_cal = get_algorithm("fedsrd").broadcast(
        state, agg, BroadcastConfig(seed=5, value_dtype="fp32", server_lr=2.0, calibrate_step=True)
    )
    assert calibrated.header.info["server_lr"] == pytest.approx(2.0 / gain)
    assert calibrated.header.info["step_calibration"] == {"target": 2.0, "upload_gain": gain}
    for name, before in state.iter_tensors():
        full_step = next_full.tensors[name].double() - before.double()
        step = next_cal.tensors[name].double() - before.double()
        torch.testing.assert_close(step, (2.0 / gain) * full_step, rtol=1e-5, atol=1e-6)


def test_the_uploads_gain_is_the_slope_of_their_reconstructions_on_the_exact_updates(tmp_path):
    _round(tmp_path, "fedsrd")
    agg = read_artifact(tmp_path / "agg.safetensors")
    records = list(agg.header.info["upload_fidelity"]["clients"].values())
    along = sum(r["cosine"] * r["norm_ratio"] * r["exact_norm"] ** 2 for r in records)  # <E_i, D_i>
    assert agg.header.info["upload_fidelity"]["gain"] == pytest.approx(
        along / sum(r["exact_norm"] ** 2 for r in records), rel=1e-5
    )


def test_without_a_gain_the_calibrated_step_is_the_plain_one(tmp_path):
    """A dense fp32 upload carries exactly the site's update (gain 1); an aggregate with no
    upload fidelity (secure sums record none) and organisation-level DP keep --server-lr."""
    _round(tmp_path, "fedavg", download_sparsity=0.0)
    agg = read_artifact(tmp_path / "agg.safetensors")
    assert agg.header.info["upload_fidelity"]["gain"] == pytest.approx(1.0, abs=1e-6)
    config = BroadcastConfig(download_sparsity=0.0, server_lr=2.0, calibrate_step=True)
    info = {k: v for k, v in agg.header.info.items() if k != "upload_fidelity"}
    without = SimpleNamespace(header=replace(agg.header, info=info))
    assert coordinator_step(without, config, private=False) == (2.0, {})
    assert coordinator_step(agg, config, private=True) == (2.0, {})  # its step may not depend on data
    assert coordinator_step(agg, replace(config, calibrate_step=False), private=False) == (2.0, {})
