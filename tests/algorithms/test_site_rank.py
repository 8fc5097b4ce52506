"""A rank per site (issue 33, item 3): uploads of a site rank r_i < r carry r_i components, and
the coordinator's reconstruction of a mix of ranks matches a dense reference built by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.protocol import check_uploads, update_norm
from fedsrd_cli.algorithms.site_rank import padded, trained_part
from fedsrd_cli.config import AggregateConfig, SparsifyConfig
from fedsrd_cli.errors import MismatchError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact, write_artifact

from ..conftest import make_global, make_local
from .rounds import upload, write


def at_site_rank(global_file: Path, local_file: Path, site_rank: int | None, out: Path) -> Path:
    """A local state that trained only rank components 0..site_rank-1 (the rest reset to the
    global values) and records info.site_rank, as `train-local --rank` writes it."""
    state, local = read_artifact(global_file), read_artifact(local_file)
    tensors = {}
    for name in local.names:
        trained, start = local.tensor(name).clone(), state.tensor(name)
        if site_rank is not None and ".lora_A." in name:
            trained[site_rank:] = start[site_rank:]
        elif site_rank is not None and ".lora_B." in name:
            trained[:, site_rank:] = start[:, site_rank:]
        tensors[name] = trained
    info = {} if site_rank is None else {"site_rank": site_rank}
    write_artifact(out, replace(local.header, content_hash="", info=info), tensors)
    return out


def mixed_locals(tmp_path: Path, g0: Path, ranks: list[int | None]) -> list[Path]:
    paths = []
    for i, site_rank in enumerate(ranks):
        raw = make_local(g0, tmp_path / f"raw-{i}.safetensors", seed=300 + i, num_samples=5 + 2 * i)
        paths.append(at_site_rank(g0, raw, site_rank, tmp_path / f"local-{i}.safetensors"))
    return paths


def test_trained_part_and_padding_against_a_hand_built_reference():
    prev_b = torch.randn(6, 4, dtype=torch.float64)
    prev_a = torch.randn(4, 5, dtype=torch.float64)
    delta_b = torch.zeros(6, 4)
    delta_b[:, :2] = torch.randn(6, 2)
    delta_a = torch.zeros(4, 5)
    delta_a[:2] = torch.randn(2, 5)
    assert torch.equal(trained_part("B", delta_b, 2, "x"), delta_b[:, :2])
    assert torch.equal(trained_part("A", delta_a, 2, "x"), delta_a[:2])
    kept_b = padded("B", delta_b[:, :2].double(), prev_b, "global")
    assert torch.equal(
        prev_b + kept_b, torch.cat([prev_b[:, :2] + delta_b[:, :2].double(), prev_b[:, 2:]], 1)
    )
    zero_b = padded("B", delta_b[:, :2].double(), prev_b, "zeros")
    assert torch.equal(
        prev_b + zero_b, torch.cat([prev_b[:, :2] + delta_b[:, :2].double(), torch.zeros(6, 2)], 1)
    )
    zero_a = padded("A", delta_a[:2].double(), prev_a, "zeros")
    assert torch.equal(prev_a + zero_a, torch.cat([prev_a[:2] + delta_a[:2].double(), torch.zeros(2, 5)], 0))
    delta_b[0, 3] = 1.0
    with pytest.raises(MismatchError, match="past it"):
        trained_part("B", delta_b, 2, "x")


@pytest.mark.parametrize("method", ["fedsrd", "fedavg", "fedsrd-e"])
def test_a_site_rank_upload_carries_only_its_components(tmp_path: Path, method: str):
    g0 = make_global(tmp_path / "g0.safetensors", rank=4)
    raw = make_local(g0, tmp_path / "raw.safetensors", seed=7)
    low = at_site_rank(g0, raw, 1, tmp_path / "low.safetensors")
    full = at_site_rank(g0, raw, None, tmp_path / "full.safetensors")
    small, whole = upload(tmp_path, method, g0, low, "c0"), upload(tmp_path, method, g0, full, "c1")
    assert small.header.info["site_rank"] == 1 and "site_rank" not in whole.header.info
    state = read_artifact(g0)
    for name, shape in small.header.layout.items():
        rows, cols = state.shapes[name]
        assert tuple(shape) == ((1, cols) if ".lora_A." in name else (rows, 1))

    def tensor_bytes(artifact) -> int:
        return sum(t.numel() * t.element_size() for _, t in artifact.iter_tensors())

    assert tensor_bytes(small) < 0.4 * tensor_bytes(whole)  # rank 1 of 4, plus the masks' overhead


def test_mixed_ranks_aggregate_as_the_dense_reference(tmp_path: Path):
    """FedAvg (dense, exact uploads): mean B and mean A over sites of ranks 1, 2 and 4 equal the
    mean of each site's own factors with padding "global", and of its truncated factors (zero
    past r_i) with padding "zeros"; FedSRD-e's W equals sum_i w_i B_i A_i of the decoded uploads."""
    g0 = make_global(tmp_path / "g0.safetensors", rank=4)
    ranks = [1, 2, None]
    locals_ = mixed_locals(tmp_path, g0, ranks)
    state = read_artifact(g0)
    for padding in ("global", "zeros"):
        algorithm = get_algorithm("fedavg")
        uploads = [upload(tmp_path, "fedavg", g0, p, f"c{i}") for i, p in enumerate(locals_)]
        config = AggregateConfig("fedavg", "samples", rank_padding=padding)
        agg = read_artifact(
            write(algorithm.aggregate(state, uploads, config), tmp_path / f"agg-{padding}.st")
        )
        assert agg.header.info["rank_padding"] == padding
        weights = [c["weight"] for c in agg.header.info["clients"]]
        for module in state.modules():
            expected_b = torch.zeros_like(state.factors(module)[1], dtype=torch.float64)
            expected_a = torch.zeros_like(state.factors(module)[0], dtype=torch.float64)
            for path, site_rank, weight in zip(locals_, ranks, weights, strict=True):
                a, b = (t.double() for t in read_artifact(path).factors(module))
                if padding == "zeros" and site_rank is not None:
                    a, b = a.clone(), b.clone()
                    a[site_rank:], b[:, site_rank:] = 0.0, 0.0
                expected_b += weight * b
                expected_a += weight * a
            left, right = naming.aggregate_keys(module)
            torch.testing.assert_close(agg.tensor(left).double(), expected_b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(agg.tensor(right).double(), expected_a, rtol=1e-6, atol=1e-7)

    algorithm = get_algorithm("fedsrd-e")
    uploads = [
        upload(tmp_path, "fedsrd-e", g0, p, f"c{i}", SparsifyConfig(value_dtype="fp32"))
        for i, p in enumerate(locals_)
    ]
    agg = algorithm.aggregate(state, uploads, AggregateConfig("fedsrd-e", "samples"))
    weights = [c["weight"] for c in agg.header.info["clients"]]
    for module in state.modules():
        a_prev, b_prev = (t.double() for t in state.factors(module))
        reference = torch.zeros(b_prev.shape[0], a_prev.shape[1], dtype=torch.float64)
        for up, weight in zip(uploads, weights, strict=True):
            b, a = b_prev.clone(), a_prev.clone()
            db = up.upload_delta(naming.factor_key(module, "B"))
            da = up.upload_delta(naming.factor_key(module, "A"))
            rank = db.shape[1] if db is not None else (da.shape[0] if da is not None else 0)
            if db is not None:
                b[:, :rank] += db.double()
            if da is not None:
                a[:rank] += da.double()
            reference += weight * (b @ a)
        left, right = naming.aggregate_keys(module)
        found = agg.tensors[left].double() @ agg.tensors[right].double()
        torch.testing.assert_close(found, reference, rtol=1e-5, atol=1e-6)


def test_update_norm_of_a_site_rank_upload_is_its_dense_update(tmp_path: Path):
    g0 = make_global(tmp_path / "g0.safetensors", rank=4)
    (local,) = mixed_locals(tmp_path, g0, [2])
    up = upload(tmp_path, "fedavg", g0, local, "c0")
    state, trained = read_artifact(g0), read_artifact(local)
    total = 0.0
    for module in state.modules():
        a0, b0 = (t.double() for t in state.factors(module))
        a1, b1 = (t.double() for t in trained.factors(module))
        total += float(torch.linalg.matrix_norm(b1 @ a1 - b0 @ a0)) ** 2
    assert update_norm(state, up) == pytest.approx(total**0.5, rel=1e-5)


def test_a_local_state_that_changed_past_its_rank_is_refused(tmp_path: Path):
    g0 = make_global(tmp_path / "g0.safetensors", rank=4)
    raw = make_local(g0, tmp_path / "raw.safetensors", seed=3)
    lying = tmp_path / "lying.safetensors"
    local = read_artifact(raw)
    write_artifact(
        lying, replace(local.header, content_hash="", info={"site_rank": 2}), dict(local.iter_tensors())
    )
    with pytest.raises(MismatchError, match="past it"):
        upload(tmp_path, "fedsrd", g0, lying, "c0")


@pytest.mark.parametrize("recorded", [8, 4, 0, "2"])
def test_uploads_recording_a_rank_outside_1_to_r_minus_1_are_refused(tmp_path: Path, recorded):
    g0 = make_global(tmp_path / "g0.safetensors", rank=4)
    (local,) = mixed_locals(tmp_path, g0, [2])
    up = upload(tmp_path, "fedsrd", g0, local, "c0")
    forged = tmp_path / "forged.safetensors"
    forged_info = {**up.header.info, "site_rank": recorded}
    write_artifact(forged, replace(up.header, content_hash="", info=forged_info), dict(up.iter_tensors()))
    match = "above the global rank 4" if recorded == 8 else "site rank"
    with pytest.raises(MismatchError, match=match):
        check_uploads(read_artifact(g0), [read_artifact(forged)], "uniform")


def test_an_upload_whose_shape_is_not_its_recorded_rank_is_refused(tmp_path: Path):
    g0 = make_global(tmp_path / "g0.safetensors", rank=4)
    (local,) = mixed_locals(tmp_path, g0, [2])
    up = upload(tmp_path, "fedsrd", g0, local, "c0")
    forged = tmp_path / "forged.safetensors"
    write_artifact(forged, replace(up.header, content_hash="", info={**up.header.info, "site_rank": 3}),
                   dict(up.iter_tensors()))  # fmt: skip
    with pytest.raises(MismatchError, match="at its site rank 3"):
        check_uploads(read_artifact(g0), [read_artifact(forged)], "uniform")


def test_rank_padding_is_checked():
    with pytest.raises(UsageError, match="--rank-padding"):
        AggregateConfig("fedsrd", rank_padding="mean")
