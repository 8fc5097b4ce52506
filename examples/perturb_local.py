"""Stand-in for local training in examples/round.sh: a documented perturbation.

    python examples/perturb_local.py GLOBAL OUT --seed S [--scale 0.01] [--samples N]

Writes a local state (kind `state`, lineage pointing at GLOBAL) whose factors are
GLOBAL's plus seeded noise: every A and B element gets N(0, scale^2), and about 2% of
elements get ten times that (real LoRA deltas are heavy-tailed). It exercises the
protocol exactly as `fedsrd train-local` output would, without a model or data.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from fedsrd_cli.files.artifacts import read_artifact, write_artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("global_state")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--scale", type=float, default=0.01)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()

    state = read_artifact(args.global_state, kind="state")
    generator = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for name, tensor in state.iter_tensors():
        noise = torch.randn(tensor.shape, generator=generator) * args.scale
        spikes = torch.rand(tensor.shape, generator=generator) < 0.02
        tensors[name] = tensor + noise * (1 + 9 * spikes)
    header = replace(state.header, parent_hash=state.header.content_hash, num_samples=args.samples, info={})
    write_artifact(args.out, header, tensors)
    print(f"wrote {args.out} (simulated training of {args.global_state}, seed {args.seed})")


if __name__ == "__main__":
    main()
