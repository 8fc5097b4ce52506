"""The results of a `simulate` run, read from results.json: a table, results.md and the plot.

`summary_table` gives one row per algorithm for the final round: the eval loss per eval file
and their mean, upload, download and total MB per round and the server's seconds per round,
each as (mean, std) over seeds (std 0 for one seed); with --metrics also the task scores of the
final round and of every round. It is the "summary" that `simulate` returns, which the CLI
prints. From it `render_markdown` writes results.md. `plot_traffic_vs_loss` draws
traffic_vs_loss.png: the mean eval loss against cumulative traffic per client, one line per
algorithm with a band of +- one std over seeds (with --metrics a second panel: the mean task
score). `task_label` is the task scores' part of a progress line.

Only rounds 0..config.rounds of the config's seeds count. matplotlib is imported inside
`plot_traffic_vs_loss`, so importing this module stays cheap.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsrd_cli.simulation.config import SimulateConfig

MB = 1024 * 1024


def _rounds(config: SimulateConfig, results: dict[str, Any], name: str) -> list[list[dict[str, Any]]]:
    """Per seed, the records of rounds 0..config.rounds of one algorithm."""
    per_seed = results["runs"].get(name, {})
    return [per_seed[str(s)][: config.rounds + 1] for s in config.seed_values() if str(s) in per_seed]


def _spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_table(config: SimulateConfig, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per algorithm: final-round eval losses, traffic and server time per round, over seeds.

    Traffic per round per participating client = mean upload + download, averaged over rounds.
    """
    rows = []
    for name in config.algorithms:
        seeds = _rounds(config, results, name)
        if not seeds or any(len(r) < config.rounds + 1 for r in seeds):
            continue
        row: dict[str, Any] = {"algorithm": name, "round": config.rounds, "seeds": len(seeds)}
        row["eval_loss"] = {
            domain: _spread([r[-1]["eval_loss"][domain] for r in seeds]) for domain in config.eval_names
        }
        row["mean_eval_loss"] = _spread([r[-1]["mean_eval_loss"] for r in seeds])
        row["upload_mb_per_round"] = _spread(
            [statistics.fmean(x["upload_bytes"] for x in r[1:]) / MB for r in seeds]
        )
        row["download_mb_per_round"] = _spread(
            [statistics.fmean(x["download_bytes"] for x in r[1:]) / MB for r in seeds]
        )
        row["traffic_mb_per_round"] = _spread(
            [statistics.fmean(x["upload_bytes"] + x["download_bytes"] for x in r[1:]) / MB for r in seeds]
        )
        row["server_seconds_per_round"] = _spread(
            [statistics.fmean(x["server_seconds"] for x in r[1:]) for r in seeds]
        )
        if config.task_metrics:
            names = list(seeds[0][-1]["extra"]["task_scores"])
            row["task_score"] = {
                domain: _spread([r[-1]["extra"]["task_scores"][domain] for r in seeds]) for domain in names
            }
            row["mean_task_score"] = _spread([r[-1]["extra"]["mean_task_score"] for r in seeds])
            row["task_scores_per_round"] = [
                {
                    "round": t,
                    **{d: statistics.fmean(r[t]["extra"]["task_scores"][d] for r in seeds) for d in names},
                    "mean": statistics.fmean(r[t]["extra"]["mean_task_score"] for r in seeds),
                }
                for t in range(config.rounds + 1)
            ]
        rows.append(row)
    return rows


def task_label(task_scores: dict[str, Any], tasks: dict[str, Any]) -> str:
    """ ", math exact_match 12.0%, law accuracy 30.0%, mean 21.0%" for a progress line; "" without."""
    if not task_scores:
        return ""
    parts = [
        f"{name} {tasks.get(name, {}).get('metric', 'score')} {score:.1%}"
        for name, score in task_scores["task_scores"].items()
    ]
    return ", " + ", ".join([*parts, f"mean {task_scores['mean_task_score']:.1%}"])


