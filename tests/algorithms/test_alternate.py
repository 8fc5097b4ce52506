"""FedSRD with alternating local training (fedsrd-alternate): only the scheduled factor moves."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.errors import MismatchError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.math.lowrank import scheduled_factor

from ..conftest import make_global
from .rounds import factor_names, make_locals, run_round, state_factors, train_only, upload


def sent_delta(upload_artifact, name: str) -> torch.Tensor:
    delta = upload_artifact.upload_delta(name)
    assert delta is not None
    return delta.double()


def test_trained_factor_follows_the_download_schedule():
    algorithm = get_algorithm("fedsrd-alternate")
    assert [algorithm.trained_factor(t) for t in (1, 2, 3, 4)] == ["B", "A", "B", "A"]
    assert [scheduled_factor(t) for t in (1, 2)] == ["B", "A"]
    assert get_algorithm("fedsrd").trained_factor(1) is None
    assert get_algorithm("ffa-lora").trained_factor(2) == "B"


def test_upload_of_the_wrong_factor_is_refused(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    (local,) = make_locals(tmp_path, g0, 1, "x")
    with pytest.raises(
        MismatchError, match="lora_A.weight changed.*trains only lora_B in round 1.*--alternate"
    ):
        upload(tmp_path, "fedsrd-alternate", g0, local, "c0")
    only_a = train_only(g0, local, "A")
    with pytest.raises(MismatchError, match="trains only lora_B"):
        upload(tmp_path, "fedsrd-alternate", g0, only_a, "c0")


def test_two_rounds_update_exactly_the_mean_of_what_clients_sent(tmp_path):
    """With only B trained, W = sum_i w_i B_i A_prev, so the least-squares dB is the weighted
    mean of the clients' (sparse) dB; in round 2 the same holds for A. Dense download."""
    g0 = make_global(tmp_path / "g0.safetensors")
    state = g0
    for round_index, factor in ((1, "B"), (2, "A")):
        locals_ = [train_only(state, p, factor) for p in make_locals(tmp_path, state, 3, f"r{round_index}")]
        uploads, agg, bc, nxt = run_round(
            tmp_path,
            "fedsrd-alternate",
            state,
            locals_,
            download_sparsity=0.0,
            tag=f"r{round_index}",
            download={"damping": 0.0},  # undamped: exactly least squares (the default choice, "fit")
        )
        other = "A" if factor == "B" else "B"
        for u in uploads:
            assert factor_names(u, other) == [] and factor_names(u, factor)
        assert factor_names(bc, other) == [] and factor_names(bc, factor)
        assert bc.header.info["factor_fallbacks"] == []
        for module in read_artifact(state).modules():
            name = naming.factor_key(module, factor)
            mean = sum(sent_delta(u, name) for u in uploads) / len(uploads)  # uniform weights
            (a_prev, b_prev), (a_next, b_next) = state_factors(state, module), state_factors(nxt, module)
            moved, kept = (
                (b_next - b_prev, a_next - a_prev) if factor == "B" else (a_next - a_prev, b_next - b_prev)
            )
            torch.testing.assert_close(moved, mean, rtol=1e-4, atol=1e-6)
            assert not bool(kept.any())
        state = nxt
