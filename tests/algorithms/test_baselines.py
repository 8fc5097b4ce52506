"""Baselines (FedAvg, FedProx, FFA-LoRA, FlexLoRA, Fed-DARE) against hand-computed or dense references."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.algorithms import ALGORITHMS, get_algorithm
from fedsrd_cli.algorithms.protocol import apply_broadcast
from fedsrd_cli.algorithms.steps import (
    ClientFactors,
    FactorDelta,
    ReconstructedFactors,
    average_factors,
    encode_dare,
)
from fedsrd_cli.config import AGGREGATE_METHODS, AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.errors import MismatchError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact

from ..conftest import make_global
from .rounds import factor_names, local_factors, make_locals, run_round, state_factors, upload, write


def test_registry_matches_the_config_names_and_every_method_is_valid_config():
    assert tuple(ALGORITHMS) == AGGREGATE_METHODS
    for name in AGGREGATE_METHODS:
        assert AggregateConfig(name).method == name
        assert get_algorithm(name).name == name


# --------------------------------------------------------------------------- FFA-LoRA


def test_ffa_lora_never_changes_a(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    state = g0
    for tag in ("r1", "r2"):
        locals_ = make_locals(tmp_path, state, 3, tag, frozen_a=True)
        uploads, agg, bc, nxt = run_round(tmp_path, "ffa-lora", state, locals_, tag=tag)
        for u in uploads:
            assert factor_names(u, "A") == []
            assert all(u.shapes[naming.values_key(n)] == tuple(s) for n, s in u.header.layout.items())
        assert factor_names(bc, "A") == [] and len(factor_names(bc, "B")) == 8
        client_state = apply_broadcast(read_artifact(state), bc)
        for module in read_artifact(g0).modules():
            a0 = read_artifact(g0).factors(module)[0]
            assert torch.equal(read_artifact(nxt).factors(module)[0], a0)
            assert torch.equal(client_state.tensors[naming.factor_key(module, "A")], a0)
        state = nxt


def test_ffa_lora_refuses_an_upload_whose_a_changed(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    with pytest.raises(MismatchError, match="--freeze-a"):
        upload(tmp_path, "ffa-lora", g0, local, "c0")


def test_ffa_lora_aggregate_refuses_uploads_with_a(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    fedavg_upload = upload(tmp_path, "fedavg", g0, local, "c0")
    with pytest.raises(MismatchError, match="sparsify --method ffa-lora"):
        get_algorithm("ffa-lora").aggregate(read_artifact(g0), [fedavg_upload], AggregateConfig("ffa-lora"))


# --------------------------------------------------------------------------- FedAvg / FedProx


def test_fedavg_of_identical_clients_is_the_identity():
    generator = torch.Generator().manual_seed(0)
    a_prev, b_prev = torch.randn(4, 10, generator=generator), torch.zeros(6, 4)
    a_new = a_prev + 0.1 * torch.randn(4, 10, generator=generator)
    b_new = 0.1 * torch.randn(6, 4, generator=generator)
    a_prev, b_prev = a_prev.double(), b_prev.double()
    clients = ClientFactors(
        "m",
        a_prev,
        b_prev,
        ReconstructedFactors.from_factors(a_prev, [a_new] * 3),
        ReconstructedFactors.from_factors(b_prev, [b_new] * 3),
    )
    mean_b, mean_a = average_factors(clients, [0.2, 0.3, 0.5], 4)
    torch.testing.assert_close(mean_b, b_new.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean_a, a_new.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_fedavg_of_one_client_gives_its_local_state(tmp_path, method):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    _, _, bc, nxt = run_round(tmp_path, method, g0, [local])
    assert bc.header.download_sparsity == 0.0 and bc.header.method == method
    for name, tensor in read_artifact(local).iter_tensors():
        torch.testing.assert_close(read_artifact(nxt).tensor(name), tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_fedavg_of_two_clients_is_the_elementwise_mean(tmp_path, weighting):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 2, "x")
    _, agg, bc, nxt = run_round(tmp_path, "fedavg", g0, locals_, weighting)
    samples = [read_artifact(p).header.num_samples for p in locals_]
    w = [0.5, 0.5] if weighting == "uniform" else [n / sum(samples) for n in samples]
    assert len(bc.header.layout) == 16  # both factors of all 8 modules
    for module in read_artifact(g0).modules():
        (a1, b1), (a2, b2) = (local_factors(p, module) for p in locals_)
        a, b = state_factors(nxt, module)
        torch.testing.assert_close(b, w[0] * b1 + w[1] * b2, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, w[0] * a1 + w[1] * a2, rtol=0, atol=1e-6)
        left, right = (agg.tensor(n).double() for n in naming.aggregate_keys(module))
        torch.testing.assert_close(left, w[0] * b1 + w[1] * b2, rtol=0, atol=1e-6)
        torch.testing.assert_close(right, w[0] * a1 + w[1] * a2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["fedavg", "ffa-lora", "flexlora", "fed-dare", "fedsrd-dense-download"])
def test_dense_downloads_refuse_a_download_sparsity(tmp_path, method):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 2, "x", frozen_a=method == "ffa-lora")
    algorithm = get_algorithm(method)
    assert algorithm.default_download_sparsity == 0.0
    uploads = [upload(tmp_path, method, g0, p, f"c{i}") for i, p in enumerate(locals_)]
    payload = algorithm.aggregate(read_artifact(g0), uploads, AggregateConfig(method))

    agg = read_artifact(write(payload, tmp_path / "agg.safetensors"))
    with pytest.raises(UsageError, match="--download-sparsity must be 0"):
        algorithm.broadcast(read_artifact(g0), agg, BroadcastConfig(0.8))


# --------------------------------------------------------------------------- FlexLoRA


def test_flexlora_is_the_rank_r_truncation_of_the_mean_product(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 3, "x")
    _, _, bc, nxt = run_round(tmp_path, "flexlora", g0, locals_, "samples")
    rank = read_artifact(g0).header.lora.rank
    samples = [read_artifact(p).header.num_samples for p in locals_]
    weights = [n / sum(samples) for n in samples]
    assert len(bc.header.layout) == 16
    for module in read_artifact(g0).modules():
        w = sum(
            wi * b @ a
            for wi, (a, b) in zip(weights, [local_factors(p, module) for p in locals_], strict=True)
        )
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        reference = (u[:, :rank] * s[:rank]) @ vh[:rank]
        a, b = state_factors(nxt, module)
        assert torch.linalg.matrix_norm(b @ a - reference) <= 1e-4 * torch.linalg.matrix_norm(reference)
        # balanced split: B'^T B' = A' A'^T = diag(S_r)
        torch.testing.assert_close(b.T @ b, torch.diag(s[:rank]), rtol=0, atol=1e-5)
        torch.testing.assert_close(a @ a.T, torch.diag(s[:rank]), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- Fed-DARE


def test_fed_dare_keeps_about_a_tenth_and_rescales_exactly(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    up = upload(tmp_path, "fed-dare", g0, local, "c0")
    assert up.header.method == "fed-dare" and "upload_seed" in up.header.info
    assert up.header.info["sparsify"] == {"upload_drop": 0.9, "value_dtype": "fp32"}
    global_state, local_state = read_artifact(g0), read_artifact(local)
    kept_total = numel_total = 0
    for name, shape in up.header.layout.items():
        numel = math.prod(shape)
        delta = local_state.tensor(name) - global_state.tensor(name)
        sent = up.upload_delta(name)
        kept = sent != 0
        expected = torch.where(kept, (delta.double() / (1 - 0.9)).float(), torch.zeros_like(delta))
        assert torch.equal(sent, expected)
        kept_total += int(kept.sum())
        numel_total += numel
    assert numel_total == global_state.numel()
    bound = 5 * math.sqrt(0.9 * 0.1 / numel_total)
    assert abs(kept_total / numel_total - 0.1) < bound
    # reproducible: the same client and round give the same upload, another client another mask
    again = upload(tmp_path, "fed-dare", g0, local, "c0")
    other = upload(tmp_path, "fed-dare", g0, local, "c1")
    assert again.header.content_hash == up.header.content_hash
    assert other.header.content_hash != up.header.content_hash


def test_fed_dare_upload_drop_is_configurable(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    up = upload(tmp_path, "fed-dare", g0, local, "c0", SparsifyConfig(upload_drop=0.5, value_dtype="fp32"))
    kept = sum(up.shapes[naming.values_key(n)][0] for n in up.header.layout)
    numel = read_artifact(g0).numel()
    assert abs(kept / numel - 0.5) < 5 * math.sqrt(0.25 / numel)
    with pytest.raises(UsageError, match="--upload-drop"):
        SparsifyConfig(upload_drop=1.0)


def test_fed_dare_is_unbiased():
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(8, 16, generator=generator)
    config = SparsifyConfig(upload_drop=0.9, value_dtype="fp32")
    seeds = 2000
    total = torch.zeros_like(delta, dtype=torch.float64)
    for seed in range(seeds):
        item = FactorDelta("m.lora_A.weight", "A", delta, torch.ones(8, 16), torch.ones(4, 8), seed)
        total += encode_dare(item, config).values.double()
    mean = total / seeds
    # per element, the estimator has standard deviation sqrt(p / (1 - p)) |delta| / sqrt(seeds)
    sd = math.sqrt(0.9 / 0.1) / math.sqrt(seeds)
    assert bool(((mean - delta.double()).abs() <= 5 * sd * delta.double().abs()).all())
    torch.testing.assert_close(mean.mean(), delta.double().mean(), rtol=0, atol=0.05)


def test_fed_dare_round_is_fedavg_of_the_sparse_uploads(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 2, "x")
    uploads, _, bc, nxt = run_round(tmp_path, "fed-dare", g0, locals_)
    assert len(bc.header.layout) == 16
    for module in read_artifact(g0).modules():
        a_prev, b_prev = state_factors(g0, module)
        a, b = state_factors(nxt, module)
        deltas_b = [u.upload_delta(naming.factor_key(module, "B")).double() for u in uploads]
        deltas_a = [u.upload_delta(naming.factor_key(module, "A")).double() for u in uploads]
        torch.testing.assert_close(b, b_prev + sum(deltas_b) / 2, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, a_prev + sum(deltas_a) / 2, rtol=0, atol=1e-6)
