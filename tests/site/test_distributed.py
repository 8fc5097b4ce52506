"""Data-parallel local training (site/distributed.py): what torchrun's environment means, the
refusals, each rank's share of a step, and two gloo processes on CPU taking the steps of one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsrd_cli.errors import UsageError
from fedsrd_cli.site.distributed import Ranks, check_same, refuse_distributed, start, step_share

# Two processes sum their float32 gradients and loss sums in another order than one process
# does (per-rank partial sums, then the all-reduce), about 1e-7 relative apart; over a few AdamW
# steps of lr 2e-2 (factors moving by about 0.06) the factors stay within this of each other.
TOLERANCE = 1e-5


def test_environment_outside_torchrun_or_with_one_process_is_one_process() -> None:
    assert Ranks.from_environment({}) is None
    assert Ranks.from_environment({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    assert Ranks.from_environment(env) == Ranks(world=4, rank=2)
    assert Ranks.from_environment({**env, "RANK": "0", "LOCAL_RANK": "0"}).leader


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK and LOCAL_RANK is not set: start the processes with torchrun"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "2"}, "RANK 2 is not one of WORLD_SIZE 2"),
        (
            {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"},
            "WORLD_SIZE 16 spans 2 machines of 8 processes; start it with torchrun --nnodes 1",
        ),
    ],
)
def test_inconsistent_environment_is_refused(env: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Ranks.from_environment(env)


def test_dp_sgd_and_mps_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    ranks = Ranks(world=2, rank=1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UsageError, match="2 processes need a CUDA device each, or --device cpu; mps"):
        start(ranks, torch.device("mps"))  # what --device auto resolves to on a Mac
    with pytest.raises(UsageError, match="DP-SGD .* does not run over 2 processes.*would under-report"):
        refuse_distributed(ranks, dp=True, device="cpu")
    with pytest.raises(UsageError, match="--device mps is one device"):
        refuse_distributed(ranks, dp=False, device="mps")
    refuse_distributed(ranks, dp=False, device="auto")


def test_ranks_share_each_step_once_and_in_micro_batches() -> None:
    micro = [[5, 0, 3], [1, 4]]
    assert step_share(micro, 3, None) == micro
    shares = [step_share(micro, 2, Ranks(world=2, rank=r)) for r in range(2)]
    assert shares == [[[5, 3], [4]], [[0, 1]]]
    assert sorted(i for share in shares for batch in share for i in batch) == [0, 1, 3, 4, 5]
    # fewer examples than ranks: a rank may have nothing to run in a step
    assert step_share([[7]], 4, Ranks(world=2, rank=1)) == []


CONFIGS = [
    # a short last batch of an epoch (6 examples, 4 a batch), FedProx
    {"steps": 3, "lr": 2e-2, "batch_size": 4, "seed": 3, "prox_mu": 0.1},
    # micro-batches of one: a step of three examples splits 2 + 1, gradient accumulation
    {"steps": 2, "lr": 2e-2, "batch_size": 1, "grad_accum": 3, "seed": 5},
    # one example a step: process 1 has nothing to run and still takes the step
    {"steps": 2, "lr": 2e-2, "batch_size": 1, "seed": 1, "freeze_a": True},
]


def _train(model: Path, global_path: Path, data: Path, settings: dict, ranks: Ranks | None):
    from fedsrd_cli.files.artifacts import read_artifact
    from fedsrd_cli.site.data import load_datasets
    from fedsrd_cli.site.model import load_base
    from fedsrd_cli.site.training import TrainConfig, train_local

    base = load_base(model, "cpu", "fp32")
    config = TrainConfig(device="cpu", dtype="fp32", **settings)
    return train_local(base, read_artifact(global_path), load_datasets([data]), config, ranks=ranks)


def _worker(rank: int, folder: Path, model: Path, global_path: Path, data: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    try:
        ranks = Ranks(world=2, rank=rank)
        for index, settings in enumerate(CONFIGS):
            factors, stats = _train(model, global_path, data, settings, ranks)
            torch.save({"factors": factors, "log": stats.log}, folder / f"run{index}-rank{rank}.pt")
        try:
            check_same(ranks, {"--out": "a.safetensors", "--data": f"data-{rank}"})
        except UsageError as err:
            (folder / f"refused-rank{rank}.txt").write_text(str(err))
        # Both processes leave together: one tearing its group down while the other still
        # drains the last all-gather aborted process 0 once in CI (SIGABRT, "terminate called
        # without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_take_the_steps_of_one(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    from .conftest import run_cli

    global_path = tmp_path / "g0.safetensors"
    run_cli("init", "--base", tiny_model, "--out", global_path, "--rank", "4", "--json")
    torch.multiprocessing.spawn(_worker, args=(tmp_path, tiny_model, global_path, tiny_data), nprocs=2)
    worst = 0.0
    for index, settings in enumerate(CONFIGS):
        one, stats = _train(tiny_model, global_path, tiny_data, settings, None)
        runs = [torch.load(tmp_path / f"run{index}-rank{r}.pt") for r in range(2)]
        for name, tensor in one.items():
            # the ranks take identical steps: the same summed gradients on every rank
            assert torch.equal(runs[0]["factors"][name], runs[1]["factors"][name])
            worst = max(worst, float((runs[0]["factors"][name] - tensor).abs().max()))
        moved = max(float((runs[0]["factors"][n] - t).abs().max()) for n, t in _global(global_path).items())
        assert moved > 1e-3
        for mine, theirs in zip(stats.log, runs[0]["log"], strict=True):
            assert mine["tokens"] == theirs["tokens"]
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    print(f"largest difference of a factor, two processes vs one: {worst:.3g}")
    assert worst <= TOLERANCE
    for rank in range(2):
        message = (tmp_path / f"refused-rank{rank}.txt").read_text()
        assert message.startswith("process 1 of 2 was given another --data than process 0")


def _global(path: Path) -> dict[str, torch.Tensor]:
    from fedsrd_cli.files.artifacts import read_artifact

    state = read_artifact(path)
    return {name: state.tensor(name) for name in state.names}
