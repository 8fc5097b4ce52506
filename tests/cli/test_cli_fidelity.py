"""inspect shows how well each upload carries its site's exact update, and the round's mean."""

from __future__ import annotations

import json

import pytest

from fedsrd_cli.files.artifacts import read_artifact

from ..conftest import make_global
from .test_cli import run, run_round


def test_inspect_shows_each_uploads_fidelity_and_the_aggregates_mean(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    files = run_round(tmp_path, g0)
    records = []
    for i, up in enumerate(files["uploads"]):
        record = read_artifact(up).header.info["fidelity"]
        records.append(record)
        text = run("inspect", up).stdout
        assert (
            f"{record['norm_ratio']:.3g} times the exact update's norm, cosine {record['cosine']:.3g}" in text
        )
        assert json.loads(run("inspect", up, "--json").stdout)["info"]["fidelity"] == record
        assert record["norm_ratio"] > 1.0  # the default L1 rescale inflates what is kept
        assert read_artifact(files["aggregate"]).header.info["upload_fidelity"]["clients"][f"c{i}"] == record
    summary = read_artifact(files["aggregate"]).header.info["upload_fidelity"]
    assert summary["norm_ratio"] == pytest.approx(sum(r["norm_ratio"] for r in records) / 3, abs=1e-6)
    text = run("inspect", files["aggregate"]).stdout
    assert "uploads carry" in text and all(f"c{i}: " in text for i in range(3))


def test_a_fedexp_round_through_the_cli_records_and_shows_its_step(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    files = run_round(tmp_path, g0, method="fedavg")
    spread_agg = tmp_path / "agg-spread.safetensors"
    run(
        "aggregate",
        "--method",
        "fedavg",
        "--global",
        g0,
        "--out",
        spread_agg,
        "--update-spread",
        *files["uploads"],
    )
    spread = read_artifact(spread_agg).header.info["update_spread"]
    assert "update spread" in run("inspect", spread_agg).stdout
    bc, nxt = tmp_path / "bc.safetensors", tmp_path / "g1.safetensors"
    args = ("--global", g0, "--out", bc, "--out-global", nxt)
    run("broadcast", *args, "--aggregate", spread_agg, "--step-rule", "fedexp", "--server-lr", "0.5")
    assert read_artifact(bc).header.info["server_lr"] == pytest.approx(0.5 * spread["extrapolation"])
    assert (
        f"FedExP's extrapolation {spread['extrapolation']:g} times --server-lr 0.5"
        in run("inspect", bc).stdout
    )
    # an aggregate without the spread: refused in one line, nothing written
    bc.unlink()
    nxt.unlink()
    refused = run("broadcast", *args, "--aggregate", files["aggregate"], "--step-rule", "fedexp", code=4)
    assert "aggregate --update-spread" in refused.output
    assert not bc.exists() and not nxt.exists()
    # sparsified uploads: refused without their sketches, in one line, nothing written
    srd = run_round(tmp_path, g0, tag="srd")
    out = tmp_path / "agg-srd-spread.safetensors"
    refused = run("aggregate", "--global", g0, "--out", out, "--update-spread", *srd["uploads"], code=4)
    assert "--update-sketch" in refused.output and not out.exists()
    sketched = []
    for i in range(3):
        up = tmp_path / f"up-sketch-{i}.safetensors"
        local = tmp_path / f"local-srd-{i}.safetensors"
        run("sparsify", "--global", g0, "--local", local, "--client", f"c{i}", "--update-sketch", "--out", up)
        sketched.append(up)
    assert "update sketch" in run("inspect", sketched[0]).stdout
    run("aggregate", "--global", g0, "--out", out, "--update-spread", *sketched)
    spread = read_artifact(out).header.info["update_spread"]
    assert spread["source"] == "sketches" and "target fidelity (estimated)" in run("inspect", out).stdout


def test_a_secure_upload_takes_no_update_sketch(tmp_path):
    args = (
        "--global",
        tmp_path / "g.st",
        "--local",
        tmp_path / "l.st",
        "--client",
        "c0",
        "--out",
        tmp_path / "u.st",
    )
    refused = run("sparsify", *args, "--secure", "--update-sketch", code=2)
    assert "--update-sketch" in refused.output and not (tmp_path / "u.st").exists()
