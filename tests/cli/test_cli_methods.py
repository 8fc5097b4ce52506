"""Every registered method through the command line: sparsify, aggregate, broadcast, apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.cli import METHODS_HELP, app
from fedsrd_cli.config import AGGREGATE_METHODS
from fedsrd_cli.files.artifacts import read_artifact

from ..algorithms.rounds import freeze_a
from ..conftest import make_global, make_local

runner = CliRunner()


def run(*args: object, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def _round(tmp: Path, method: str, extra: tuple = ()) -> dict[str, Path]:
    g0 = make_global(tmp / "g0.safetensors")
    uploads = []
    for i in range(2):
        local = make_local(g0, tmp / f"local-{i}.safetensors", seed=30 + i)
        if get_algorithm(method).trained_factor(1) == "B":  # ffa-lora, fedsrd-alternate
            local = freeze_a(g0, local)
        up = tmp / f"up-{i}.safetensors"
        run(
            "sparsify", "--global", g0, "--local", local, "--client", f"c{i}", "--method", method, "--out", up
        )
        uploads.append(up)
    agg = tmp / "agg.safetensors"
    run("aggregate", "--global", g0, "--out", agg, "--method", method, *uploads)
    bc, nxt = tmp / "bc.safetensors", tmp / "g1.safetensors"
    run("broadcast", "--global", g0, "--aggregate", agg, "--out", bc, "--out-global", nxt, *extra)
    return {"g0": g0, "uploads": uploads, "aggregate": agg, "broadcast": bc, "next": nxt}


@pytest.mark.parametrize("method", AGGREGATE_METHODS)
def test_a_round_of_every_method_and_apply_reproduces_the_coordinator_state(tmp_path, method):
    files = _round(tmp_path, method)
    client = tmp_path / "client-g1.safetensors"
    result = run(
        "apply", "--global", files["g0"], "--broadcast", files["broadcast"], "--out", client, "--json"
    )
    assert json.loads(result.stdout)["verified"] is True
    assert client.read_bytes() == files["next"].read_bytes()
    for path in (files["aggregate"], files["broadcast"], files["next"]):
        assert read_artifact(path).header.method == method
    upload_method = read_artifact(files["uploads"][0]).header.method
    assert upload_method == (
        "fedsrd" if method in ("fedsrd-e", "fedsrd-dense-download", "fedsrd-no-reconstruction") else method
    )
    report = json.loads(run("inspect", files["broadcast"], "--json").stdout)
    dense = method in ("fedavg", "fedprox", "ffa-lora", "flexlora", "fed-dare", "fedsrd-dense-download")
    assert report["download_sparsity"] == (0.0 if dense else 0.8)


def test_dense_method_broadcast_refuses_a_download_sparsity(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "local.safetensors", seed=1)
    up, agg = tmp_path / "up.safetensors", tmp_path / "agg.safetensors"
    run("sparsify", "--global", g0, "--local", local, "--client", "c0", "--method", "fedavg", "--out", up)
    run("aggregate", "--global", g0, "--out", agg, "--method", "fedavg", up)
    bc, nxt = tmp_path / "bc.safetensors", tmp_path / "g1.safetensors"
    result = run(
        "broadcast",
        "--global",
        g0,
        "--aggregate",
        agg,
        "--out",
        bc,
        "--out-global",
        nxt,
        "--download-sparsity",
        "0.5",
        code=2,
    )
    assert "--download-sparsity must be 0" in result.output
    assert not bc.exists() and not nxt.exists()


def test_sparsify_refuses_a_bad_upload_drop_and_aggregate_a_mixed_method(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "local.safetensors", seed=1)
    up = tmp_path / "up.safetensors"
    result = run(
        "sparsify",
        "--global",
        g0,
        "--local",
        local,
        "--client",
        "c0",
        "--method",
        "fed-dare",
        "--upload-drop",
        "1.0",
        "--out",
        up,
        code=2,
    )
    assert "--upload-drop must be in [0, 1)" in result.output
    run("sparsify", "--global", g0, "--local", local, "--client", "c0", "--method", "fedavg", "--out", up)
    agg = tmp_path / "agg.safetensors"
    result = run("aggregate", "--global", g0, "--out", agg, "--method", "flexlora", up, code=4)
    assert "sparsify --method flexlora" in result.output


def test_help_lists_every_method():
    assert [m.strip() for m in METHODS_HELP.split("(")[0].split(",")] == list(AGGREGATE_METHODS)
    for command in ("sparsify", "aggregate"):
        text = "".join(run(command, "--help").output.split())  # help wraps lines, even inside names
        assert all(name in text for name in AGGREGATE_METHODS)
