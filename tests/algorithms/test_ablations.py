"""Each FedSRD ablation differs from FedSRD in exactly its one stated way."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.config import AggregateConfig, SparsifyConfig
from fedsrd_cli.errors import MismatchError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.math.importance import importance_a, importance_b, keep_mask

from ..conftest import make_global
from .rounds import PAPER_DOWNLOAD, make_locals, run_round, state_factors, upload, write


def _scores(global_file, local_file, name):
    module, factor = naming.parse_factor_key(name)
    a_prev, _ = read_artifact(global_file).factors(module)
    _, b_new = read_artifact(local_file).factors(module)
    delta = read_artifact(local_file).tensor(name) - read_artifact(global_file).tensor(name)
    return delta, importance_b(delta, a_prev) if factor == "B" else importance_a(delta, b_new)


def _kept(up, name):
    return up.upload_kept(name)  # from X.mask or X.positions, whichever the upload stores


def test_fixed_ratio_keeps_exactly_the_base_sparsity_quantile(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    config = SparsifyConfig(base_sparsity=0.85, value_dtype="fp32")
    fixed = upload(tmp_path, "fedsrd-fixed-ratio", g0, local, "c0", config)
    adaptive = upload(tmp_path, "fedsrd", g0, local, "c0", config)
    assert set(fixed.header.info["prune_ratio"].values()) == {0.85}
    # the upload records the settings it used: no kurtosis term
    assert fixed.header.info["sparsify"] == {"base_sparsity": 0.85, "rescale": True, "value_dtype": "fp32"}
    assert max(adaptive.header.info["prune_ratio"].values()) > 0.85  # FedSRD adapts; this does not
    for name in fixed.header.layout:
        _, scores = _scores(g0, local, name)
        assert torch.equal(_kept(fixed, name), keep_mask(scores, 0.85))


def test_random_sparsify_keeps_fedsrds_fraction_of_random_elements(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    rand = upload(tmp_path, "fedsrd-random-sparsify", g0, local, "c0")
    fedsrd = upload(tmp_path, "fedsrd", g0, local, "c0")
    assert rand.header.info["prune_ratio"] == fedsrd.header.info["prune_ratio"]
    expected = kept = 0.0
    variance = 0.0
    differs = False
    for name, ratio in rand.header.info["prune_ratio"].items():
        numel = math.prod(rand.header.layout[name])
        expected += (1 - ratio) * numel
        variance += ratio * (1 - ratio) * numel
        mask = _kept(rand, name)
        kept += int(mask.sum())
        differs = differs or not torch.equal(mask, _kept(fedsrd, name))
        delta, _ = _scores(g0, local, name)
        # L1 rescale, as FedSRD: the kept delta carries the dense delta's L1 norm
        torch.testing.assert_close(
            rand.upload_delta(name).double().abs().sum(), delta.double().abs().sum(), rtol=1e-5, atol=0
        )
    assert differs
    assert abs(kept - expected) < 5 * math.sqrt(variance)


def test_dense_download_sends_both_factors_dense_of_fedsrds_target(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 3, "x")
    uploads, agg, bc, nxt = run_round(tmp_path, "fedsrd-dense-download", g0, locals_)
    assert all(u.header.method == "fedsrd" for u in uploads)  # FedSRD's own upload
    assert bc.header.download_sparsity == 0.0 and len(bc.header.layout) == 16
    for name, shape in bc.header.layout.items():
        assert bc.shapes[naming.values_key(name)] == (math.prod(shape),)
    # the same target W_r as FedSRD's aggregate of the same uploads
    fedsrd = get_algorithm("fedsrd").aggregate(read_artifact(g0), uploads, AggregateConfig("fedsrd"))
    for module in read_artifact(g0).modules():
        left, right = (fedsrd.tensors[n].double() for n in naming.aggregate_keys(module))
        a, b = state_factors(nxt, module)
        target = left @ right
        assert torch.linalg.matrix_norm(b @ a - target) <= 1e-4 * torch.linalg.matrix_norm(target)


def test_no_reconstruction_targets_the_product_of_averaged_factors(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    locals_ = make_locals(tmp_path, g0, 3, "x")
    uploads, agg, bc, nxt = run_round(
        tmp_path, "fedsrd-no-reconstruction", g0, locals_, download_sparsity=0.0, download=PAPER_DOWNLOAD
    )
    assert all(u.header.method == "fedsrd" for u in uploads)
    assert {naming.parse_factor_key(n)[1] for n in bc.header.layout} == {"B"}  # round 1 updates B only
    for module in read_artifact(g0).modules():
        a_prev, b_prev = state_factors(g0, module)
        mean_b = sum(b_prev + u.upload_delta(naming.factor_key(module, "B")).double() for u in uploads) / 3
        mean_a = sum(a_prev + u.upload_delta(naming.factor_key(module, "A")).double() for u in uploads) / 3
        left, right = (agg.tensor(n).double() for n in naming.aggregate_keys(module))
        torch.testing.assert_close(left, mean_b, rtol=0, atol=1e-6)
        torch.testing.assert_close(right, mean_a, rtol=0, atol=1e-6)
        # FedSRD's decomposition of that target: dB = (mean B mean A - B_prev A_prev) pinv(A_prev)
        delta_w = mean_b @ mean_a - b_prev @ a_prev
        a, b = state_factors(nxt, module)
        torch.testing.assert_close(b, b_prev + delta_w @ torch.linalg.pinv(a_prev), rtol=0, atol=1e-5)
        assert torch.equal(a, a_prev)


def test_server_side_ablations_accept_fedsrd_uploads_and_fedsrd_refuses_theirs(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    fedsrd_upload = upload(tmp_path, "fedsrd", g0, local, "c0")
    for method in ("fedsrd-e", "fedsrd-dense-download", "fedsrd-no-reconstruction"):
        payload = get_algorithm(method).aggregate(read_artifact(g0), [fedsrd_upload], AggregateConfig(method))
        write(payload, tmp_path / f"agg-{method}.safetensors")
    fixed = upload(tmp_path, "fedsrd-fixed-ratio", g0, local, "c0")
    with pytest.raises(MismatchError, match="needs uploads from `sparsify --method fedsrd`"):
        get_algorithm("fedsrd").aggregate(read_artifact(g0), [fixed], AggregateConfig("fedsrd"))
