"""train-local and eval beside busy processes: the default thread policy against fixed counts.

    python benchmarks/threads.py --base DEMO/base --data DEMO/clients/arithmetic/train.jsonl \
        --eval-data DEMO/clients/arithmetic/eval.jsonl [--busy 2] [--busy-threads 2] \
        [--steps 30] [--repeat 5]

Starts `--busy` other processes that each multiply matrices with torch on `--busy-threads`
threads (what the issue measured: two such processes on a 2-core machine), then times, with
the fedsrd console script, `train-local --steps N` (on `--data`) and `eval` (on `--eval-data`)
three ways: `--threads 1`, `--threads <all cores>` and the default (one thread per core that
is idle when the command starts). The three ways take turns, `--repeat` times, so a slow
spell of the machine falls on all of them; each figure is the median, with the fastest and
slowest run beside it. The busy processes run throughout. It prints the default's ratio to
the best fixed count; the target is at most 1.10. Run it once without busy processes
(`--busy 0`) as the reference: there the default and `--threads <all cores>` are the same
setting, so their ratio shows the machine's noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY_CODE = """
import torch
torch.set_num_threads({threads})
x = torch.randn(768, 768)
while True:
    x = torch.tanh(x @ x)
"""


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--eval-data", type=Path, default=None, help="default: --data")
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--busy-threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fedsrd = str(Path(sys.executable).with_name("fedsrd"))
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "g0.safetensors"
        subprocess.run(
            [fedsrd, "init", "--base", str(args.base), "--rank", "16", "--alpha", "32", "--out", str(state)],
            check=True,
            capture_output=True,
        )
        busy = [
            subprocess.Popen([sys.executable, "-c", BUSY_CODE.format(threads=args.busy_threads)])
            for _ in range(args.busy)
        ]
        try:
            time.sleep(2.0 if busy else 0.0)  # let the busy processes take the cores
            commands = {
                "train-local": [
                    fedsrd, "train-local", "--base", str(args.base), "--global", str(state), "--data",
                    str(args.data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                    "--max-length", str(args.max_length), "--device", "cpu", "--force", "--quiet",
                    "--out", str(Path(folder) / "local.safetensors"),
                ],
                "eval": [
                    fedsrd, "eval", "--base", str(args.base), "--global", str(state), "--data",
                    str(args.eval_data or args.data), "--max-length", str(args.max_length), "--device",
                    "cpu", "--json",
                ],
            }  # fmt: skip
            load = f"{args.busy} busy processes of {args.busy_threads} threads on {cores} cores"
            print(f"{args.base.name}: {load}")
            for name, command in commands.items():
                ways = {
                    "1 thread": ["--threads", "1"],
                    f"{cores} threads": ["--threads", str(cores)],
                    "default": [],
                }
                runs: dict[str, list[float]] = {label: [] for label in ways}
                for _ in range(args.repeat):
                    for label, extra in ways.items():
                        runs[label].append(timed([*command, *extra], env))
                times = {label: statistics.median(values) for label, values in runs.items()}
                best = min(v for k, v in times.items() if k != "default")
                shown = ", ".join(
                    f"{k} {times[k]:.1f} s ({min(v):.1f}-{max(v):.1f})" for k, v in runs.items()
                )
                print(f"  {name:<12} {shown}; default / best fixed = {times['default'] / best:.2f}")
        finally:
            for process in busy:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
