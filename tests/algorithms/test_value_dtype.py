"""bf16 values, the default: the same kept elements as fp32, each value rounded once."""

from __future__ import annotations

import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.protocol import apply_broadcast
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact

from ..conftest import make_global
from .rounds import make_locals, upload, write


def test_the_default_values_are_bf16_both_ways():
    assert SparsifyConfig().value_dtype == "bf16" and BroadcastConfig().value_dtype == "bf16"


def test_bf16_upload_and_broadcast_round_the_fp32_values_once(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 2, "x")
    fp32 = [
        upload(tmp_path, "fedsrd", g0, p, f"c{i}", SparsifyConfig(value_dtype="fp32"))
        for i, p in enumerate(locals_)
    ]
    bf16 = [upload(tmp_path, "fedsrd", g0, p, f"c{i}", SparsifyConfig()) for i, p in enumerate(locals_)]
    for wide, narrow in zip(fp32, bf16, strict=True):
        assert narrow.header.layout == wide.header.layout
        for name in wide.header.layout:
            assert torch.equal(narrow.upload_kept(name), wide.upload_kept(name))  # same elements kept
            values = naming.values_key(name)
            assert narrow.dtypes[values] == torch.bfloat16
            assert torch.equal(narrow.tensor(values), wide.tensor(values).to(torch.bfloat16))
        assert narrow.path.stat().st_size < wide.path.stat().st_size

    algorithm = get_algorithm("fedsrd")
    state = read_artifact(g0)
    agg = read_artifact(
        write(algorithm.aggregate(state, bf16, AggregateConfig()), tmp_path / "agg.safetensors")
    )
    bc_wide, _ = algorithm.broadcast(state, agg, BroadcastConfig(seed=3, value_dtype="fp32"))
    bc_narrow, nxt = algorithm.broadcast(state, agg, BroadcastConfig(seed=3))
    assert bc_narrow.header.layout == bc_wide.header.layout
    for name, tensor in bc_wide.tensors.items():
        assert torch.equal(bc_narrow.tensors[name], tensor.to(torch.bfloat16))
    # a client applying the bf16 broadcast holds the coordinator's next state, bit for bit
    broadcast = read_artifact(write(bc_narrow, tmp_path / "bc.safetensors"))
    applied = apply_broadcast(state, broadcast)
    assert applied.tensors.keys() == nxt.tensors.keys()
    assert all(torch.equal(applied.tensors[n], t) for n, t in nxt.tensors.items())
