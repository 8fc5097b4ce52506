"""What the Flower tests share without importing flwr: the file-based CLI rounds to compare with,
and keys for a signed run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fedsrd_cli.flower.coordinator import sample_clients
from fedsrd_cli.simulation.rounds import client_train_seed

RunCli = Callable[..., object]


def make_keys(root: Path, clients: Sequence[str], run_cli: RunCli) -> dict[str, Path]:
    """keys/NAME.key for the coordinator and each client; trust-server/ (every NAME.pub) and, per
    client, trust-CLIENT/ (coordinator.pub and its own, for the states it signs), as
    docs/security.md sets them up."""
    keys = root / "keys"
    keys.mkdir()
    for name in ("coordinator", *clients):
        run_cli("keygen", "--out", keys / name)
    found = {"keys": keys, "trust-server": root / "trust-server"}
    found["trust-server"].mkdir()
    for name in ("coordinator", *clients):
        (found["trust-server"] / f"{name}.pub").write_bytes((keys / f"{name}.pub").read_bytes())
    for client in clients:
        trust = found[f"trust-{client}"] = root / f"trust-{client}"
        trust.mkdir()
        for name in ("coordinator", client):
            (trust / f"{name}.pub").write_bytes((keys / f"{name}.pub").read_bytes())
    return found


def cli_rounds(
    run_cli: RunCli,
    work: Path,
    base: Path,
    data: dict[str, Path],
    start: Path,
    rounds: Sequence[int],
    *,
    seed: int = 0,
    steps: int = 2,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_length: int = 128,
    method: str = "fedsrd",
    sample: int = 0,
    keys: dict[str, Path] | None = None,
) -> Path:
    """The rounds a Flower run makes, made with the CLI's commands on files; returns the last global state.

    `data` lists the clients in the run's order (the population); the seeds are the ones
    docs/flower.md documents: the sample of `coordinator.sample_clients`, and `train-local --seed`
    = simulate.client_train_seed(seed, round, index of the client in the population).
    """
    from fedsrd_cli.algorithms import get_algorithm

    algorithm = get_algorithm(method)
    population = list(data)
    state = start
    for round_index in rounds:
        round_dir = work / f"round-{round_index}"
        round_dir.mkdir(parents=True)
        uploads = []
        for client in sample_clients(population, sample, seed, round_index):
            signing_client = []
            if keys:
                signing_client = ["--sign-key", keys["keys"] / f"{client}.key"]
                signing_client += ["--trust", keys[f"trust-{client}"]]
            local = round_dir / f"local-{client}.safetensors"
            train = ["train-local", "--base", base, "--global", state, "--data", data[client]]
            train += ["--client", client]
            train += ["--steps", steps, "--lr", lr, "--batch-size", batch_size, "--max-length", max_length]
            train += ["--seed", client_train_seed(seed, round_index, population.index(client))]
            train += [algorithm.training_flag] if algorithm.training_flag else []
            run_cli(*train, "--out", local, "--quiet", *signing_client)
            upload = round_dir / f"upload-{client}.safetensors"
            run_cli(
                "sparsify", "--global", state, "--local", local, "--client", client, "--method", method,
                "--out", upload, *signing_client,
            )  # fmt: skip
            uploads.append(upload)
        signing = []
        if keys:
            signing = ["--sign-key", keys["keys"] / "coordinator.key", "--trust", keys["trust-server"]]
        aggregate = round_dir / "aggregate.safetensors"
        run_cli(
            "aggregate", "--global", state, "--method", method, "--out", aggregate,
            *sorted(uploads), *signing,
        )  # fmt: skip
        next_state = work / f"global-r{round_index}.safetensors"
        run_cli(
            "broadcast", "--global", state, "--aggregate", aggregate,
            "--out", round_dir / "broadcast.safetensors", "--out-global", next_state, *signing,
        )  # fmt: skip
        state = next_state
    return state
