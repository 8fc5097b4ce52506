"""Sparse, narrow secure uploads (issue 34; algorithms/secure.py): a version-2 roster's public
positions and 16-bit words. One masked upload alone still looks uniform, the masked sum still
decodes exactly (against a dense reference), what the positions leave out is kept by the site
and sent later (error feedback), and rosters, uploads and residuals that do not fit are refused."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedsrd_cli.algorithms.base import Payload
from fedsrd_cli.algorithms.secure import (
    SecureFloor,
    a_factors_hash,
    carried_residual,
    masked_sum,
    next_residual,
    projection,
    public_positions,
    secure_aggregate,
)
from fedsrd_cli.config import AggregateConfig
from fedsrd_cli.errors import ArtifactError, MismatchError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.files.atomic import write_files_atomic
from fedsrd_cli.files.residual import Residual, read_residual, residual_write
from fedsrd_cli.math import fixedpoint
from fedsrd_cli.trust.roster import make_roster

from .rounds import write
from .test_secure import SITES, UNIFORM_ALPHA, masked, signed_roster

stats = pytest.importorskip("scipy.stats")


def owed(world, site, module):
    """P_i of the site's module, unweighted (d_out, r) float64: the dense reference."""
    return projection(world["g"], read_local(world["locals"][site]), module)


def test_a_sparse_16_bit_upload_alone_is_uniform_and_its_size_follows_the_density(world):
    roster = signed_roster(world, density=0.25, word_bits=16)
    up = masked(world, "site-a", roster, left={})
    assert up.header.format_version() == 5
    words = torch.cat([fixedpoint.from_stored(up.tensor(n), 16) for n in up.names])
    assert all(up.dtypes[n] == torch.int16 and len(up.shapes[n]) == 1 for n in up.names)
    for cells in (words >> 12, words & 15):  # top and bottom 4 of the 16 bits
        counts = torch.bincount(cells, minlength=16).double()
        assert stats.chisquare(counts.numpy()).pvalue > UNIFORM_ALPHA
    dense = sum(math.prod(world["g"].shapes[naming.factor_key(m, "B")]) for m in world["g"].modules())
    assert 0.2 * dense < words.numel() < 0.3 * dense  # a quarter of the positions, 2 bytes each


def test_the_sparse_masked_sum_decodes_exactly_to_the_dense_reference(world):
    roster = signed_roster(world, density=0.4, word_bits=16)
    uploads = [masked(world, s, roster) for s in SITES]
    sums = masked_sum(world["g"], uploads, roster)
    scale = fixedpoint.scale_for(roster.clip, 3, 16)
    for module in world["g"].modules():
        shape = world["g"].shapes[naming.factor_key(module, "B")]
        positions = public_positions(world["g"].header.content_hash, module, shape, 0.4)
        want = torch.zeros(shape, dtype=torch.int64)
        for site in SITES:  # the plain integers, summed without any modulus
            want += torch.round(owed(world, site, module) / 3 * scale).to(torch.int64)
        reference = torch.where(positions, want.double() / scale, torch.zeros((), dtype=torch.float64))
        assert torch.equal(sums[module], reference)  # the masks cancel, nothing wraps
        exact = sum(owed(world, s, module) for s in SITES) / 3
        assert float((sums[module] - exact * positions).abs().max()) <= 3 / (2 * scale) + 1e-15


def test_what_the_positions_leave_is_kept_and_sent_in_a_later_round(world):
    """Error feedback against a dense reference: sent + left = P + R exactly, and the residual
    given back is what the site owes next."""
    roster = signed_roster(world, density=0.3, word_bits=32)
    left: dict[str, torch.Tensor] = {}
    masked(world, "site-a", roster, left=left)
    g = world["g"]
    for module in g.modules():
        shape = g.shapes[naming.factor_key(module, "B")]
        positions = public_positions(g.header.content_hash, module, shape, 0.3)
        p = owed(world, "site-a", module)
        assert torch.equal(left[module], p * ~positions)
    # The next upload owes P + R: its sent values are (P + R) at the positions, weighted.
    again: dict[str, torch.Tensor] = {}
    up = masked(world, "site-a", signed_roster(world, ("site-a", "site-b"), 2, density=0.3, word_bits=32),
                carried=left, left=again)  # fmt: skip
    for module in g.modules():
        shape = g.shapes[naming.factor_key(module, "B")]
        positions = public_positions(g.header.content_hash, module, shape, 0.3)
        p = owed(world, "site-a", module)
        assert torch.equal(again[module], (p + left[module]) * ~positions)
    assert up.header.info["secure"]["density"] == 0.3


