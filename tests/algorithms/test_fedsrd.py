"""FedSRD / FedSRD-e against a dense reference: materialised W, full SVD, pinv."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsrd_cli import naming
from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.protocol import apply_broadcast
from fedsrd_cli.artifacts import read_artifact, read_local, write_artifact
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.math.importance import importance_a, importance_b, keep_mask, sparsify_delta

from ..conftest import make_global, make_local


def _write(payload, path: Path) -> Path:
    write_artifact(path, payload.header, payload.tensors)
    return path


def _uploads(tmp: Path, global_file: Path, n: int, tag: str) -> list[Path]:
    global_state = read_artifact(global_file)
    algorithm = get_algorithm("fedsrd")
    paths = []
    for i in range(n):
        local = make_local(global_file, tmp / f"local-{tag}-{i}.safetensors", seed=100 + i, num_samples=5 + i)
        payload = algorithm.upload(global_state, read_local(local), f"c{i}", 5 + i, SparsifyConfig())
        paths.append(_write(payload, tmp / f"upload-{tag}-{i}.safetensors"))
    return paths


def _round(tmp: Path, global_file: Path, method: str, sparsity: float, tag: str, weighting="uniform"):
    global_state = read_artifact(global_file)
    uploads = [read_artifact(p) for p in _uploads(tmp, global_file, 3, tag)]
    algorithm = get_algorithm(method)
    agg = _write(
        algorithm.aggregate(global_state, uploads, AggregateConfig(method, weighting)),
        tmp / f"agg-{tag}.safetensors",
    )
    broadcast, next_state = algorithm.broadcast(
        global_state, read_artifact(agg), BroadcastConfig(sparsity, seed=11)
    )
    bc_path = _write(broadcast, tmp / f"bc-{tag}.safetensors")
    next_path = _write(next_state, tmp / f"g-{tag}.safetensors")
    return uploads, bc_path, next_path


def _dense_reference(global_file: Path, uploads, method: str, weights) -> dict[str, torch.Tensor]:
    """Next state by the book: dense W, full SVD, pinv, update of the scheduled factor."""
    state = read_artifact(global_file)
    rank = state.header.lora.rank
    round_index = state.header.round + 1
    out = {}
    for module in state.modules():
        a_prev, b_prev = (t.double() for t in state.factors(module))
        w = torch.zeros(b_prev.shape[0], a_prev.shape[1], dtype=torch.float64)
        for weight, up in zip(weights, uploads, strict=True):
            da = up.upload_delta(naming.factor_key(module, "A"))
            db = up.upload_delta(naming.factor_key(module, "B"))
            a_i = a_prev + (0 if da is None else da.double())
            b_i = b_prev + (0 if db is None else db.double())
            w += weight * b_i @ a_i
        if method == "fedsrd":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            w = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        delta_w = w - b_prev @ a_prev
        update_b = round_index % 2 == 1
        full_rank = {"A": _full_rank(a_prev), "B": _full_rank(b_prev)}
        if not full_rank["A" if update_b else "B"] and full_rank["B" if update_b else "A"]:
            update_b = not update_b  # the method's fallback: never invert a rank-deficient factor
        if update_b:
            out[naming.factor_key(module, "B")] = b_prev + delta_w @ torch.linalg.pinv(a_prev)
            out[naming.factor_key(module, "A")] = a_prev
        else:
            out[naming.factor_key(module, "A")] = a_prev + torch.linalg.pinv(b_prev) @ delta_w
            out[naming.factor_key(module, "B")] = b_prev
    return out


def _full_rank(x: torch.Tensor) -> bool:
    return int(torch.linalg.matrix_rank(x)) == min(x.shape)


def _assert_matches(next_file: Path, reference: dict[str, torch.Tensor], tol: float = 1e-4):
    state = read_artifact(next_file)
    for name, expected in reference.items():
        got = state.tensor(name).double()
        scale = torch.linalg.matrix_norm(expected).item()
        err = torch.linalg.matrix_norm(got - expected).item()
        assert err <= tol * max(scale, 1e-12), f"{name}: relative error {err / max(scale, 1e-12):.2e}"


@pytest.mark.parametrize("method", ["fedsrd", "fedsrd-e"])
@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_round_one_equals_the_dense_reference_and_updates_b(tmp_path, method, weighting):
    g0 = make_global(tmp_path / "g0.safetensors")
    uploads, bc, g1 = _round(tmp_path, g0, method, 0.0, "r1", weighting)
    n = [u.header.num_samples for u in uploads]
    weights = [1 / 3] * 3 if weighting == "uniform" else [x / sum(n) for x in n]
    _assert_matches(g1, _dense_reference(g0, uploads, method, weights))
    layout = read_artifact(bc).header.layout
    assert layout and all(name.endswith(".lora_B.weight") for name in layout)


@pytest.mark.parametrize("method", ["fedsrd", "fedsrd-e"])
def test_round_two_equals_the_dense_reference_and_updates_a(tmp_path, method):
    g0 = make_global(tmp_path / "g0.safetensors")
    _, _, g1 = _round(tmp_path, g0, method, 0.0, "r1")
    uploads, bc, g2 = _round(tmp_path, g1, method, 0.0, "r2")
    _assert_matches(g2, _dense_reference(g1, uploads, method, [1 / 3] * 3))
    layout = read_artifact(bc).header.layout
    assert layout and all(name.endswith(".lora_A.weight") for name in layout)


@pytest.mark.parametrize("method", ["fedsrd", "fedsrd-e"])
def test_rank_deficient_factor_falls_back_to_the_other_one(tmp_path, method):
    """A round-1 broadcast at 80% sparsity leaves some small B factors rank-deficient."""
    g0 = make_global(tmp_path / "g0.safetensors")
    _, _, g1 = _round(tmp_path, g0, method, 0.8, "r1")
    uploads, bc, g2 = _round(tmp_path, g1, method, 0.0, "r2")
    _assert_matches(g2, _dense_reference(g1, uploads, method, [1 / 3] * 3))
    broadcast = read_artifact(bc).header
    fallbacks = broadcast.info["factor_fallbacks"]
    assert fallbacks, "expected at least one rank-deficient B on these toy shapes"
    for module in fallbacks:
        assert naming.factor_key(module, "B") in broadcast.layout


def test_apply_reproduces_the_coordinator_state_bit_for_bit(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    _, bc, g1 = _round(tmp_path, g0, "fedsrd", 0.8, "r1")
    payload = apply_broadcast(read_artifact(g0), read_artifact(bc))
    client = tmp_path / "client-g1.safetensors"
    write_artifact(client, payload.header, payload.tensors)
    assert client.read_bytes() == g1.read_bytes()


def test_download_mask_keeps_one_minus_p_and_rescales(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    _, bc_dense, g1_dense = _round(tmp_path, g0, "fedsrd", 0.0, "dense")
    bc_sparse = read_artifact(_round(tmp_path, g0, "fedsrd", 0.8, "dense-again")[1])
    dense = read_artifact(bc_dense)
    for name in bc_sparse.header.layout:
        mask = bc_sparse.broadcast_mask(name)
        full = dense.tensor(naming.values_key(name)).reshape(mask.shape)
        sent = bc_sparse.tensor(naming.values_key(name))
        assert torch.allclose(sent, full[mask] / 0.2, rtol=1e-6, atol=1e-9)
    kept = sum(bc_sparse.shapes[naming.values_key(n)][0] for n in bc_sparse.header.layout)
    total = sum(torch.Size(s).numel() for s in bc_sparse.header.layout.values())
    assert 0.15 < kept / total < 0.25


def test_upload_keeps_exactly_the_elements_above_the_ratio_quantile(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "local.safetensors", seed=9)
    state, trained = read_artifact(g0), read_artifact(local)
    config = SparsifyConfig()
    upload = get_algorithm("fedsrd").upload(state, read_local(local), "c", 1, config)
    for module in state.modules():
        a0, b0 = state.factors(module)
        a1, b1 = trained.factors(module)
        for factor, delta, scores in (
            ("B", b1 - b0, importance_b(b1 - b0, a0)),
            ("A", a1 - a0, importance_a(a1 - a0, b1)),
        ):
            name = naming.factor_key(module, factor)
            expected, kept, ratio = sparsify_delta(delta, scores, 0.85, 0.1, 0.11, True)
            assert upload.header.info["prune_ratio"][name] == pytest.approx(ratio, abs=1e-6)
            assert torch.equal(kept, keep_mask(scores, ratio))
            assert torch.equal(upload.tensors[naming.values_key(name)], expected[kept])
