"""What DP-SGD costs a local step: seconds per step with and without DP, measured in one run.

    python benchmarks/dp_step.py --base DEMO/base --data DEMO/clients/arithmetic/train.jsonl \
        [--steps 12] [--batch-size 8] [--rank 16] [--threads 1]

Runs `training.train_local` (the code `train-local` runs) on one base model and one data file:
`--steps` optimizer steps without DP, then the same with DP-SGD (Poisson batches of expected
size `--batch-size`, per-example clipping through Opacus's hooks, Gaussian noise from the
secret stream), from the same round-0 state. Prints the median seconds per step of each
(the first step is left out: it pays for imports and allocation) and their ratio. Under DP a
step takes a Poisson batch, whose size varies; the ratio is also given per record.
The demo's base and data: `fedsrd demo-assets --out DEMO`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsrd_cli.algorithms.protocol import initial_state  # noqa: E402
from fedsrd_cli.files.artifacts import read_artifact, write_artifact  # noqa: E402
from fedsrd_cli.files.model_spec import lora_module_shapes  # noqa: E402
from fedsrd_cli.privacy.dpsgd import DpSgdConfig  # noqa: E402
from fedsrd_cli.site.data import load_datasets  # noqa: E402
from fedsrd_cli.site.model import load_base  # noqa: E402
from fedsrd_cli.site.training import TrainConfig, train_local  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base(args.base, "cpu")
    lora, shapes = lora_module_shapes(args.base, "all-linear", args.rank, 2.0 * args.rank)
    datasets = load_datasets([args.data])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "global-r0.safetensors"
        payload = initial_state(shapes, lora, 0, base.fingerprint)
        write_artifact(path, payload.header, payload.tensors)
        state = read_artifact(path, kind="state")
        plain = TrainConfig(
            steps=args.steps, lr=1e-3, batch_size=args.batch_size, max_length=args.max_length, device="cpu"
        )
        private = TrainConfig(
            steps=args.steps,
            lr=1e-3,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device="cpu",
            dp=DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0),
        )
        rows = []
        for label, config in (("without DP", plain), ("DP-SGD", private)):
            _tensors, stats = train_local(base, state, datasets, config)
            seconds = [r["seconds"] for r in stats.log[1:]]
            records = [r.get("sampled", args.batch_size) for r in stats.log[1:]]
            per_record = [s / n for s, n in zip(seconds, records, strict=True) if n]
            rows.append(
                (label, statistics.median(seconds), statistics.median(per_record), statistics.mean(records))
            )
    setting = f"rank {args.rank}, batch {args.batch_size}, {args.max_length} tokens, {args.threads} thread(s)"
    print(f"{args.base.name}: {setting}")
    for label, step, record, mean_records in rows:
        print(f"  {label:<10}  {step:7.3f} s/step  {record:7.4f} s/record  ({mean_records:.1f} records/step)")
    (_, plain_step, plain_record, _), (_, dp_step, dp_record, _) = rows
    ratios = f"{dp_step / plain_step:.2f}x per step, {dp_record / plain_record:.2f}x per record"
    print(f"  DP-SGD / without DP: {ratios}")


if __name__ == "__main__":
    main()
