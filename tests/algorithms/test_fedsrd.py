"""FedSRD / FedSRD-e against a dense reference: materialised W, full SVD, then the paper's
download (pinv, parity, DARE rescale) or ours (ridge, best-fitting factor, least squares on the
kept elements), each also by the book on dense matrices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.protocol import apply_broadcast
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.math.importance import importance_a, importance_b, keep_mask, sparsify_delta
from fedsrd_cli.math.masks import seeded_keep_mask

from ..conftest import make_global, make_local
from .rounds import PAPER_DOWNLOAD


def _write(payload, path: Path) -> Path:
    write_artifact(path, payload.header, payload.tensors)
    return path


def _uploads(tmp: Path, global_file: Path, n: int, tag: str) -> list[Path]:
    global_state = read_artifact(global_file)
    algorithm = get_algorithm("fedsrd")
    paths = []
    for i in range(n):
        local = make_local(global_file, tmp / f"local-{tag}-{i}.safetensors", seed=100 + i, num_samples=5 + i)
        payload = algorithm.upload(
            global_state, read_local(local), f"c{i}", 5 + i, SparsifyConfig(value_dtype="fp32")
        )
        paths.append(_write(payload, tmp / f"upload-{tag}-{i}.safetensors"))
    return paths


def _round(
    tmp: Path,
    global_file: Path,
    method: str,
    sparsity: float,
    tag: str,
    weighting="uniform",
    download: dict | None = None,
):
    """One round of 3 simulated clients; the broadcast uses `download` (default: the paper's)."""
    global_state = read_artifact(global_file)
    uploads = [read_artifact(p) for p in _uploads(tmp, global_file, 3, tag)]
    algorithm = get_algorithm(method)
    agg = _write(
        algorithm.aggregate(global_state, uploads, AggregateConfig(method, weighting)),
        tmp / f"agg-{tag}.safetensors",
    )
    config = BroadcastConfig(
        sparsity, seed=11, value_dtype="fp32", **(PAPER_DOWNLOAD if download is None else download)
    )
    broadcast, next_state = algorithm.broadcast(global_state, read_artifact(agg), config)
    bc_path = _write(broadcast, tmp / f"bc-{tag}.safetensors")
    next_path = _write(next_state, tmp / f"g-{tag}.safetensors")
    return uploads, bc_path, next_path


def _dense_target(state, module: str, uploads, method: str, weights) -> torch.Tensor:
    """W = sum_i w_i B_i A_i as a dense matrix, truncated by a full SVD for FedSRD."""
    a_prev, b_prev = (t.double() for t in state.factors(module))
    w = torch.zeros(b_prev.shape[0], a_prev.shape[1], dtype=torch.float64)
    for weight, up in zip(weights, uploads, strict=True):
        da = up.upload_delta(naming.factor_key(module, "A"))
        db = up.upload_delta(naming.factor_key(module, "B"))
        a_i = a_prev + (0 if da is None else da.double())
        b_i = b_prev + (0 if db is None else db.double())
        w += weight * b_i @ a_i
    if method == "fedsrd":
        rank = state.header.lora.rank
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return w


def _dense_reference(global_file: Path, uploads, method: str, weights) -> dict[str, torch.Tensor]:
    """Next state by the book, the paper's download at sparsity 0: dense W, full SVD, pinv,
    update of the scheduled factor."""
    state = read_artifact(global_file)
    round_index = state.header.round + 1
    out = {}
    for module in state.modules():
        a_prev, b_prev = (t.double() for t in state.factors(module))
        delta_w = _dense_target(state, module, uploads, method, weights) - b_prev @ a_prev
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


def _ridge_b(delta_w, a_prev, damping):
    """dW A^T (A A^T + lam I)^-1, lam = damping sigma_max(A)^2, on dense matrices."""
    lam = damping * torch.linalg.matrix_norm(a_prev, 2) ** 2
    if lam == 0:
        return torch.zeros(delta_w.shape[0], a_prev.shape[0], dtype=torch.float64)
    return delta_w @ a_prev.T @ torch.linalg.inv(a_prev @ a_prev.T + lam * torch.eye(a_prev.shape[0]))


def _ours_reference(
    global_file: Path, uploads, method: str, sparsity: float, seed: int, damping: float, fit: str
):
    """Next state by the book for our download: per module, the factor whose dense ridge solve
    leaves the smaller residual; then (fit "dare") its kept elements divided by 1 - p, or (fit
    "lstsq") per row (B) or column (A) the ridge least squares on the kept elements alone,
    solved with torch.linalg.lstsq on the dense dW."""
    state = read_artifact(global_file)
    out = {}
    for module in state.modules():
        a_prev, b_prev = (t.double() for t in state.factors(module))
        w = _dense_target(state, module, uploads, method, [1 / 3] * 3)
        delta_w = w - b_prev @ a_prev
        whole_b = _ridge_b(delta_w, a_prev, damping)
        whole_a = _ridge_b(delta_w.T, b_prev.T, damping).T
        miss_b = torch.linalg.matrix_norm((b_prev + whole_b) @ a_prev - w)
        miss_a = torch.linalg.matrix_norm(b_prev @ (a_prev + whole_a) - w)
        factor = "B" if miss_b <= miss_a else "A"
        name = naming.factor_key(module, factor)
        # Rows of B against A, or rows of A^T against B^T: the same least squares.
        rows, against, target = (
            (b_prev, a_prev, delta_w) if factor == "B" else (a_prev.T, b_prev.T, delta_w.T)
        )
        keep = seeded_keep_mask(seed, name, tuple(b_prev.shape if factor == "B" else a_prev.shape), sparsity)
        keep = keep if factor == "B" else keep.T
        lam = damping * torch.linalg.matrix_norm(against, 2) ** 2
        sent = torch.zeros_like(rows)
        whole = whole_b if factor == "B" else whole_a.T
        for u in range(rows.shape[0] if fit == "lstsq" else 0):
            k = keep[u]
            if k.any():
                # ridge as an augmented least squares: [against_K^T; sqrt(lam) I] x = [target_u; 0]
                system = torch.cat([against[k].T, lam.sqrt() * torch.eye(int(k.sum()), dtype=torch.float64)])
                side = torch.cat([target[u], torch.zeros(int(k.sum()), dtype=torch.float64)])
                sent[u, k] = torch.linalg.lstsq(system, side[:, None]).solution[:, 0]
        if fit == "dare":
            sent = torch.where(keep, whole / (1.0 - sparsity), torch.zeros((), dtype=torch.float64))
        sent = sent if factor == "B" else sent.T
        out[naming.factor_key(module, "B")] = b_prev + (sent if factor == "B" else 0)
        out[naming.factor_key(module, "A")] = a_prev + (sent if factor == "A" else 0)
    return out


@pytest.mark.parametrize("method", ["fedsrd", "fedsrd-e"])
@pytest.mark.parametrize("sparsity", [0.0, 0.8])
@pytest.mark.parametrize("fit", ["dare", "lstsq"])
def test_fit_choice_download_equals_its_dense_reference_over_two_rounds(tmp_path, method, sparsity, fit):
    g0 = make_global(tmp_path / "g0.safetensors")
    damping = BroadcastConfig().damping
    state = g0
    for round_index in (1, 2):
        download = {} if fit == BroadcastConfig().download_fit else {"download_fit": fit}
        uploads, bc, nxt = _round(tmp_path, state, method, sparsity, f"r{round_index}", download=download)
        reference = _ours_reference(state, uploads, method, sparsity, 11, damping, fit)
        _assert_matches(nxt, reference, tol=1e-4)
        info = read_artifact(bc).header.info
        assert (info["damping"], info["download_fit"], info["factor_choice"]) == (damping, fit, "fit")
        if fit == "lstsq" or sparsity == 0.0:  # no rescaled mask: never farther than sending nothing
            assert info["update_error"]["overall"] <= 1.0 + 1e-4
        state = nxt


@pytest.mark.parametrize("method", ["fedsrd", "fedsrd-e"])
def test_paper_download_sends_the_values_of_the_previous_release_bit_for_bit(tmp_path, method):
    """--damping 0 --download-fit dare --factor-choice parity: exactly what fedsrd sent before
    damping existed (release 0.1.0): dB = left (right pinv(A)) - B (A pinv(A)) in float64, the
    kept elements divided by 1 - p, cast to fp32; in round 2 the same for A."""
    from fedsrd_cli.math.lowrank import choose_factor, update_a, update_b

    g0 = make_global(tmp_path / "g0.safetensors")
    state = g0
    for round_index in (1, 2):
        _, bc, nxt = _round(tmp_path, state, method, 0.8, f"r{round_index}")
        broadcast = read_artifact(bc)
        agg = read_artifact(tmp_path / f"agg-r{round_index}.safetensors")
        previous = read_artifact(state)
        for module in previous.modules():
            a_prev, b_prev = (t.double() for t in previous.factors(module))
            left, right = (agg.tensor(n).double() for n in naming.aggregate_keys(module))
            factor = choose_factor(round_index, b_prev, a_prev)
            solve = update_b if factor == "B" else update_a
            delta = solve(left, right, b_prev, a_prev)  # the pinv formula, unchanged
            name = naming.factor_key(module, factor)
            mask = seeded_keep_mask(11, name, tuple(delta.shape), 0.8)
            expected = (delta[mask] / (1.0 - 0.8)).to(torch.float32)
            assert torch.equal(broadcast.tensor(naming.values_key(name)), expected), name
        state = nxt


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
    config = SparsifyConfig(value_dtype="fp32")
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


@pytest.mark.parametrize("moved", ["A", "B"])
def test_fit_choice_sends_the_factor_that_can_carry_the_target(moved):
    """A target reachable by changing A alone is sent as an A update, and likewise for B,
    whatever the round's parity; the paper's parity would send the other in one of the rounds."""
    from fedsrd_cli.algorithms.steps import Download, alternating_update

    g = torch.Generator().manual_seed(0)
    b_prev = torch.randn(24, 4, generator=g, dtype=torch.float64)
    a_prev = torch.randn(4, 18, generator=g, dtype=torch.float64)
    if moved == "A":
        left, right = b_prev, a_prev + 0.1 * torch.randn(4, 18, generator=g, dtype=torch.float64)
    else:
        left, right = b_prev + 0.1 * torch.randn(24, 4, generator=g, dtype=torch.float64), a_prev
    shapes = {"A": a_prev.shape, "B": b_prev.shape}

    def download(choice: str) -> Download:
        return Download(lambda f: torch.ones(shapes[f], dtype=torch.bool), 1.0, 0.0, "dare", choice)

    for round_index in (1, 2):
        update = alternating_update("m", round_index, a_prev, b_prev, left, right, download("fit"))
        ((factor, delta),) = update.deltas
        assert factor == moved and not update.fell_back
        expected = (right - a_prev) if moved == "A" else (left - b_prev)
        torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-10)  # exact: undamped, dense
        ((parity_factor, _),) = alternating_update(
            "m", round_index, a_prev, b_prev, left, right, download("parity")
        ).deltas
        assert parity_factor == ("B" if round_index == 1 else "A")
