"""`train-local --rank` through the command line (issue 33, item 3): a rank-2 site and a full-rank
site share a round of a rank-4 state, `inspect` shows each upload's rank, bad ranks are refused
in one line with nothing written, and `simulate --site-ranks` runs the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact

runner = CliRunner()


def run(*args: object, code: int = 0) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    if code != 0:
        return {"output": result.output}
    return json.loads(result.stdout) if "--json" in args else {"output": result.output}


def _train(tiny_model: Path, tiny_data: Path, g0: Path, out: Path, *extra: object, code: int = 0) -> dict:
    return run(
        "train-local", "--base", tiny_model, "--global", g0, "--data", tiny_data, "--out", out,
        "--steps", "2", "--lr", "1e-2", "--device", "cpu", *extra, code=code,
    )  # fmt: skip


@pytest.fixture(scope="module")
def round_files(tmp_path_factory, tiny_model: Path, tiny_data: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("site-rank")
    g0 = d / "g0.safetensors"
    run("init", "--base", tiny_model, "--out", g0, "--rank", "4")
    files = {"g0": g0}
    for client, rank in (("site-a", ["--rank", "2"]), ("site-b", [])):
        local, upload = d / f"local-{client}.safetensors", d / f"up-{client}.safetensors"
        _train(tiny_model, tiny_data, g0, local, "--client", client, *rank)
        run("sparsify", "--global", g0, "--local", local, "--client", client, "--out", upload)
        files[client] = upload
        files[f"local-{client}"] = local
    return files


def test_a_rank_2_site_and_a_full_rank_site_share_a_round(
    round_files: dict[str, Path], tmp_path: Path
) -> None:
    g0, low, full = round_files["g0"], round_files["site-a"], round_files["site-b"]
    assert read_artifact(round_files["local-site-a"]).header.info["site_rank"] == 2
    assert read_artifact(low).header.info["site_rank"] == 2
    assert "site_rank" not in read_artifact(full).header.info  # a full-rank site's upload is as before
    for shape in read_artifact(low).header.layout.values():
        assert 2 in shape and 4 not in shape
    aggregate, broadcast, g1 = (tmp_path / f"{n}.safetensors" for n in ("agg", "bc", "g1"))
    run("aggregate", "--global", g0, "--out", aggregate, low, full)
    assert read_artifact(aggregate).header.info["rank_padding"] == "global"
    run("broadcast", "--global", g0, "--aggregate", aggregate, "--out", broadcast, "--out-global", g1)
    applied = tmp_path / "applied.safetensors"
    run("apply", "--global", g0, "--broadcast", broadcast, "--out", applied)
    assert read_artifact(applied).header.content_hash == read_artifact(g1).header.content_hash

    assert run("inspect", low, "--json")["trained_at"] == {
        "rank": 2,
        "global_rank": 4,
        "base_quantization": "none",
    }
    assert "rank 2 of the global 4, base full precision" in run("inspect", low)["output"]
    assert run("inspect", full, "--json")["trained_at"]["rank"] == 4


def test_fedavg_with_zero_padding(
    round_files: dict[str, Path], tiny_model: Path, tiny_data: Path, tmp_path: Path
):
    g0 = round_files["g0"]
    uploads = []
    for client in ("site-a", "site-b"):
        upload = tmp_path / f"fedavg-{client}.safetensors"
        run("sparsify", "--global", g0, "--local", round_files[f"local-{client}"], "--client", client,
            "--method", "fedavg", "--out", upload)  # fmt: skip
        uploads.append(upload)
    aggregate = tmp_path / "agg.safetensors"
    run(
        "aggregate",
        "--global",
        g0,
        "--method",
        "fedavg",
        "--rank-padding",
        "zeros",
        "--out",
        aggregate,
        *uploads,
    )
    assert read_artifact(aggregate).header.info["rank_padding"] == "zeros"
    bad = tmp_path / "x.safetensors"
    out = run("aggregate", "--global", g0, "--rank-padding", "mean", "--out", bad, *uploads, code=2)
    assert "--rank-padding must be one of" in out["output"]


def test_bad_ranks_are_refused_before_training(
    round_files: dict[str, Path], tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "local.safetensors"
    refused = _train(tiny_model, tiny_data, round_files["g0"], out, "--rank", "8", code=2)
    assert "--rank 8 is above the global state's rank 4" in refused["output"]
    assert len(refused["output"].strip().splitlines()) == 1
    refused = _train(tiny_model, tiny_data, round_files["g0"], out, "--rank", "2", "--client", "a",
                     "--dp-noise-multiplier", "1", code=2)  # fmt: skip
    assert "not supported with DP-SGD" in refused["output"]
    refused = _train(tiny_model, tiny_data, round_files["g0"], out, "--rank", "0", code=2)
    assert "--rank must be in [1," in refused["output"]
    assert not list(tmp_path.iterdir())


def test_simulate_with_site_ranks(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    second = tmp_path / "second.jsonl"
    second.write_bytes(tiny_data.read_bytes())
    run(
        "simulate", "--base", tiny_model, "--clients-data", tiny_data, "--clients-data", second,
        "--eval-data", tiny_data, "--algorithms", "fedsrd,fedavg", "--rounds", "1", "--local-steps", "2",
        "--batch-size", "3", "--rank", "4", "--alpha", "8", "--device", "cpu", "--site-ranks", "2,4",
        "--rank-padding", "zeros", "--out", out, "--json",
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["site_ranks"] == [2, 4] and results["config"]["rank_padding"] == "zeros"
    ranks = sorted(
        read_artifact(u).header.info.get("site_rank", 4) for u in out.rglob("upload-*.safetensors")
    )
    assert ranks == [2, 2, 4, 4]
    bad = run(
        "simulate", "--base", tiny_model, "--clients-data", tiny_data, "--eval-data", tiny_data,
        "--rounds", "1", "--rank", "4", "--site-ranks", "8", "--out", tmp_path / "bad", code=2,
    )  # fmt: skip
    assert "--site-ranks must each be 1 to --rank 4" in bad["output"]
