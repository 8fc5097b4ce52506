"""Issue 32, "a ledger that never under-reports, inputs that --force cannot destroy": regression
tests of its rows on the toy model (rows 2 and 6 train, so they live in test_cli_privacy.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .test_cli import run
from .test_cli_surprises import make_world, refused

PRIVACY_EXIT = 8


def org_dp_flags(max_epsilon: float) -> list:
    return [
        "--method",
        "fedsrd-e",
        "--dp-clip",
        0.05,
        "--dp-noise-multiplier",
        1,
        "--dp-sampling-rate",
        0.5,
        "--dp-delta",
        1e-3,
        "--dp-max-epsilon",
        max_epsilon,
    ]


# ------------------------------------------------------------- row 3: --dp-max-epsilon works


def test_aggregate_dp_max_epsilon_caps_organisation_level_dp(tmp_path: Path):
    """`aggregate --dp-max-epsilon` with the other organisation-level flags always exited 2 ("give
    --dp-clip ... too"): the cap was checked before the DP settings were in the config."""
    w = make_world(tmp_path)
    out = tmp_path / "agg-capped.safetensors"
    line = refused(
        ["aggregate", "--global", w["g0"], "--out", out, *org_dp_flags(0.1), *w["uploads"]],
        PRIVACY_EXIT,
        "past --dp-max-epsilon 0.1",
        watch=(out,),
        root=tmp_path,
    )
    assert "nothing was written" in line
    done = run("aggregate", "--global", w["g0"], "--out", out, *org_dp_flags(100), *w["uploads"], "--json")
    assert "organisation_dp" in json.loads(done.stdout)
    assert out.exists()
