"""eval --metrics and demo-assets --suite real from the command line, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.site.sandbox import sandbox_statement

from ..conftest import write_jsonl
from ..site.test_task_eval import MC_RECORDS

runner = CliRunner()


def run(*args: object, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tasks")
    return {
        "law": write_jsonl(d / "law.jsonl", MC_RECORDS),
        "plain": write_jsonl(d / "plain.jsonl", [{"instruction": "Hi", "output": "Hello"}]),
    }


def test_eval_metrics_per_file_and_mean_with_the_base_beside(
    tiny_model: Path, task_files: dict[str, Path], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    data = ["--data", task_files["law"], "--data", task_files["plain"]]
    base_only = json.loads(run("eval", "--base", tiny_model, *data, "--metrics", "--json").stdout)
    law = base_only["files"]["law"]["task"]
    assert (law["kind"], law["metric"], law["examples"]) == ("mc", "accuracy", 5)
    assert "task" not in base_only["files"]["plain"]
    assert base_only["mean"]["task_score"] == law["score"]
    assert "base_model_tasks" not in base_only  # the base is what was scored
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--rank", 4, "--alpha", 8, "--targets", "q_proj,v_proj", "--out", g0)
    state = json.loads(run("eval", "--base", tiny_model, *data, "--global", g0, "--metrics", "--json").stdout)
    # round 0 (B = 0) is the base model: the base beside it scores the same
    assert state["base_model_tasks"] == {"files": {"law": law["score"]}, "mean": law["score"]}
    assert state["files"]["law"]["task"] == law
    text = run("eval", "--base", tiny_model, *data, "--global", g0, "--metrics").output
    assert "accuracy" in text and "base model" in text


def test_eval_metrics_needs_task_records(tiny_model: Path, task_files: dict[str, Path]) -> None:
    result = run("eval", "--base", tiny_model, "--data", task_files["plain"], "--metrics", code=2)
    assert "no --data file has task records" in result.output
    result = run(
        "eval", "--base", tiny_model, "--data", task_files["law"], "--metrics", "--metrics-max-new-tokens", 0,
        code=2,
    )  # fmt: skip
    assert "--metrics-max-new-tokens must be in [1, 65,536]" in result.output


def test_eval_metrics_states_the_sandbox_layers_before_it_scores_mbpp(
    tiny_model: Path, task_files: dict[str, Path], tmp_path: Path
) -> None:
    task = {"kind": "mbpp", "tests": ["assert double(2) == 4"], "setup": ""}
    code = write_jsonl(
        tmp_path / "code.jsonl",
        [{"instruction": "Write double.", "output": "def double(x): return 2 * x", "task": task}],
    )
    result = run("eval", "--base", tiny_model, "--data", code, "--metrics", "--metrics-max-new-tokens", 4)
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("sandbox:")] == [sandbox_statement()]
    assert lines[0] == sandbox_statement()  # the first thing printed, before the scores
    assert "pass_at_1" in result.output
    # a --metrics run with no MBPP file runs no code, and says nothing of the sandbox
    assert (
        "sandbox:" not in run("eval", "--base", tiny_model, "--data", task_files["law"], "--metrics").output
    )
