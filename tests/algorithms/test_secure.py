"""Secure aggregation (algorithms/secure.py): a masked upload alone looks uniform, the masked sum
is the plain sum in fixed point exactly, and the secure round's state matches the plain
projection round's within the stated bound."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.secure import masked_sum, masked_upload, projection, secure_aggregate
from fedsrd_cli.config import AggregateConfig, BroadcastConfig
from fedsrd_cli.errors import MismatchError, TrustError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import Header, read_artifact, write_artifact
from fedsrd_cli.math import fixedpoint
from fedsrd_cli.math.lowrank import update_b
from fedsrd_cli.trust.agreement import AgreementKey, generate_agreement_key, published_key
from fedsrd_cli.trust.roster import make_roster, read_roster, write_roster
from fedsrd_cli.trust.signing import SigningKey, Trust, generate_keypair

from ..conftest import make_local
from .rounds import write

stats = pytest.importorskip("scipy.stats")
SITES = ("site-a", "site-b", "site-c")
# The masks come from fresh keys each run, so each run's chi-square test is a new draw: at level
# 1e-3 a correct run fails about once in 500 (a CI run drew p = 5.8e-5; 400 draws of this test
# were uniform, KS p = 0.91). At 1e-6 it fails by chance once in a million; unmasked words fail it.
UNIFORM_ALPHA = 1e-6


def build_world(tmp_path: Path, global_path: Path) -> dict:
    """Keys and trust for the coordinator and SITES, and a simulated local state per site."""
    keys, trust_dir = tmp_path / "keys", tmp_path / "trust"
    trust_dir.mkdir()
    for party in ("coordinator", *SITES):
        generate_keypair(keys / party)
        shutil.copy(keys / f"{party}.pub", trust_dir)
    for site in SITES:
        generate_agreement_key(SigningKey.load(keys / f"{site}.key"), keys)
        shutil.copy(keys / f"{site}.agreement", trust_dir)
    locals_ = {
        site: make_local(global_path, tmp_path / f"local-{site}.safetensors", seed=i + 1, scale=0.05)
        for i, site in enumerate(SITES)
    }
    return {
        "tmp": tmp_path,
        "keys": keys,
        "trust": Trust.load(trust_dir),
        "g": read_artifact(global_path),
        "locals": locals_,
    }


def signed_roster(world, sites=SITES, attempt=1, clip=1.0, density=1.0, word_bits=32, spread=False):
    g = world["g"]
    roster = make_roster(
        g.header.content_hash, g.header.round + 1, list(sites), attempt, clip, density, word_bits, spread
    )
    path = world["tmp"] / f"roster-{attempt}{'-spread' if spread else ''}.json"
    write_roster(path, roster, SigningKey.load(world["keys"] / "coordinator.key"), force=True)
    return read_roster(path, world["trust"])


def masked(world, site, roster, carried=None, left=None):
    """The site's masked upload, read back; `left` (a dict) receives what it left behind."""
    key = AgreementKey.load(world["keys"] / f"{site}.agreement.key")
    published = {s: published_key(world["trust"], s) for s in roster.sites}
    payload, kept = masked_upload(
        world["g"], read_local(world["locals"][site]), site, 10, roster, key, published, carried
    )
    if left is not None:
        left.update(kept)
    return read_artifact(write(payload, world["tmp"] / f"up-{site}-{roster.attempt}.safetensors"))


def test_one_masked_upload_alone_is_uniform_words(world):
    roster = signed_roster(world)
    up = masked(world, "site-a", roster)
    words = torch.cat([fixedpoint.from_stored(up.tensor(n)).reshape(-1) for n in up.names])
    # chi-square over the top 4 bits (16 cells) and the bottom 4 bits: uniform, though the values
    # underneath are small numbers near 0 (whose fixed-point words cluster at 0 and 2^32).
    for cells in (words >> 28, words & 15):
        counts = torch.bincount(cells, minlength=16).double()
        assert stats.chisquare(counts.numpy()).pvalue > UNIFORM_ALPHA
    local = read_local(world["locals"]["site-a"])
    plain = torch.cat(
        [
            fixedpoint.encode(projection(world["g"], local, m) / 3, 2**20).reshape(-1)
            for m in world["g"].modules()
        ]
    )
    assert stats.chisquare(torch.bincount(plain >> 28, minlength=16).double().numpy()).pvalue < UNIFORM_ALPHA


def test_the_masked_sum_is_the_sum_of_the_fixed_point_values_exactly(world):
    roster = signed_roster(world)
    uploads = [masked(world, site, roster) for site in SITES]
    scale = fixedpoint.scale_for(roster.clip, 3)
    sums = masked_sum(world["g"], uploads, roster)
    for module in world["g"].modules():
        words = [
            fixedpoint.encode(projection(world["g"], read_local(world["locals"][s]), module) / 3, scale)
            for s in SITES
        ]
        plain = fixedpoint.decode(fixedpoint.add(fixedpoint.add(words[0], words[1]), words[2]), scale)
        assert torch.equal(sums[module], plain)  # the masks cancel to the bit


