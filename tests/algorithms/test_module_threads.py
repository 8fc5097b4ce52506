"""aggregate and broadcast work on several modules at once (math.threads.thread_map): their
files must not depend on it. A round's aggregate, broadcast and next state are compared,
header and every tensor, between torch on one thread (modules in turn) and two (modules two
at a time), for FedSRD's default, FedAvg and an organisation-level DP broadcast, whose noise
is one stream drawn in module order."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.base import Payload
from fedsrd_cli.algorithms.private import PrivateDownload
from fedsrd_cli.algorithms.protocol import default_download_seed
from fedsrd_cli.config import AggregateConfig, BroadcastConfig
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.privacy.ledger import OrganisationDp

from .rounds import make_locals, upload, write


def same(one: Payload, other: Payload) -> None:
    assert one.header == other.header
    assert list(one.tensors) == list(other.tensors)  # the same order, too
    for name, tensor in one.tensors.items():
        assert torch.equal(tensor, other.tensors[name]), name


def with_threads(threads: int, run):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["fedsrd", "fedavg"])
def test_a_round_is_the_same_on_one_thread_and_two(tmp_path: Path, global_path: Path, method: str):
    g = read_artifact(global_path)
    uploads = [
        upload(tmp_path, method, global_path, p, f"c{i}")
        for i, p in enumerate(make_locals(tmp_path, global_path, 3, method))
    ]
    algorithm = get_algorithm(method)

    def round_(threads: int):
        def run():
            agg = algorithm.aggregate(g, uploads, AggregateConfig(method))
            agg_file = read_artifact(write(agg, tmp_path / f"agg-{method}-{threads}.safetensors"))
            sparsity = algorithm.default_download_sparsity
            bc, nxt = algorithm.broadcast(g, agg_file, BroadcastConfig(sparsity, seed=5))
            return agg, bc, nxt

        return with_threads(threads, run)

    for one, two in zip(round_(1), round_(2), strict=True):
        same(one, two)


def test_a_dp_broadcast_draws_its_noise_in_module_order_on_two_threads(
    tmp_path: Path, global_path: Path, monkeypatch: pytest.MonkeyPatch
):
    method = "fedsrd-e"
    g = read_artifact(global_path)
    uploads = [
        upload(tmp_path, method, global_path, p, f"c{i}")
        for i, p in enumerate(make_locals(tmp_path, global_path, 3, "dp"))
    ]
    algorithm = get_algorithm(method)
    org = OrganisationDp(0.05, 1.0, 1.0, 1e-3, 3, 3)
    agg = read_artifact(
        write(
            algorithm.aggregate(g, uploads, AggregateConfig(method, organisation_dp=org)),
            tmp_path / "a.safetensors",
        )
    )
    config = BroadcastConfig(0.0, default_download_seed(g, agg), "fp32", factor_choice="b", noise_seed=3)
    one = with_threads(1, lambda: algorithm.broadcast(g, agg, config))
    drawn_on: list[str] = []
    noise = PrivateDownload.noise

    def recorded(self: PrivateDownload, shape: tuple[int, ...]) -> torch.Tensor:
        drawn_on.append(threading.current_thread().name)
        return noise(self, shape)

    monkeypatch.setattr(PrivateDownload, "noise", recorded)
    two = with_threads(2, lambda: algorithm.broadcast(g, agg, config))
    for a, b in zip(one, two, strict=True):
        same(a, b)
    # one stream, so one thread: the caller's (a worker pool would make the order a race)
    assert drawn_on == [threading.current_thread().name] * len(g.modules())
