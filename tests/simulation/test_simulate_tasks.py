"""simulate --metrics on a tiny model: task scores per organisation and their mean, every round
(round 0 included) in results.json, results.md, the plot and the printed tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.simulation.config import SimulateConfig
from fedsrd_cli.site.sandbox import sandbox_statement

from ..conftest import build_tiny_model, write_jsonl
from ..site.test_task_eval import MC_RECORDS

runner = CliRunner()

MATH = [
    {"instruction": f"What is {a} + {b}?", "output": f"{a} + {b} = {a + b}\n#### {a + b}",
     "task": {"kind": "gsm8k", "answer": str(a + b)}}
    for a, b in [(1, 2), (3, 4), (5, 6)]
]  # fmt: skip


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("suite")
    files = {"model": build_tiny_model(d / "tiny-llama-64", hidden=64)}
    for org, records in (("law", MC_RECORDS), ("math", MATH)):
        (d / org).mkdir()
        files[f"{org}-train"] = write_jsonl(d / org / "train.jsonl", records)
        files[f"{org}-eval"] = write_jsonl(d / org / "eval.jsonl", records[:3])
    return files


def args(suite: dict[str, Path], out: Path, *extra: object) -> list[str]:
    return [str(a) for a in [
        "simulate", "--base", suite["model"],
        "--clients-data", suite["law-train"], "--clients-data", suite["math-train"],
        "--eval-data", suite["law-eval"], "--eval-data", suite["math-eval"],
        "--algorithms", "fedavg", "--rounds", 2, "--local-steps", 2, "--batch-size", 2, "--lr", "1e-2",
        "--rank", 4, "--alpha", 8, "--threads", 1, "--out", out, *extra,
    ]]  # fmt: skip


@pytest.mark.slow
def test_simulate_records_task_scores_per_round(suite: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, args(suite, out, "--metrics", "--metrics-max-new-tokens", 8, "--json"))
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == {
        "law/eval": {"kind": "mc", "metric": "accuracy", "examples": 3},
        "math/eval": {"kind": "gsm8k", "metric": "exact_match", "examples": 3},
    }
    records = results["runs"]["fedavg"]["0"]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:  # round 0 (the base model) too
        scores = r["extra"]["task_scores"]
        assert set(scores) == {"law/eval", "math/eval"}
        assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in scores.values())
        assert r["extra"]["mean_task_score"] == pytest.approx(sum(scores.values()) / 2)
    row = summary["summary"][0]
    assert [p["round"] for p in row["task_scores_per_round"]] == [0, 1, 2]
    assert row["task_scores_per_round"][0]["law/eval"] == records[0]["extra"]["task_scores"]["law/eval"]
    assert row["mean_task_score"][0] == records[-1]["extra"]["mean_task_score"]
    table = (out / "results.md").read_text()
    assert (
        "## Task scores, round 2" in table and "## Task scores per round (round 0: the base model)" in table
    )
    assert (out / "traffic_vs_loss.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["task_metrics"] is True
    # a rerun without --metrics is another run: refused, not mixed
    refused = runner.invoke(app, args(suite, out))
    assert refused.exit_code == 2 and "task_metrics" in refused.output
    # the text output prints the scores per organisation per round
    text = runner.invoke(app, args(suite, out, "--metrics", "--metrics-max-new-tokens", 8))
    assert text.exit_code == 0, text.output
    assert "fedavg: task scores (round 0: base model)" in text.output
    assert "law/eval" in text.output and "math/eval" in text.output


def test_task_metrics_settings_are_checked_and_recorded_only_when_on() -> None:
    common = dict(
        base="b", client_data=("a",), client_ids=("a",), eval_data=("e",), eval_names=("e",),
        algorithms=("fedavg",), rounds=1,
    )  # fmt: skip
    assert "task_metrics" not in SimulateConfig(**common).record()  # runs from before --metrics resume
    assert SimulateConfig(**common, task_metrics=True).record()["metrics_max_new_tokens"] == 128
    with pytest.raises(Exception, match="--metrics-max-new-tokens must be in"):
        SimulateConfig(**common, task_metrics=True, metrics_max_new_tokens=0)


def test_metrics_max_new_tokens_defaults_to_128_and_old_runs_resume_with_theirs(tmp_path: Path) -> None:
    """Issue 32: simulate's --metrics-max-new-tokens defaulted to 256 where the documented real-task
    runs used 128. New runs take 128; a run recorded with the old default (256) still resumes
    without the flag and keeps 256; a value given explicitly is checked against the record."""
    from dataclasses import replace

    from fedsrd_cli.errors import UsageError
    from fedsrd_cli.simulation.records import load_results, with_recorded_defaults

    common = dict(
        base="b", client_data=("a",), client_ids=("a",), eval_data=("e",), eval_names=("e",),
        algorithms=("fedavg",), rounds=1, task_metrics=True,
    )  # fmt: skip
    fresh = tmp_path / "fresh"
    assert with_recorded_defaults(fresh, SimulateConfig(**common)).metrics_max_new_tokens == 128
    old = tmp_path / "old"
    old.mkdir()
    recorded = SimulateConfig(**common, metrics_max_new_tokens=256).record()
    (old / "config.json").write_text(json.dumps(recorded))
    resumed = with_recorded_defaults(old, SimulateConfig(**common))
    assert resumed.metrics_max_new_tokens == 256 and load_results(old, resumed)["runs"] == {}
    for given in (128, 64):
        with pytest.raises(UsageError, match="metrics_max_new_tokens"):
            load_results(
                old, with_recorded_defaults(old, SimulateConfig(**common, metrics_max_new_tokens=given))
            )
    plain = replace(SimulateConfig(**common), task_metrics=False)  # without --metrics nothing changes
    assert "metrics_max_new_tokens" not in with_recorded_defaults(old, plain).record()


def test_simulate_metrics_needs_task_records(suite: dict[str, Path], tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    argv = args(suite, tmp_path / "run", "--metrics")
    argv[argv.index(str(suite["law-eval"]))] = str(plain)
    argv[argv.index(str(suite["math-eval"]))] = str(plain)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and "no --eval-data file has task records" in result.output


@pytest.mark.slow
def test_simulate_metrics_states_the_sandbox_layers_first(suite: dict[str, Path], tmp_path: Path) -> None:
    task = {"kind": "mbpp", "tests": ["assert double(2) == 4"], "setup": ""}
    code = write_jsonl(
        tmp_path / "code.jsonl",
        [{"instruction": "Write double.", "output": "def double(x): return 2 * x", "task": task}],
    )
    argv = args(suite, tmp_path / "run", "--metrics", "--metrics-max-new-tokens", 4, "--eval-data", code)
    argv[argv.index("--rounds") + 1] = "1"
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.output.splitlines()
    assert lines[0] == sandbox_statement()
    assert [line for line in lines if line.startswith("sandbox:")] == [sandbox_statement()]
