"""FedExP's step in a secure round through the command line: `roster --update-spread`, `sparsify
--secure` (or `--refuse-spread`), `aggregate --secure --update-spread`, `broadcast --step-rule
fedexp`; the refusals as one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsrd_cli.files.artifacts import read_artifact

from .test_cli import run
from .test_cli_secure import SITES, build_world, mask_args
from .test_cli_surprises import refused


@pytest.fixture
def world(tmp_path: Path) -> dict:
    return build_world(tmp_path)


def spread_roster(world, out: Path, *extra) -> Path:
    run(
        "roster", "--global", world["g0"], "--sites", ",".join(SITES), "--sign-key",
        world["keys"] / "coordinator.key", "--out", out, *extra,
    )  # fmt: skip
    return out


def test_a_secure_round_takes_fedexps_step_from_the_masked_norms(world):
    tmp = world["tmp"]
    roster = spread_roster(world, tmp / "roster-spread.json", "--update-spread", "--secure-density", "0.5",
                           "--word-bits", "16")  # fmt: skip
    body = json.loads(roster.read_text())
    assert (body["version"], body["spread"]) == (2, True)
    uploads, kept = [], []
    for site in SITES:
        out, residual = tmp / f"up-{site}.safetensors", tmp / f"res-{site}.safetensors"
        run(*mask_args(world, site, roster, out), "--residual-out", residual)
        uploads.append(out)
        kept.append(residual)
    assert read_artifact(uploads[0]).header.info["secure"]["spread"] is True
    report = json.loads(run("inspect", uploads[0], "--json", "--trust", world["trust"]).stdout)
    assert report["kind"] == "masked_upload" and report["info"]["secure"]["spread"] is True
    coordinator = ["--trust", world["trust"], "--sign-key", world["keys"] / "coordinator.key"]
    agg, bc, nxt = tmp / "agg.safetensors", tmp / "bc.safetensors", tmp / "g1.safetensors"
    plain_agg = tmp / "agg-plain.safetensors"
    base = ["--roster", roster, "--global", world["g0"], *coordinator]
    run("aggregate", "--secure", *base, "--out", plain_agg, *uploads)
    refused(["broadcast", "--global", world["g0"], "--aggregate", plain_agg, "--out", bc, "--out-global", nxt,
             "--step-rule", "fedexp", *coordinator], 4, "with a roster made with --update-spread",
            watch=(bc, nxt))  # fmt: skip
    run("aggregate", "--secure", "--update-spread", "--roster", roster, "--global", world["g0"], *coordinator,
        "--out", agg, *uploads)  # fmt: skip
    spread = read_artifact(agg).header.info["update_spread"]
    assert spread["source"] == "secure_sum" and spread["extrapolation"] >= 1.0
    run("broadcast", "--global", world["g0"], "--aggregate", agg, "--out", bc, "--out-global", nxt,
        "--step-rule", "fedexp", *coordinator)  # fmt: skip
    info = read_artifact(bc).header.info
    assert info["step_calibration"]["rule"] == "fedexp"
    assert info["step_calibration"]["extrapolation"] == spread["extrapolation"]


def test_a_site_may_refuse_the_spread_and_a_plain_roster_gives_none(world):
    tmp = world["tmp"]
    roster = spread_roster(world, tmp / "roster-spread.json", "--update-spread")
    out = tmp / "up.safetensors"
    refused([*mask_args(world, "site-a", roster, out), "--refuse-spread"], 4, "--refuse-spread", watch=(out,))
    uploads = []
    for site in SITES:  # the default roster: no spread asked for
        path = tmp / f"up-plain-{site}.safetensors"
        run(*mask_args(world, site, world["roster"], path))
        uploads.append(path)
    agg = tmp / "agg.safetensors"
    refused(["aggregate", "--secure", "--update-spread", "--roster", world["roster"], "--global", world["g0"],
             "--trust", world["trust"], "--out", agg, *uploads], 4, "made without --update-spread",
            watch=(agg,))  # fmt: skip
