"""Overlay several `fedsrd simulate` results directories: eval loss against traffic per client.

    python benchmarks/results_plot.py --out docs/results-real-r16.png RUN_DIR [RUN_DIR ...] \
        [--label RUN_DIR=NAME ...] [--title TITLE] [--x traffic|round] [--log-x]

Each algorithm of each directory is one line (mean over the directory's seeds, a band of
+- one std when there are several), labelled "algorithm" or, when the directory was run
with download or value settings (config.json: damping, factor_choice, download_fit,
value_dtype, lr, local_steps), with those settings; --label DIR=NAME overrides a
directory's label prefix. It also prints, per line, the final round's mean eval loss, the
cumulative MB per client, and the largest loss ratio to the best loss so far
(the "never diverges" check: 1.5 or more means a round broke).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from pathlib import Path

MB = 1024 * 1024
SETTINGS = ("damping", "factor_choice", "download_fit", "value_dtype")


def lines_of(run_dir: Path, prefix: str | None) -> list[dict]:
    config = json.loads((run_dir / "config.json").read_text())
    runs = json.loads((run_dir / "results.json").read_text())["runs"]
    extra = [f"{k}={config[k]}" for k in SETTINGS if k in config]
    out = []
    for algorithm, seeds in runs.items():
        records = [seeds[s] for s in sorted(seeds, key=int)]
        length = min(len(r) for r in records)
        label = prefix or " ".join([algorithm, *extra])
        losses = [[r[t]["mean_eval_loss"] for r in records] for t in range(length)]
        out.append(
            {
                "label": label,
                "seeds": len(records),
                "rounds": length - 1,
                "traffic": [
                    statistics.fmean(r[t]["cumulative_traffic_per_client"] for r in records) / MB
                    for t in range(length)
                ],
                "mean": [statistics.fmean(x) for x in losses],
                "std": [statistics.stdev(x) if len(x) > 1 else 0.0 for x in losses],
                "worst_jump": max(
                    max(
                        r[t]["mean_eval_loss"] / min(x["mean_eval_loss"] for x in r[: t + 1])
                        for t in range(length)
                    )
                    for r in records
                ),
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", action="append", default=[], help="RUN_DIR=NAME")
    parser.add_argument("--title", default="eval loss against traffic per client")
    parser.add_argument("--log-x", action="store_true", help="logarithmic traffic axis")
    parser.add_argument("--x", choices=("traffic", "round"), default="traffic", help="what the x axis shows")
    args = parser.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120)
    axes = figure.add_subplot()
    for run_dir in args.runs:
        for line in lines_of(run_dir, labels.get(str(run_dir))):
            xs = line["traffic"] if args.x == "traffic" else list(range(line["rounds"] + 1))
            (drawn,) = axes.plot(xs, line["mean"], marker="o", markersize=3, label=line["label"])
            if line["seeds"] > 1:
                low = [m - s for m, s in zip(line["mean"], line["std"], strict=True)]
                high = [m + s for m, s in zip(line["mean"], line["std"], strict=True)]
                axes.fill_between(xs, low, high, color=drawn.get_color(), alpha=0.2)
            print(
                f"{line['label']:60s} seeds {line['seeds']}  round {line['rounds']:2d}"
                f"  loss {line['mean'][-1]:.4f}  {line['traffic'][-1]:8.1f} MB/client"
                f"  worst jump {line['worst_jump']:.2f}x"
            )
    if args.log_x:
        axes.set_xscale("symlog", linthresh=1.0)
    axes.set_xlabel("cumulative traffic per client (MB)" if args.x == "traffic" else "round")
    axes.set_ylabel("mean eval loss")
    axes.set_title(args.title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    args.out.write_bytes(buffer.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