def _cell(pair: tuple[float, float], digits: int, seeds: int) -> str:
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def render_markdown(config: SimulateConfig, table: list[dict[str, Any]]) -> str:
    seeds = config.seeds
    lines = [
        f"# fedsrd simulate: round {config.rounds}",
        "",
        f"{len(config.client_data)} clients, {config.participants} training per round;"
        f" rank {config.rank}, alpha {config.alpha:g}; {config.local_steps} local steps, lr {config.lr:g},"
        f" batch {config.batch_size}; seeds {', '.join(map(str, config.seed_values()))}"
        + (" (mean ± std)" if seeds > 1 else "")
        + (f"; upload base sparsity {config.base_sparsity:g}" if config.base_sparsity is not None else "")
        + ("" if config.rescale else "; uploads not rescaled")
        + ("" if config.download_sparsity is None else f"; download sparsity {config.download_sparsity:g}")
        + ("" if config.download_value_dtype is None else f"; download values {config.download_value_dtype}")
        + ("; aggregates aligned to the clients' factors" if config.align else "")
        + (f"; factor choice {config.factor_choice}" if config.factor_choice is not None else "")
        + (f"; download fit {config.download_fit}" if config.download_fit is not None else "")
        + ".",
        "",
        "Eval loss (response tokens) of the global state after the final round. Traffic: bytes of the",
        "files one participating client sends (upload) and receives (broadcast) per round, in MB",
        "(2^20 bytes). Server: aggregate + broadcast seconds per round.",
        "",
    ]
    head = ["algorithm", *config.eval_names, "mean", "up MB", "down MB", "MB / round", "server s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for row in table:
        cells = [row["algorithm"]]
        cells += [_cell(row["eval_loss"][d], 4, seeds) for d in config.eval_names]
        cells.append(_cell(row["mean_eval_loss"], 4, seeds))
        cells += [
            _cell(row[k], 4, seeds)
            for k in ("upload_mb_per_round", "download_mb_per_round", "traffic_mb_per_round")
        ]
        cells.append(_cell(row["server_seconds_per_round"], 3, seeds))
        lines.append("| " + " | ".join(cells) + " |")
    if config.task_metrics and table:
        lines += _task_markdown(config, table)
    return "\n".join(lines) + "\n"


def _task_markdown(config: SimulateConfig, table: list[dict[str, Any]]) -> list[str]:
    """results.md's task scores: the final round's per eval file (as a percentage), and the
    mean over seeds of every round's scores per algorithm, round 0 being the base model."""
    seeds = config.seeds
    names = list(table[0]["task_score"])
    lines = [
        "",
        f"## Task scores, round {config.rounds}",
        "",
        "Accuracy (multiple choice, by option log-likelihood), exact match (GSM8K final answer) or",
        "pass@1 (MBPP, sandboxed) of the global state on each eval file's task records, in %.",
        "",
        "| " + " | ".join(["algorithm", *names, "mean"]) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(names) + 1)) + "|",
    ]
    for row in table:
        cells = [_cell(tuple(100 * v for v in row["task_score"][d]), 1, seeds) for d in names]
        cells.append(_cell(tuple(100 * v for v in row["mean_task_score"]), 1, seeds))
        lines.append("| " + " | ".join([row["algorithm"], *cells]) + " |")
    lines += ["", "## Task scores per round (round 0: the base model)", ""]
    for row in table:
        lines += [
            f"{row['algorithm']}" + (" (mean over seeds)" if seeds > 1 else "") + ":",
            "",
            "| " + " | ".join(["round", *names, "mean"]) + " |",
            "|" + "|".join(["---:"] * (len(names) + 2)) + "|",
        ]
        for point in row["task_scores_per_round"]:
            cells = [f"{100 * point[d]:.1f}" for d in [*names, "mean"]]
            lines.append("| " + " | ".join([str(point["round"]), *cells]) + " |")
        lines.append("")
    return lines


def plot_traffic_vs_loss(config: SimulateConfig, results: dict[str, Any], path: Path) -> None:
    """Mean eval loss against cumulative traffic per client (MB), one line per algorithm,
    with a band of +- one std over seeds."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from fedsrd_cli.files.atomic import write_bytes_atomic

    figure = Figure(figsize=(12, 4.5) if config.task_metrics else (7, 4.5), dpi=120)
    axes = figure.add_subplot(1, 2, 1) if config.task_metrics else figure.add_subplot()
    task_axes = figure.add_subplot(1, 2, 2) if config.task_metrics else None
    for name in config.algorithms:
        seeds = _rounds(config, results, name)
        if not seeds:
            continue
        length = min(len(r) for r in seeds)
        xs = [
            statistics.fmean(r[t]["cumulative_traffic_per_client"] for r in seeds) / MB for t in range(length)
        ]
        spreads = [_spread([r[t]["mean_eval_loss"] for r in seeds]) for t in range(length)]
        ys = [m for m, _ in spreads]
        (line,) = axes.plot(xs, ys, marker="o", markersize=3, label=name)
        if len(seeds) > 1:
            axes.fill_between(
                xs,
                [m - s for m, s in spreads],
                [m + s for m, s in spreads],
                color=line.get_color(),
                alpha=0.2,
            )
        if task_axes is not None:
            task = [_spread([100 * r[t]["extra"]["mean_task_score"] for r in seeds]) for t in range(length)]
            task_axes.plot(
                xs, [m for m, _ in task], marker="o", markersize=3, label=name, color=line.get_color()
            )
    if task_axes is not None:
        task_axes.set_xlabel("cumulative traffic per client (MB)")
        task_axes.set_ylabel("mean task score (%)")
        task_axes.set_title("task score vs traffic (round 0: the base model)")
        task_axes.grid(True, alpha=0.3)
        task_axes.legend()
    axes.set_xlabel("cumulative traffic per client (MB)")
    axes.set_ylabel("mean eval loss")
    axes.set_title(f"eval loss vs traffic ({config.seeds} seed{'s' if config.seeds > 1 else ''})")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue(), force=True)
