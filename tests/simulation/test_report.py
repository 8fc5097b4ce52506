"""report.py: the results of a simulate run as a table, results.md and the plot (the whole run is
tests/simulation/test_simulate.py and test_simulate_tasks.py)."""

from __future__ import annotations

from fedsrd_cli.simulation.report import task_label


def test_task_label_names_each_file_its_metric_and_the_mean() -> None:
    label = task_label(
        {"task_scores": {"math": 0.12, "law": 0.3}, "mean_task_score": 0.21},
        {"math": {"metric": "exact_match"}, "law": {"metric": "accuracy"}},
    )
    assert label == ", math exact_match 12.0%, law accuracy 30.0%, mean 21.0%"
    assert task_label({}, {}) == ""
