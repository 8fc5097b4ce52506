"""Organisation-level DP (algorithms.private): the clipped, fixed-denominator aggregate against a
dense reference, the sensitivity bound of the broadcast against an adversarial site, and the
noise as a distribution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.private import PrivateDownload
from fedsrd_cli.algorithms.protocol import apply_broadcast, default_download_seed
from fedsrd_cli.config import AggregateConfig, BroadcastConfig
from fedsrd_cli.errors import PrivacyError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import Artifact, Header, read_artifact, write_artifact
from fedsrd_cli.math.lowrank import update_b
from fedsrd_cli.math.lowrank_products import b_update_gain
from fedsrd_cli.privacy.ledger import OrganisationDp, read_privacy

from .rounds import make_locals, upload, write

stats = pytest.importorskip("scipy.stats")
METHOD = "fedsrd-e"
CLIP = 0.05


def settings(population: int, sampled: int, rate: float = 1.0, noise: float = 1.0) -> OrganisationDp:
    return OrganisationDp(CLIP, noise, rate, 1e-3, population, sampled)


def aggregate(tmp: Path, g: Artifact, uploads: list[Artifact], org: OrganisationDp, tag: str) -> Artifact:
    config = AggregateConfig(METHOD, organisation_dp=org)
    return read_artifact(
        write(get_algorithm(METHOD).aggregate(g, uploads, config), tmp / f"agg-{tag}.safetensors")
    )


def pre_noise_b_updates(g: Artifact, agg: Artifact, damping: float = 1e-3) -> torch.Tensor:
    """Every module's B update before the noise, as private_b_update computes it, concatenated."""
    parts = []
    for module in g.modules():
        a_prev, b_prev = (t.double() for t in g.factors(module))
        left, right = (agg.tensor(name).double() for name in naming.aggregate_keys(module))
        parts.append(update_b(left, right, b_prev, a_prev, damping).reshape(-1))
    return torch.cat(parts)


def dense_update(g: Artifact, up: Artifact) -> dict[str, torch.Tensor]:
    """dW_i = B_i A_i - B A per module, as (d_out, d_in) float64 matrices."""
    out = {}
    for module in g.modules():
        a, b = (t.double() for t in g.factors(module))
        da = up.upload_delta(naming.factor_key(module, "A"))
        db = up.upload_delta(naming.factor_key(module, "B"))
        a_i = a if da is None else a + da.double()
        b_i = b if db is None else b + db.double()
        out[module] = b_i @ a_i - b @ a
    return out


def adversarial_upload(tmp: Path, g: Artifact, size: float) -> Artifact:
    """A site whose update is size * x v^T in the module and direction where the B solve gains
    most (v: the right singular vector of A with the largest s / (s^2 + lam)), sent dense."""
    best = max(g.modules(), key=lambda m: b_update_gain(g.factors(m)[0].double(), 1e-3))
    a = g.factors(best)[0].double()  # (r, d_in)
    u, s, _vh = torch.linalg.svd(a, full_matrices=False)
    lam = 1e-3 * float(s.max()) ** 2
    j = int(torch.argmax(s / (s * s + lam)))
    d_out = g.shapes[naming.factor_key(best, "B")][0]
    x = torch.zeros(d_out, dtype=torch.float64)
    x[0] = size
    delta_b = torch.outer(x, u[:, j] / s[j])  # delta_b @ A = size * e_0 v_j^T
    name = naming.factor_key(best, "B")
    head = g.header
    header = Header(
        kind="upload",
        round=head.round + 1,
        lora=head.lora,
        base_fingerprint=head.base_fingerprint,
        parent_hash=head.content_hash,
        method="fedsrd",
        client_id="adversary",
        num_samples=1,
        layout={name: list(delta_b.shape)},
    )
    path = tmp / "upload-adversary.safetensors"
    write_artifact(path, header, {naming.values_key(name): delta_b.float()})
    return read_artifact(path)


@pytest.fixture
def honest(tmp_path: Path, global_path: Path) -> tuple[Artifact, list[Artifact]]:
    g = read_artifact(global_path)
    locals_ = make_locals(tmp_path, global_path, 3, "dp")
    return g, [upload(tmp_path, "fedsrd", global_path, p, f"site{i}") for i, p in enumerate(locals_)]


def test_the_aggregate_is_the_clipped_sum_over_the_fixed_denominator(tmp_path, honest):
    g, uploads = honest
    org = settings(population=4, sampled=3, rate=0.75)  # D = 3, from the rate, not the count
    agg = aggregate(tmp_path, g, uploads, org, "clipped")
    updates = [dense_update(g, u) for u in uploads]
    norms = [math.sqrt(sum(float(m.pow(2).sum()) for m in up.values())) for up in updates]
    assert sum(n > CLIP for n in norms) >= 2  # the bound bites
    for module in g.modules():
        a, b = (t.double() for t in g.factors(module))
        left, right = (agg.tensor(name).double() for name in naming.aggregate_keys(module))
        want = sum(up[module] * min(1.0, CLIP / n) for up, n in zip(updates, norms, strict=True)) / 3.0
        torch.testing.assert_close(left @ right - b @ a, want, rtol=1e-5, atol=1e-9)
    decisions = agg.header.info["update_norms"]
    assert [d["update_norm"] for d in decisions] == pytest.approx(norms, rel=1e-5)


