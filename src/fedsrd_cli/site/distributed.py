"""One site's training over several processes of one machine (torchrun): data parallel, one state.

`Ranks.from_environment` reads what torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE); None outside torchrun or with one process. `refuse_distributed` names the
options that cannot run over several processes, `start` / `stop` open and close the process
group (nccl on CUDA, gloo on CPU), and `check_same` refuses ranks given different inputs.

During training (site/training.py) every rank draws the same seeded sequence of batches as a
one-process run; `step_share` gives a rank its part of each step's examples and
`sum_gradients` adds the ranks' gradients and losses, so that every rank takes the optimizer
step one process would take on the whole batch (up to float rounding: the sums are taken in
another order).

The gradients are summed with one all-reduce per optimizer step rather than by wrapping the
model in DistributedDataParallel: DDP needs every rank to run a forward and backward pass in
every step, but a step's batch can hold fewer examples than there are ranks (a short last batch
of an epoch, a small --batch-size), and DDP's mean over ranks would weigh a rank's examples by
its share instead of by its label tokens. Only LoRA factors train, so the all-reduce is small.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from fedsrd_cli.errors import UsageError

LAUNCH = "torchrun --nproc-per-node N -m fedsrd_cli.cli train-local ..."


@dataclass(frozen=True)
class Ranks:
    """This process's place among a site's training processes: `world` processes, this one `rank`
    (also its index among the machine's devices, as one machine runs them all)."""

    world: int
    rank: int

    def __post_init__(self) -> None:
        if self.world < 2 or not 0 <= self.rank < self.world:
            raise UsageError(f"RANK {self.rank} is not one of WORLD_SIZE {self.world} processes")

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that prints and writes the local state."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Ranks | None:
        """The ranks torchrun describes in `env` (default os.environ); None for one process."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return None
        world = _whole(env, "WORLD_SIZE")
        if world < 1:
            raise UsageError(f"WORLD_SIZE must be >= 1, got {world}")
        if world == 1:
            return None
        missing = [name for name in ("RANK", "LOCAL_RANK") if name not in env]
        if missing:
            raise UsageError(
                f"WORLD_SIZE is {world} but {' and '.join(missing)} is not set: start the processes"
                f" with {LAUNCH}"
            )
        rank, local_rank = _whole(env, "RANK"), _whole(env, "LOCAL_RANK")
        local_world = _whole(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        if local_world != world or local_rank != rank:
            raise UsageError(
                f"train-local trains one site's state on one machine, but WORLD_SIZE {world} spans"
                f" {world // max(local_world, 1)} machines of {local_world} processes; start it with"
                " torchrun --nnodes 1"
            )
        return cls(world, rank)


def _whole(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"{name}={env[name]!r} is not a whole number") from None


def refuse_distributed(ranks: Ranks, dp: bool, device: str) -> None:
    """UsageError, before anything is loaded, for what cannot train over several processes."""
    if dp:
        raise UsageError(
            f"DP-SGD (--dp-*) does not run over {ranks.world} processes: its per-record clipping,"
            " Poisson sampling and noise are those of one process, and a ledger of one rank's steps"
            " would under-report; run train-local with DP-SGD as one process (without torchrun)"
        )
    if device == "mps":
        raise UsageError(
            f"--device mps is one device: {ranks.world} processes need a CUDA device each, or --device cpu"
        )


def start(ranks: Ranks, device: torch.device) -> None:
    """Join the site's process group: nccl on this process's CUDA device (LOCAL_RANK), gloo on CPU.
    On CUDA, this process's device becomes the current one, so --device cuda and auto mean it."""
    import torch.distributed as dist

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UsageError(
                f"WORLD_SIZE is {ranks.world} but {name} is not set: start the processes with {LAUNCH}"
            )
    if device.type not in ("cuda", "cpu"):  # --device auto on a Mac: mps
        raise UsageError(
            f"{ranks.world} processes need a CUDA device each, or --device cpu; {device.type} is one device"
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if ranks.rank >= count:
            raise UsageError(
                f"process {ranks.rank} of {ranks.world} has no CUDA device of its own: this machine has"
                f" {count}; give --nproc-per-node {count} or less"
            )
        torch.cuda.set_device(ranks.rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world)


def stop() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_same(ranks: Ranks, inputs: Mapping[str, str]) -> None:
    """UsageError on every rank whose `inputs` (what a flag names, as text) differ from rank 0's:
    the processes of one site must all run the same command."""
    import torch.distributed as dist

    gathered: list[dict[str, str] | None] = [None] * ranks.world
    dist.all_gather_object(gathered, dict(inputs))
    first = gathered[0] or {}
    for rank, theirs in enumerate(gathered):
        differ = sorted(
            key for key in first.keys() | (theirs or {}).keys() if first.get(key) != (theirs or {}).get(key)
        )
        if differ:
            raise UsageError(
                f"process {rank} of {ranks.world} was given another {', '.join(differ)} than process 0:"
                " every process of a site runs the same train-local command"
            )


def step_share(micro: list[list[int]], batch_size: int, ranks: Ranks | None) -> list[list[int]]:
    """The micro-batches this process runs in a step whose one-process micro-batches are `micro`:
    every rank-th example of the step (from this rank's), in micro-batches of at most batch_size."""
    if ranks is None:
        return micro
    mine = [index for batch in micro for index in batch][ranks.rank :: ranks.world]
    return [mine[first : first + batch_size] for first in range(0, len(mine), batch_size)]


def sum_gradients(params: list[torch.nn.Parameter], values: list[float], ranks: Ranks | None) -> list[float]:
    """Add the ranks' gradients of `params` (None counts as zeros: a rank with no example this
    step) and their `values` (e.g. loss sums); every rank gets the sums. One process: unchanged."""
    if ranks is None:
        return values
    import torch.distributed as dist

    device = params[0].device
    flat = torch.cat(
        [
            (
                p.grad.detach().reshape(-1).float()
                if p.grad is not None
                else torch.zeros(p.numel(), device=device)
            )
            for p in params
        ]
        + [torch.tensor(values, dtype=torch.float32, device=device)]
    )
    dist.all_reduce(flat)
    for param, piece in zip(params, _pieces(flat, params), strict=False):
        summed = piece.view_as(param).to(param.dtype)
        if param.grad is None:
            param.grad = summed.clone()
        else:
            param.grad.copy_(summed)
    return flat[-len(values) :].tolist() if values else []


def _pieces(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> Iterator[torch.Tensor]:
    offset = 0
    for param in params:
        yield flat[offset : offset + param.numel()]
        offset += param.numel()
