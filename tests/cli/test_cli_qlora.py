"""`--base-quantization` through the command line (issue 33, item 1): an NF4 or int8 site trains
a valid local state, joins the same round as a full-precision site, and `inspect` shows each
upload's quantization and rank; `simulate` runs on a quantized base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact

pytest.importorskip("bitsandbytes")

runner = CliRunner()


def run(*args: object, code: int = 0) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout) if "--json" in args else {"output": result.output}


def _train(tiny_model: Path, tiny_data: Path, g0: Path, out: Path, client: str, quantization: str) -> dict:
    return run(
        "train-local", "--base", tiny_model, "--global", g0, "--data", tiny_data, "--out", out,
        "--steps", "2", "--lr", "1e-2", "--device", "cpu", "--client", client,
        "--base-quantization", quantization, "--json",
    )  # fmt: skip


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_site_trains_a_valid_local_state(
    quantization: str, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--out", g0, "--rank", "4")
    local = tmp_path / "local.safetensors"
    result = _train(tiny_model, tiny_data, g0, local, "site-a", quantization)
    assert result["base_quantization"] == quantization
    state, start = read_artifact(local), read_artifact(g0)
    assert state.header.kind == "state" and state.header.parent_hash == start.header.content_hash
    assert state.header.base_fingerprint == start.header.base_fingerprint  # the files', not the 4-bit copy's
    assert state.header.info["base_quantization"] == quantization
    assert state.names == start.names
    changed = [name for name in state.names if not torch.equal(state.tensor(name), start.tensor(name))]
    assert any(".lora_B." in name for name in changed) and any(".lora_A." in name for name in changed)
    assert all(bool(torch.isfinite(state.tensor(name)).all()) for name in state.names)
    assert all(state.tensor(name).dtype == torch.float32 for name in state.names)


def test_an_nf4_site_and_a_full_precision_site_share_a_round(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--out", g0, "--rank", "4")
    uploads = []
    for client, quantization in (("site-a", "nf4"), ("site-b", "none")):
        local, upload = tmp_path / f"local-{client}.safetensors", tmp_path / f"up-{client}.safetensors"
        _train(tiny_model, tiny_data, g0, local, client, quantization)
        run("sparsify", "--global", g0, "--local", local, "--client", client, "--out", upload)
        uploads.append(upload)
    four, full = (read_artifact(u).header for u in uploads)
    assert four.info["base_quantization"] == "nf4"
    assert "base_quantization" not in full.info  # a full-precision site's upload is as before
    assert four.base_fingerprint == full.base_fingerprint and four.parent_hash == full.parent_hash
    aggregate, broadcast, g1 = (tmp_path / f"{n}.safetensors" for n in ("agg", "bc", "g1"))
    run("aggregate", "--global", g0, "--out", aggregate, *uploads)
    clients = read_artifact(aggregate).header.info["clients"]
    assert [c["client_id"] for c in clients] == ["site-a", "site-b"]
    run("broadcast", "--global", g0, "--aggregate", aggregate, "--out", broadcast, "--out-global", g1)
    applied = tmp_path / "g1-applied.safetensors"
    run("apply", "--global", g0, "--broadcast", broadcast, "--out", applied)
    assert read_artifact(applied).header.content_hash == read_artifact(g1).header.content_hash

    shown = run("inspect", uploads[0], "--json")
    assert shown["trained_at"] == {"rank": 4, "global_rank": 4, "base_quantization": "nf4"}
    assert run("inspect", uploads[1], "--json")["trained_at"] == {
        "rank": 4,
        "global_rank": 4,
        "base_quantization": "none",
    }
    text = run("inspect", uploads[0])["output"]
    assert "trained at" in text and "rank 4, base nf4 (bitsandbytes)" in text
    local_text = run("inspect", tmp_path / "local-site-a.safetensors")["output"]
    assert "rank 4, base nf4" in local_text
    assert "full precision" in run("inspect", uploads[1])["output"]


def test_simulate_on_an_nf4_base(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    run(
        "simulate", "--base", tiny_model, "--clients-data", tiny_data, "--eval-data", tiny_data,
        "--algorithms", "fedsrd", "--rounds", "1", "--local-steps", "2", "--batch-size", "3",
        "--rank", "4", "--alpha", "8", "--device", "cpu", "--base-quantization", "nf4", "--out", out,
        "--json",
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["base_quantization"] == "nf4"
    uploads = sorted(out.rglob("upload-*.safetensors"))
    assert uploads and all(read_artifact(u).header.info["base_quantization"] == "nf4" for u in uploads)


def test_a_quantized_base_of_another_model_is_refused_before_it_loads(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """The fingerprint is the unquantized files' (files/model_spec.py: the model's config): a
    4-bit copy of another model is refused in one line, exit 4, nothing written."""
    from ..conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other-model", hidden=48)
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--out", g0, "--rank", "4")
    out = tmp_path / "local.safetensors"
    result = runner.invoke(
        app,
        [str(a) for a in ("train-local", "--base", other, "--global", g0, "--data", tiny_data, "--out", out,
                          "--steps", "1", "--device", "cpu", "--base-quantization", "nf4")],
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "another base model" in lines[0], lines
    assert not out.exists() and not Path(str(out) + ".log.jsonl").exists()
