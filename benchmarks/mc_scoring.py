"""Multiple-choice scoring: the prompt's pass shared by its choices, against one pass per choice.

    python benchmarks/mc_scoring.py --base DEMO/base --data REAL/clients/medicine/eval.jsonl \
        [--examples 10] [--max-length 384] [--batch-size 16] [--threads 1]

Scores the first `--examples` multiple-choice records of `--data` with `task_eval.choice_logliks`
(what `eval --metrics` and `simulate --metrics` run) twice on one loaded model: as it runs by
default (each prompt once, its choices on a copy of the prompt's key/value cache), and with
`share_prompt=False` (every prompt + choice row in padded batches, the way it ran before).
Prints the seconds of each, their ratio, the largest difference of a log-likelihood between
the two, and whether every example's chosen option agrees. The real-task suite:
`fedsrd demo-assets --suite real --out REAL`; the demo's base: `fedsrd demo-assets --out DEMO`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsrd_cli.site import data as data_mod  # noqa: E402
from fedsrd_cli.site import task_eval  # noqa: E402
from fedsrd_cli.site import task_metrics as tm  # noqa: E402
from fedsrd_cli.site.model import load_base  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base(args.base, "cpu")
    examples = [ex for ex in data_mod.read_jsonl(args.data).examples if ex.task and ex.task.kind == "mc"]
    examples = examples[: args.examples]
    if not examples:
        raise SystemExit(f"{args.data}: no multiple-choice records")
    timed = {}
    for share in (False, True):
        start = time.perf_counter()
        found = task_eval.choice_logliks(base, examples, args.batch_size, args.max_length, share_prompt=share)
        timed[share] = (time.perf_counter() - start, found)
    (per_choice_s, reference), (shared_s, shared) = timed[False], timed[True]
    gap = max(
        abs(a - b) for ra, rb in zip(reference, shared, strict=True) for a, b in zip(ra, rb, strict=True)
    )
    same = all(tm.mc_prediction(a) == tm.mc_prediction(b) for a, b in zip(reference, shared, strict=True))
    choices = sum(len(ex.task.choices) for ex in examples)
    print(
        f"{len(examples)} examples, {choices} choices, max length {args.max_length}, {args.threads} thread(s)"
    )
    print(f"one pass per choice (reference): {per_choice_s:8.2f} s")
    print(f"prompt shared by its choices:    {shared_s:8.2f} s")
    print(f"ratio (reference / shared):      {per_choice_s / shared_s:8.2f}x")
    print(f"largest log-likelihood difference: {gap:.2e}; same chosen option for every example: {same}")


if __name__ == "__main__":
    main()
