"""Sparse, narrow secure rounds through the command line (issue 34): `roster --secure-density
--word-bits`, `sparsify --secure --residual-out/--residual-in` over two rounds, and the site's
refusals as one line with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.files.residual import read_residual

from ..conftest import make_local
from .test_cli import run
from .test_cli_secure import SITES, build_world, mask_args
from .test_cli_surprises import refused


@pytest.fixture
def world(tmp_path: Path) -> dict:
    return build_world(tmp_path)


def sparse_roster(world, state: Path, out: Path, density="0.3", bits="16") -> Path:
    run(
        "roster", "--global", state, "--sites", ",".join(SITES), "--sign-key",
        world["keys"] / "coordinator.key", "--out", out, "--secure-density", density, "--word-bits", bits,
    )  # fmt: skip
    return out


def secure_round(world, state: Path, locals_: dict, roster: Path, index: int, carried: dict) -> Path:
    """Every site masks (keeping its residual), the coordinator sums and broadcasts; the next state."""
    tmp, uploads = world["tmp"], []
    for site in SITES:
        out, kept = tmp / f"up-{index}-{site}.safetensors", tmp / f"res-{index}-{site}.safetensors"
        args = mask_args(world, site, roster, out)
        args[args.index("--global") + 1] = state
        args[args.index("--local") + 1] = locals_[site]
        args += ["--residual-out", kept]
        if site in carried:
            args += ["--residual-in", carried[site]]
        run(*args)
        carried[site] = kept
        uploads.append(out)
    agg, bc, nxt = (tmp / f"{n}-{index}.safetensors" for n in ("agg", "bc", "g"))
    coordinator = ["--trust", world["trust"], "--sign-key", world["keys"] / "coordinator.key"]
    run("aggregate", "--secure", "--roster", roster, "--global", state, *coordinator, "--out", agg, *uploads)
    run("broadcast", "--global", state, "--aggregate", agg, "--out", bc, "--out-global", nxt, *coordinator)
    return nxt


def test_two_sparse_secure_rounds_carry_each_sites_residual(world):
    tmp = world["tmp"]
    roster = sparse_roster(world, world["g0"], tmp / "roster-s1.json")
    body = json.loads(roster.read_text())
    assert (body["version"], body["density"], body["word_bits"]) == (2, 0.3, 16)
    carried: dict = {}
    g1 = secure_round(world, world["g0"], world["locals"], roster, 1, carried)
    up = read_artifact(tmp / "up-1-site-a.safetensors")
    assert up.header.format_version() == 5 and up.header.info["secure"]["word_bits"] == 16
    sent = sum(math.prod(shape) for shape in up.shapes.values())
    dense = sum(
        math.prod(shape) for name, shape in read_artifact(world["g0"]).shapes.items() if "lora_B" in name
    )
    assert 0.25 * dense < sent < 0.35 * dense  # the public positions at density 0.3, 2 bytes each
    assert (
        json.loads(run("inspect", tmp / "up-1-site-a.safetensors", "--json").stdout)["kind"]
        == "masked_upload"
    )
    locals2 = {s: make_local(g1, tmp / f"local2-{s}.safetensors", seed=10 + i) for i, s in enumerate(SITES)}
    run("sign", g1, "--sign-key", world["keys"] / "coordinator.key", "--force")
    roster2 = sparse_roster(world, g1, tmp / "roster-s2.json")
    g2 = secure_round(world, g1, locals2, roster2, 2, carried)
    assert json.loads(run("inspect", g2, "--json").stdout)["round"] == 2
    refused(["inspect", tmp / "res-2-site-a.safetensors"], 3, "is a site's secure residual")
    kept = read_residual(tmp / "res-2-site-a.safetensors")
    assert kept.round == 2 and kept.client == "site-a"
    assert all(float(t.abs().sum()) > 0 for t in kept.modules.values())  # 70% left for round 3


def test_a_site_refuses_what_it_does_not_accept_with_nothing_written(world):
    tmp = world["tmp"]
    out, kept = tmp / "up.safetensors", tmp / "res.safetensors"
    roster = sparse_roster(world, world["g0"], tmp / "roster-s.json", density="0.25")
    args = mask_args(world, "site-a", roster, out)
    refused(args, 2, "--residual-out", watch=(out,))  # the rest would be lost for good
    refused(
        [*args, "--residual-out", kept, "--min-density", "0.5"], 4, "--min-density 0.5", watch=(out, kept)
    )
    refused(
        [*args, "--residual-out", kept, "--min-word-bits", "32"], 4, "--min-word-bits 32", watch=(out, kept)
    )
    refused([*args, "--residual-out", kept, "--residual-in", world["locals"]["site-b"]], 3,
            "not a secure residual", watch=(out, kept))  # fmt: skip
    run(*args, "--residual-out", kept)
    up2, res2 = tmp / "up2.safetensors", tmp / "r2.safetensors"
    again = [*mask_args(world, "site-a", roster, up2), "--residual-out", res2, "--residual-in", kept]
    refused(again, 4, "sends only a residual of an earlier round", watch=(up2, res2))
    refused(["roster", "--global", world["g0"], "--sites", ",".join(SITES), "--sign-key",
             world["keys"] / "coordinator.key", "--out", tmp / "r.json", "--word-bits", "24"], 2, "16 or 32",
            watch=(tmp / "r.json",))  # fmt: skip