def dense_upload(world, site: str) -> Path:
    """The site's whole change of every factor, fp32, as a plain upload (no sparsification)."""
    g, local = world["g"], read_artifact(world["locals"][site])
    tensors, layout = {}, {}
    for name in g.names:
        tensors[naming.values_key(name)] = local.tensor(name) - g.tensor(name)
        layout[name] = list(g.shapes[name])
    head = g.header
    header = Header(
        kind="upload", round=head.round + 1, lora=head.lora, base_fingerprint=head.base_fingerprint,
        parent_hash=head.content_hash, method="fedsrd", client_id=site, num_samples=10, layout=layout,
    )  # fmt: skip
    path = world["tmp"] / f"dense-{site}.safetensors"
    write_artifact(path, header, tensors)
    return path


def test_the_secure_round_matches_the_plain_projection_round_within_the_bound(tmp_path, world, global_path):
    roster = signed_roster(world)
    g = world["g"]
    uploads = [masked(world, s, roster) for s in SITES]
    payload = secure_aggregate(g, uploads, roster, AggregateConfig("fedsrd-e"))
    agg = read_artifact(write(payload, tmp_path / "agg-secure.safetensors"))
    scale = fixedpoint.scale_for(roster.clip, 3)
    for module in g.modules():
        a, b = (t.double() for t in g.factors(module))
        left, right = (agg.tensor(n).double() for n in naming.aggregate_keys(module))
        got = update_b(left, right, b, a, 1e-3)
        exact = sum(projection(g, read_local(world["locals"][s]), module) for s in SITES) / 3
        gram = a @ a.mT
        solve = torch.linalg.inv(
            gram + 1e-3 * torch.linalg.eigvalsh(gram)[-1] * torch.eye(gram.shape[0], dtype=torch.float64)
        )
        want = exact @ solve
        bound = 3 / (2 * scale) * float(solve.abs().sum(dim=0).max())  # n / (2 s) * ||M||_1
        assert float((got - want).abs().max()) <= bound * (1 + 1e-6) + 1e-12
    # The plain projection round: FedSRD-e on dense fp32 uploads of the same factors, factor B.
    plain_uploads = [read_artifact(dense_upload(world, s)) for s in SITES]
    method = get_algorithm("fedsrd-e")
    plain = read_artifact(
        write(
            method.aggregate(g, plain_uploads, AggregateConfig("fedsrd-e")),
            tmp_path / "agg-plain.safetensors",
        )
    )
    config = BroadcastConfig(0.8, 9, "fp32", factor_choice="b")
    _bc, secure_next = method.broadcast(g, agg, config)
    _bc, plain_next = method.broadcast(g, plain, config)
    for name, tensor in plain_next.tensors.items():
        torch.testing.assert_close(secure_next.tensors[name], tensor, rtol=1e-5, atol=1e-7)


def test_every_site_must_deliver_for_the_masks_to_cancel_and_a_new_roster_completes_the_round(world):
    first = signed_roster(world)
    delivered = [masked(world, s, first) for s in SITES[:2]]
    with pytest.raises(MismatchError, match="no upload from site-c"):
        secure_aggregate(world["g"], delivered, first, AggregateConfig("fedsrd-e"))
    second = signed_roster(world, SITES[:2], attempt=2)
    again = [masked(world, s, second) for s in SITES[:2]]
    with pytest.raises(MismatchError, match="another roster"):  # a replay of the first attempt
        secure_aggregate(world["g"], [again[0], delivered[1]], second, AggregateConfig("fedsrd-e"))
    payload = secure_aggregate(world["g"], again, second, AggregateConfig("fedsrd-e"))
    assert payload.header.info["secure"]["attempt"] == 2
    # Each attempt's masks are fresh: the same site's two uploads differ by more than the values.
    a1, a2 = (fixedpoint.from_stored(u.tensor(u.names[0])) for u in (delivered[0], again[0]))
    assert float((a1 != a2).double().mean()) > 0.99


def test_a_forged_roster_or_a_wrong_key_is_refused(world):
    roster = signed_roster(world)
    path = world["tmp"] / "roster-1.json"
    path.write_text(path.read_text().replace('"site-c"', '"site-x"'))
    with pytest.raises(TrustError, match="does not verify"):
        read_roster(path, world["trust"])
    stranger = world["tmp"] / "stranger"
    generate_keypair(stranger / "coordinator")
    forged = make_roster(roster.state, roster.round, list(SITES), 1, 1.0)
    write_roster(world["tmp"] / "forged.json", forged, SigningKey.load(stranger / "coordinator.key"))
    with pytest.raises(TrustError, match="another key"):
        read_roster(world["tmp"] / "forged.json", world["trust"])
    (world["trust"].directory / "site-c.agreement").write_text(
        (world["trust"].directory / "site-c.agreement").read_text().replace('"public": "', '"public": "A')
    )
    with pytest.raises(TrustError):
        published_key(world["trust"], "site-c")


def test_a_value_outside_the_roster_range_is_refused_by_the_site(world):
    roster = signed_roster(world, clip=1e-6)
    with pytest.raises(MismatchError, match="--clip at least"):
        masked(world, "site-a", roster)
