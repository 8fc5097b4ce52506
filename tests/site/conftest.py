"""What the tests of site/ share: the CLI runner and a run directory with one train-local."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli.cli import app

runner = CliRunner()


def run_cli(*args: str, code: int = 0) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout) if code == 0 and "--json" in args else {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model: Path, tiny_data: Path) -> Path:
    """init + one train-local, shared by the tests of one module (test_training, test_evaluation)."""
    d = tmp_path_factory.mktemp("run")
    run_cli("init", "--base", tiny_model, "--out", d / "g0.safetensors", "--rank", "4", "--json")
    run_cli(
        "train-local",
        "--base",
        tiny_model,
        "--global",
        d / "g0.safetensors",
        "--data",
        tiny_data,
        "--out",
        d / "local.safetensors",
        "--steps",
        "20",
        "--lr",
        "2e-2",
        "--batch-size",
        "6",
        "--client",
        "c1",
        "--seed",
        "3",
        "--json",
    )
    return d