def test_one_site_moves_the_un_noised_broadcast_by_at_most_the_sensitivity(tmp_path, honest):
    g, uploads = honest
    population = 4
    bound = CLIP * max(b_update_gain(g.factors(m)[0].double(), 1e-3) for m in g.modules()) / population
    without = pre_noise_b_updates(g, aggregate(tmp_path, g, uploads, settings(population, 3), "without"))
    evil = adversarial_upload(tmp_path, g, size=100.0)  # 2000 times the clip: clipped to it
    with_evil = pre_noise_b_updates(
        g, aggregate(tmp_path, g, [*uploads, evil], settings(population, 4), "with")
    )
    moved = float((with_evil - without).norm())
    assert moved <= bound * (1 + 1e-6)
    assert moved >= bound * (1 - 1e-4)  # the adversary's direction reaches the bound: it is tight
    # Replacing one honest site by the adversary: at most twice the bound.
    swapped = pre_noise_b_updates(
        g, aggregate(tmp_path, g, [*uploads[:2], evil], settings(population, 3), "swapped")
    )
    assert float((swapped - without).norm()) <= 2 * bound * (1 + 1e-6)
    # The broadcast records the same sensitivity.
    agg = aggregate(tmp_path, g, uploads, settings(population, 3), "recorded")
    private = PrivateDownload.of(g, agg, BroadcastConfig(0.0, 0, "fp32", factor_choice="b", noise_seed=1))
    assert private.sensitivity == pytest.approx(bound, rel=1e-12)


def test_without_the_clip_the_adversary_would_move_it_further(tmp_path, honest):
    """The bound is a property of the clipped aggregate: the same adversary, unclipped, goes past it."""
    g, uploads = honest
    evil = adversarial_upload(tmp_path, g, size=100.0)
    bound = CLIP * max(b_update_gain(g.factors(m)[0].double(), 1e-3) for m in g.modules()) / 4
    unclipped = get_algorithm(METHOD).aggregate(g, [*uploads, evil], AggregateConfig(METHOD))
    base = get_algorithm(METHOD).aggregate(g, uploads, AggregateConfig(METHOD))
    moved = float(
        (
            pre_noise_b_updates(g, read_artifact(write(unclipped, tmp_path / "u.safetensors")))
            - pre_noise_b_updates(g, read_artifact(write(base, tmp_path / "b.safetensors")))
        ).norm()
    )
    assert moved > 100 * bound


def test_the_broadcast_adds_gaussian_noise_of_the_recorded_std(tmp_path, honest):
    g, uploads = honest
    agg = aggregate(tmp_path, g, uploads, settings(3, 3, noise=2.0), "noise")
    config = BroadcastConfig(0.0, default_download_seed(g, agg), "fp32", factor_choice="b", noise_seed=3)
    broadcast, next_state = get_algorithm(METHOD).broadcast(g, agg, config)
    noise_std = broadcast.header.info["organisation_dp"]["noise_std"]
    sent = torch.cat(
        [
            broadcast.tensors[naming.values_key(naming.factor_key(m, "B"))].double().reshape(-1)
            for m in g.modules()
        ]
    )
    residual = (sent - pre_noise_b_updates(g, agg)) / noise_std
    assert stats.kstest(residual.numpy(), "norm").pvalue > 1e-3
    gain = max(b_update_gain(g.factors(m)[0].double(), 1e-3) for m in g.modules())
    assert noise_std == pytest.approx(2.0 * CLIP * gain / 3, rel=1e-12)
    # Nothing that depends on the un-noised sum travels: no aggregate hash, no update error,
    # and the mask seed comes from the public global state.
    head = broadcast.header
    assert head.aggregate_hash == "" and "update_error" not in head.info
    assert config.seed == int(g.header.content_hash.removeprefix("sha256:")[:15], 16)
    # The coordinator's next state is what a client's apply computes, ledger included.
    bc = read_artifact(write(broadcast, tmp_path / "bc.safetensors"))
    applied = apply_broadcast(g, bc)
    assert applied.header.privacy == next_state.header.privacy
    org = read_privacy(next_state.header).organisation_level
    assert org.rounds == [1] and org.agrees() and org.epsilon > 0


def test_settings_the_sensitivity_argument_does_not_cover_are_refused(tmp_path, honest, global_path):
    g, uploads = honest
    agg = aggregate(tmp_path, g, uploads, settings(3, 3), "refused")
    for bad in ({"factor_choice": "fit"}, {"factor_choice": "b", "download_fit": "lstsq"}):
        with pytest.raises(UsageError, match="factor-choice b --download-fit dare"):
            get_algorithm(METHOD).broadcast(g, agg, BroadcastConfig(0.8, 1, **bad))
    with pytest.raises(UsageError, match="fedsrd-e only"):
        AggregateConfig("fedsrd", organisation_dp=settings(3, 3))
    with pytest.raises(UsageError, match="uniform"):
        AggregateConfig(METHOD, "samples", organisation_dp=settings(3, 3))


def test_a_round_past_the_organisation_budget_is_refused(tmp_path, honest):
    g, uploads = honest
    config = AggregateConfig(METHOD, organisation_dp=settings(3, 3, noise=0.5), max_epsilon=1.0)
    with pytest.raises(PrivacyError, match="past --dp-max-epsilon 1"):
        get_algorithm(METHOD).aggregate(g, uploads, config)


def test_a_round_that_sampled_no_site_sends_noise_alone(tmp_path, honest):
    g, _uploads = honest
    agg = aggregate(tmp_path, g, [], settings(3, 0, rate=0.5), "empty")
    for module in g.modules():
        a, b = (t.double() for t in g.factors(module))
        left, right = (agg.tensor(name).double() for name in naming.aggregate_keys(module))
        torch.testing.assert_close(left @ right, b @ a)
    broadcast, _next = get_algorithm(METHOD).broadcast(
        g, agg, BroadcastConfig(0.8, 2, "fp32", factor_choice="b", noise_seed=4)
    )
    assert broadcast.tensors  # the noise is sent: a round's release does not reveal that no site took part