def test_positions_are_public_per_state_and_module_and_dense_rosters_stay_as_they_were(world):
    g = world["g"]
    module = g.modules()[0]
    shape = g.shapes[naming.factor_key(module, "B")]
    first = public_positions(g.header.content_hash, module, shape, 0.5)
    assert torch.equal(first, public_positions(g.header.content_hash, module, shape, 0.5))
    other = public_positions("sha256:" + "0" * 64, module, shape, 0.5)
    assert not torch.equal(first, other)
    assert public_positions(g.header.content_hash, module, shape, 1.0) is None
    dense = signed_roster(world)
    assert dense.version == 1 and "density" not in dense.body()
    up = masked(world, "site-a", dense)
    assert up.header.format_version() == 3
    assert all(up.dtypes[n] == torch.int32 and len(up.shapes[n]) == 2 for n in up.names)


def test_uploads_of_another_density_are_refused_in_one_line(world, tmp_path):
    roster = signed_roster(world, density=0.5, word_bits=16)
    uploads = [masked(world, s, roster) for s in SITES]
    odd = uploads[2]
    info = {**odd.header.info, "secure": {**odd.header.info["secure"], "density": 0.25}}
    forged = read_artifact(
        write(Payload(replace(odd.header, info=info), dict(odd.iter_tensors())), tmp_path / "odd.safetensors")
    )
    with pytest.raises(MismatchError, match="different densities or word widths"):
        secure_aggregate(world["g"], [*uploads[:2], forged], roster, AggregateConfig("fedsrd-e"))


def test_a_dropped_site_and_a_reissued_sparse_roster_complete_the_round(world):
    first = signed_roster(world, density=0.5, word_bits=16)
    with pytest.raises(MismatchError, match="no upload from site-c"):
        secure_aggregate(
            world["g"], [masked(world, s, first) for s in SITES[:2]], first, AggregateConfig("fedsrd-e")
        )
    second = signed_roster(world, SITES[:2], attempt=2, density=0.5, word_bits=16)
    payload = secure_aggregate(
        world["g"], [masked(world, s, second) for s in SITES[:2]], second, AggregateConfig("fedsrd-e")
    )
    assert payload.header.info["secure"]["attempt"] == 2
    assert payload.header.info["secure"]["word_bits"] == 16


def test_a_site_refuses_a_roster_below_its_floor(world):
    sparse = signed_roster(world, density=0.25, word_bits=16)
    with pytest.raises(MismatchError, match="--min-density 0.5"):
        SecureFloor(min_density=0.5).check(sparse)
    with pytest.raises(MismatchError, match="--min-word-bits 32"):
        SecureFloor(min_word_bits=32).check(sparse)
    with pytest.raises(MismatchError, match="--min-sites 4"):
        SecureFloor(min_sites=4).check(sparse)
    SecureFloor().check(sparse)
    with pytest.raises(UsageError, match="--min-word-bits"):
        SecureFloor(min_word_bits=24)


def test_a_roster_that_does_not_fit_its_words_is_refused(world):
    g = world["g"]
    sites = [f"site-{i:03d}" for i in range(129)]
    with pytest.raises(UsageError, match="at most 128 sites"):
        make_roster(g.header.content_hash, 1, sites, 1, 1.0, 0.5, 16)
    with pytest.raises(UsageError, match="--secure-density"):
        make_roster(g.header.content_hash, 1, list(SITES), 1, 1.0, 0.001, 16)
    with pytest.raises(UsageError, match="--word-bits"):
        make_roster(g.header.content_hash, 1, list(SITES), 1, 1.0, 0.5, 8)


def test_a_residual_carries_over_only_for_its_site_and_the_same_a_factors(world, tmp_path):
    g = world["g"]
    left: dict[str, torch.Tensor] = {}
    masked(world, "site-a", signed_roster(world, density=0.5), left=left)
    kept = next_residual(g, "site-a", left)
    path = tmp_path / "residual.safetensors"
    write_files_atomic([residual_write(path, kept)], force=False)
    back = read_residual(path)
    assert (back.client, back.round, back.state) == ("site-a", 1, g.header.content_hash)
    for module in g.modules():
        assert torch.equal(back.modules[module], left[module].float())
    with pytest.raises(MismatchError, match="not 'site-b'"):
        carried_residual(back, g, "site-b", "r")
    with pytest.raises(MismatchError, match="sends only a residual of an earlier round"):
        carried_residual(back, g, "site-a", "r")  # this round's own
    with pytest.raises(MismatchError, match="other A factors"):
        carried_residual(replace(back, round=0, a_factors="sha256:" + "1" * 64), g, "site-a", "r")
    moved = Residual("site-a", 0, back.state, a_factors_hash(g), back.modules)
    assert set(carried_residual(moved, g, "site-a", "r")) == set(g.modules())
    with pytest.raises(ArtifactError, match="not a secure residual"):
        read_residual(world["locals"]["site-a"])
