"""train-local under torchrun: two CPU processes write the one local state one process writes,
from process 0 alone; what cannot run over several processes is refused before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fedsrd_cli
from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact

runner = CliRunner()
TWO_PROCESSES = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
# float32 sums in another order (site/test_distributed.py says why); measured about 1e-6
TOLERANCE = 1e-5


def _train_args(model: Path, global_path: Path, data: Path, out: Path) -> list[str]:
    settings = ["--steps", "3", "--lr", "2e-2", "--batch-size", "4", "--seed", "3", "--client", "c1"]
    return [
        "train-local",
        "--base",
        str(model),
        "--global",
        str(global_path),
        "--data",
        str(data),
        "--out",
        str(out),
        *settings,
        "--json",
    ]


@pytest.fixture(scope="module")
def global_path(tmp_path_factory, tiny_model: Path) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "g0.safetensors"
    result = runner.invoke(app, ["init", "--base", str(tiny_model), "--out", str(path), "--rank", "4"])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.slow
def test_torchrun_two_processes_write_the_one_process_state(
    tmp_path: Path, tiny_model: Path, tiny_data: Path, global_path: Path
) -> None:
    one = tmp_path / "one" / "local.safetensors"
    two = tmp_path / "two" / "local.safetensors"
    one.parent.mkdir()
    two.parent.mkdir()
    alone = runner.invoke(app, _train_args(tiny_model, global_path, tiny_data, one))
    assert alone.exit_code == 0, alone.output
    src = str(Path(fedsrd_cli.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*launch, "-m", "fedsrd_cli.cli", *_train_args(tiny_model, global_path, tiny_data, two)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # process 0 alone prints (one JSON object) and writes (the state and its log, nothing else)
    report = json.loads(done.stdout)
    assert report["processes"] == 2 and report["path"] == str(two)
    assert sorted(p.name for p in two.parent.iterdir()) == [
        "local.safetensors",
        "local.safetensors.log.jsonl",
    ]
    a, b = read_artifact(one, kind="state"), read_artifact(two, kind="state")
    assert a.header.num_samples == b.header.num_samples and a.header.parent_hash == b.header.parent_hash
    assert a.header.info["train"]["steps"] == b.header.info["train"]["steps"] == 3
    worst = max(float((a.tensor(n) - b.tensor(n)).abs().max()) for n in a.names)
    assert worst <= TOLERANCE
    g = read_artifact(global_path)
    assert max(float((a.tensor(n) - g.tensor(n)).abs().max()) for n in a.names) > 1e-3
    logs = [
        [json.loads(line) for line in Path(f"{p}.log.jsonl").read_text().splitlines()] for p in (one, two)
    ]
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], rel=1e-6)


@pytest.mark.parametrize(
    ("env", "extra", "message"),
    [
        (
            TWO_PROCESSES,
            ["--dp-epsilon", "8", "--dp-delta", "1e-5", "--dp-rounds", "3"],
            "error: DP-SGD (--dp-*) does not run over 2 processes",
        ),
        (TWO_PROCESSES, ["--device", "mps"], "error: --device mps is one device"),
        (
            {**TWO_PROCESSES, "LOCAL_WORLD_SIZE": "1"},
            [],
            "error: train-local trains one site's state on one machine",
        ),
        ({"WORLD_SIZE": "2"}, [], "error: WORLD_SIZE is 2 but RANK and LOCAL_RANK is not set"),
        (TWO_PROCESSES, [], "error: WORLD_SIZE is 2 but MASTER_ADDR is not set"),
    ],
)
def test_what_cannot_run_distributed_is_refused_in_one_line(
    tmp_path: Path,
    tiny_model: Path,
    tiny_data: Path,
    global_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict,
    extra: list[str],
    message: str,
) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "local.safetensors"
    result = runner.invoke(app, [*_train_args(tiny_model, global_path, tiny_data, out), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().count("\n") == 0
    assert not out.exists() and not torch.distributed.is_initialized()
