"""--max-update-norm: norms, refuse, clip, and NaN/Inf uploads."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from typer.testing import CliRunner

from fedsrd_cli.algorithms.protocol import update_norm
from fedsrd_cli.cli import app
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.files.safetensors_io import content_hash, encode_safetensors

from ..conftest import make_local

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def uploads(tmp: Path, g: Path, scales: tuple[float, ...]) -> list[Path]:
    out = []
    for i, scale in enumerate(scales):
        local = make_local(g, tmp / f"local-{i}.safetensors", seed=i + 1, scale=scale)
        up = tmp / f"up-{i}.safetensors"
        client = f"c{i}"
        assert (
            run("sparsify", "--global", g, "--local", local, "--client", client, "--out", up).exit_code == 0
        )
        out.append(up)
    return out


def dense_update_norm(g: Path, up: Path) -> float:
    state, upload = read_artifact(g), read_artifact(up)
    total = 0.0
    for module in state.modules():
        a, b = (t.double() for t in state.factors(module))
        da = upload.upload_delta(naming.factor_key(module, "A"))
        db = upload.upload_delta(naming.factor_key(module, "B"))
        a_new = a if da is None else a + da.double()
        b_new = b if db is None else b + db.double()
        total += float(torch.linalg.matrix_norm(b_new @ a_new - b @ a)) ** 2
    return math.sqrt(total)


def test_update_norm_matches_dense(tmp_path: Path, global_path: Path) -> None:
    for up in uploads(tmp_path, global_path, (0.01, 0.05)):
        norm = update_norm(read_artifact(global_path), read_artifact(up))
        assert math.isclose(norm, dense_update_norm(global_path, up), rel_tol=1e-9)


def test_refuse_names_the_client_and_its_norm(tmp_path: Path, global_path: Path) -> None:
    ups = uploads(tmp_path, global_path, (0.01, 0.2))
    big = dense_update_norm(global_path, ups[1])
    small = dense_update_norm(global_path, ups[0])
    bound = (big + small) / 2
    out = tmp_path / "agg.safetensors"
    result = run("aggregate", "--global", global_path, "--out", out, *ups, "--max-update-norm", bound)
    assert result.exit_code == 4
    assert "client 'c1' has update norm" in result.output and f"{big:.6g}" in result.output
    assert not out.exists()
    ok = run("aggregate", "--global", global_path, "--out", out, *ups, "--max-update-norm", big * 2, "--json")
    assert ok.exit_code == 0, ok.output
    actions = [d["action"] for d in json.loads(ok.output)["update_norms"]]
    assert actions == ["ok", "ok"]


def test_clip_scales_the_update_to_the_bound(tmp_path: Path, global_path: Path) -> None:
    (up,) = uploads(tmp_path, global_path, (0.2,))
    norm = dense_update_norm(global_path, up)
    bound = norm / 4
    out = tmp_path / "agg.safetensors"
    result = run(
        "aggregate",
        "--global",
        global_path,
        "--out",
        out,
        up,
        "--method",
        "fedsrd-e",
        "--max-update-norm",
        bound,
        "--on-outlier",
        "clip",
        "--json",
    )
    assert result.exit_code == 0, result.output
    decision = json.loads(result.output)["update_norms"][0]
    assert decision["action"] == "clipped" and math.isclose(decision["scale"], bound / norm, rel_tol=1e-9)
    agg = read_artifact(out)
    assert agg.header.info["update_norms"][0]["action"] == "clipped"
    assert agg.header.info["max_update_norm"] == bound
    # One client, weight 1, exact aggregate: W - B A is that client's clipped update.
    state = read_artifact(global_path)
    total = 0.0
    for module in state.modules():
        a, b = (t.double() for t in state.factors(module))
        left_name, right_name = naming.aggregate_keys(module)
        w = agg.tensor(left_name).double() @ agg.tensor(right_name).double()
        total += float(torch.linalg.matrix_norm(w - b @ a)) ** 2
    assert math.isclose(math.sqrt(total), bound, rel_tol=1e-5)


def test_bad_norm_flags_are_usage_errors(tmp_path: Path, global_path: Path) -> None:
    ups = uploads(tmp_path, global_path, (0.01,))
    out = tmp_path / "agg.safetensors"
    for flags in (("--max-update-norm", "-1"), ("--max-update-norm", "nan"), ("--on-outlier", "drop")):
        result = run("aggregate", "--global", global_path, "--out", out, *ups, *flags)
        assert result.exit_code == 2, (flags, result.output)


def test_nan_or_inf_upload_is_refused(tmp_path: Path, global_path: Path) -> None:
    (up,) = uploads(tmp_path, global_path, (0.01,))
    artifact = read_artifact(up)
    tensors = dict(artifact.iter_tensors())
    name = next(n for n in tensors if n.endswith(".values"))
    for bad_value in (float("nan"), float("inf")):
        poisoned = {**tensors, name: tensors[name].clone()}
        poisoned[name][0] = bad_value
        # Written by hand (fedsrd itself refuses to write it), with a matching content hash.
        header = replace(artifact.header, content_hash=content_hash(poisoned))
        bad = tmp_path / "poisoned.safetensors"
        bad.write_bytes(b"".join(bytes(p) for p in encode_safetensors(poisoned, header.to_metadata())))
        result = run("aggregate", "--global", global_path, "--out", tmp_path / "agg.safetensors", bad)
        assert result.exit_code == 3 and "contains NaN or Inf" in result.output
