"""FedExP's step in secure rounds (algorithms/secure.py, `roster --update-spread`): every site adds
its squared update norm as a masked total, the coordinator learns the sum of those norms and the
sum S, and the step it records matches FedExP's formula on the dense weight-space updates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsrd_cli.algorithms.method import coordinator_step
from fedsrd_cli.algorithms.secure import (
    SecureFloor,
    inverse_grams,
    projection,
    public_positions,
    secure_aggregate,
    spread_bound,
)
from fedsrd_cli.config import AggregateConfig, BroadcastConfig
from fedsrd_cli.errors import ArtifactError, MismatchError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.math import fixedpoint
from fedsrd_cli.math.extrapolation import fedexp_step
from fedsrd_cli.trust.roster import read_roster

from .rounds import write
from .test_secure import SITES, UNIFORM_ALPHA, masked, signed_roster

stats = pytest.importorskip("scipy.stats")


def spread_roster(world, density=1.0, word_bits=32, attempt=1, sites=SITES):
    return signed_roster(world, sites, attempt, 1.0, density, word_bits, spread=True)


def dense_sent(world, site, module, density, weight):
    """What the site sends of `module` as a dense weight-space move (d_out, d_in): the scattered
    w P at the public positions, lifted by the least-squares B update through A (first round:
    nothing carried)."""
    g = world["g"]
    sent = projection(g, read_local(world["locals"][site]), module) * weight  # (d_out, r)
    positions = public_positions(g.header.content_hash, module, sent.shape, density)
    if positions is not None:
        sent = sent * positions
    a = g.factors(module)[0].double()  # (r, d_in)
    return sent @ torch.linalg.pinv(a).mT  # x G^-1 A = x pinv(A)^T, through an SVD instead


@pytest.mark.parametrize(("density", "bits"), [(1.0, 32), (0.4, 16)])
def test_the_secure_step_is_fedexp_of_the_dense_weight_updates(world, density, bits):
    roster = spread_roster(world, density, bits)
    uploads = [masked(world, s, roster) for s in SITES]
    aggregate = secure_aggregate(world["g"], uploads, roster, AggregateConfig("fedsrd-e", update_spread=True))
    spread = aggregate.header.info["update_spread"]
    assert spread["source"] == "secure_sum"
    modules, w = world["g"].modules(), roster.weight
    moves = {s: [dense_sent(world, s, m, density, w) for m in modules] for s in SITES}  # w D_i per module
    client_sq = sum(sum(float((x**2).sum()) for x in moves[s]) for s in SITES) / w  # sum_i w ||D_i||^2
    mean_sq = sum(float((sum(moves[s][k] for s in SITES) ** 2).sum()) for k in range(len(modules)))
    assert spread["client_sq"] == pytest.approx(client_sq, rel=1e-6)
    # S is decoded from fixed point, each element within n / (2 s): ||S - S_exact||_M is at most
    # n / (2 s) sqrt(sum_modules (d_out r) lambda_max(G^-1)) (every position counted)
    scale = fixedpoint.scale_for(roster.clip, len(SITES), bits)
    room = sum(
        math.prod(world["g"].shapes[naming.factor_key(m, "B")]) * float(torch.linalg.eigvalsh(inv).max())
        for m, inv in inverse_grams(world["g"]).items()
    )
    error = len(SITES) / (2 * scale) * math.sqrt(room)
    assert abs(math.sqrt(spread["mean_sq"]) - math.sqrt(mean_sq)) <= error < 0.02 * math.sqrt(mean_sq)
    eta = fedexp_step(client_sq, mean_sq, 16.0)
    assert eta > 1.0  # the sites' updates disagree: FedExP extrapolates
    assert spread["extrapolation"] == pytest.approx(eta, rel=0.05)
    path = write(aggregate, world["tmp"] / f"agg-{density}.safetensors")
    step, record = coordinator_step(read_artifact(path), BroadcastConfig(step_rule="fedexp"), private=False)
    assert step == spread["extrapolation"] and record["rule"] == "fedexp"


def test_the_masked_totals_sum_exactly_and_one_alone_is_uniform(world):
    roster = spread_roster(world, 0.5, 16)
    limbs = fixedpoint.limb_count(3, 16)
    uploads = [masked(world, s, roster) for s in SITES]
    assert all(u.shapes[naming.MASKED_SPREAD] == (limbs,) for u in uploads)
    bound = spread_bound(world["g"], roster, inverse_grams(world["g"]))
    plain = [dense_sent(world, s, m, 0.5, roster.weight) for s in SITES for m in world["g"].modules()]
    total = sum(
        fixedpoint.from_stored(u.tensor(naming.MASKED_SPREAD), 16) for u in uploads
    ) % fixedpoint.modulus(16)
    decoded = fixedpoint.decode_total(total, bound, 3, 16)
    assert decoded == pytest.approx(sum(float((x**2).sum()) for x in plain), rel=1e-9)
    # one site's limbs, masked for 48 rosters (attempts): the top 4 of each 16-bit word are uniform,
    # though the plain limbs' top limb is nearly all zeros
    words = torch.cat(
        [
            fixedpoint.from_stored(masked(world, "site-a", again).tensor(naming.MASKED_SPREAD), 16)
            for again in (spread_roster(world, 0.5, 16, attempt=k) for k in range(2, 50))
        ]
    )
    counts = torch.bincount(words >> 12, minlength=16).double()
    assert stats.chisquare(counts.numpy()).pvalue > UNIFORM_ALPHA


def test_a_roster_without_spread_cannot_give_fedexp_and_a_site_may_refuse_one_with_it(world):
    plain = signed_roster(world, density=0.5, word_bits=16)
    uploads = [masked(world, s, plain) for s in SITES]
    assert naming.MASKED_SPREAD not in uploads[0].shapes
    with pytest.raises(MismatchError, match="made without --update-spread"):
        secure_aggregate(world["g"], uploads, plain, AggregateConfig("fedsrd-e", update_spread=True))
    spread = spread_roster(world, 0.5, 16)
    assert spread.version == 2 and spread.body()["spread"] is True and "spread" not in plain.body()
    with pytest.raises(MismatchError, match="which this site refuses \\(--refuse-spread\\)"):
        SecureFloor(allow_spread=False).check(spread)
    SecureFloor(allow_spread=False).check(plain)
    path = world["tmp"] / "roster-1-spread.json"  # signed_roster wrote it for spread_roster above
    body = json.loads(path.read_text())
    path.write_text(json.dumps({**body, "spread": "yes"}))
    with pytest.raises(ArtifactError, match="its spread is 'yes', not true or false"):
        read_roster(path, world["trust"])
    # an upload of the spread roster without its total, or a plain one given to it, is refused
    with pytest.raises(MismatchError, match="was masked for roster"):
        secure_aggregate(world["g"], uploads, spread, AggregateConfig("fedsrd-e", update_spread=True))


def test_a_dropped_site_and_a_reissued_spread_roster_complete_the_round(world):
    first = spread_roster(world, 0.5, 16)
    [masked(world, s, first) for s in SITES]  # site-c's upload never arrives
    second = spread_roster(world, 0.5, 16, attempt=2, sites=SITES[:2])
    uploads = [masked(world, s, second) for s in SITES[:2]]
    aggregate = secure_aggregate(world["g"], uploads, second, AggregateConfig("fedsrd-e", update_spread=True))
    moves = [dense_sent(world, s, m, 0.5, 0.5) for s in SITES[:2] for m in world["g"].modules()]
    assert aggregate.header.info["update_spread"]["client_sq"] == pytest.approx(
        sum(float((x**2).sum()) for x in moves) / 0.5, rel=1e-6
    )
