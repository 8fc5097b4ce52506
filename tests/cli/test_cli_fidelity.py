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
