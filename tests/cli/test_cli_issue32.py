"""Issue 32, "a ledger that never under-reports, inputs that --force cannot destroy": regression
tests of its rows on the toy model (rows 2 and 6 train, so they live in test_cli_privacy.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.privacy.ledger import RECORD, Ledger, Release, read_privacy

from ..conftest import make_local
from .test_cli import run
from .test_cli_surprises import make_world, refused

PRIVACY_EXIT = 8
runner = CliRunner()


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


# ------------------------------------------------------------- row 6: no known DP randomness


def test_no_command_takes_a_seed_for_its_dp_randomness(tmp_path: Path):
    """`train-local --dp-test-seed 0` made DP-SGD's noise known (two runs, the same bytes) in a file
    whose ledger claims DP; aggregate's and broadcast's hidden seeds did the same for the sites'
    sampling and the organisation-level noise. Tests seed through the library instead."""
    w = make_world(tmp_path)
    out = tmp_path / "out.safetensors"
    commands = [
        ["train-local", "--base", w["base"], "--global", w["g0"], "--data", w["data"], "--client", "c0"]
        + ["--dp-noise-multiplier", 1, "--out", out],
        ["aggregate", "--global", w["g0"], "--out", out, *org_dp_flags(100), *w["uploads"]],
        ["broadcast", "--global", w["g0"], "--aggregate", w["aggregate"], "--out", out]
        + ["--out-global", tmp_path / "g1-seeded.safetensors"],
    ]
    for args in commands:
        result = runner.invoke(app, [str(a) for a in [*args, "--dp-test-seed", 0]])
        assert result.exit_code == 2, result.output
        assert "No such option" in result.output and "--dp-test-seed" in result.output
        assert not out.exists()


# ------------------------------------------------------------- row 7: --force never replaces an input


def test_force_never_replaces_an_input_however_it_is_spelled(tmp_path: Path, monkeypatch):
    """`sparsify --out <its --local> --force` (and aggregate's, apply's, broadcast's, ...) replaced
    the input: a DP local state cannot be made again. Each is refused in one line, exit 2, whatever
    the spelling of the path (relative, through a symbolic link), and nothing changes."""
    w = make_world(tmp_path)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link-to-g0.safetensors"
    link.symlink_to(w["g0"])
    g1_new = tmp_path / "g1-new.safetensors"
    cases = [
        (["sparsify", "--global", w["g0"], "--local", w["local"], "--client", "c0"], w["local"].name),
        (["aggregate", "--global", w["g0"], *w["uploads"]], w["uploads"][1]),
        (["aggregate", "--global", w["g0"], *w["uploads"]], link),
        (["apply", "--global", w["g0"], "--broadcast", w["broadcast"]], link),
        (["apply", "--global", w["g1"], "--broadcast", w["broadcast"]], w["broadcast"].name),
        (["broadcast", "--global", w["g0"], "--aggregate", w["aggregate"], "--out-global", g1_new], link),
        (["unpack", w["upload"]], w["upload"].name),
        (["eval", "--base", w["base"], "--data", w["data"], "--global", w["g1"]], w["data"]),
    ]
    watched = (w["g0"], w["g1"], w["local"], *w["uploads"], w["broadcast"], w["aggregate"], w["data"], g1_new)
    for args, out in cases:
        refused([*args, "--out", out, "--force"], 2, "refusing to replace an input", watched, tmp_path)
    # broadcast's next state, even when --out is new (the rerun after a crash takes that route)
    refused(
        ["broadcast", "--global", w["g0"], "--aggregate", w["aggregate"], "--out", g1_new]
        + ["--out-global", link, "--force"],
        2,
        "is also --global",
        watched,
        tmp_path,
    )


# ------------------------------------------------------------- row 15: smaller items


def test_an_output_that_is_a_directory_is_refused_at_once(tmp_path: Path):
    """`--out DIR` said "pass --force", and with --force "is a directory": it says so at once."""
    w = make_world(tmp_path)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for force in ([], ["--force"]):
        line = refused(
            ["sparsify", "--global", w["g0"], "--local", w["local"], "--client", "c0", "--out", folder]
            + force,
            5,
            "is a directory",
            (folder,),
            tmp_path,
        )
        assert "--force" not in line
    assert list(folder.iterdir()) == []


# ------------------------------------------------------------- rows 4 and 5: the sites' ledgers


def with_ledger(upload: Path, target: Path, rounds: tuple[int, ...], sigma: float = 1.0) -> Path:
    """`upload` written again carrying a record-level DP ledger of `rounds` for its client (as
    `train-local --dp-*` would have made it: 3 steps at rate 4 / 120 each round)."""
    artifact = read_artifact(upload)
    ledger = Ledger.start(RECORD, artifact.header.client_id, 1 / 120)
    for r in rounds:
        ledger = ledger.extended(Release(r, "dp-sgd", sigma, 4 / 120, 1.0, 3, 120))
    header = replace(artifact.header, privacy={"record_level": ledger.to_json()})
    write_artifact(target, header, dict(artifact.iter_tensors()), force=True)
    return target


def site_rounds(path: Path) -> dict[str, list[int]]:
    sites = read_privacy(read_artifact(path).header).sites or {}
    return {site: ledger.rounds for site, ledger in sites.items()}


def test_every_upload_a_site_released_counts_in_its_ledger_whatever_the_sampling(tmp_path: Path):
    """With organisation-level Poisson sampling, the uploads left out of the sum had still been
    released to the coordinator; their rounds were missing from the sites' ledgers."""
    w = make_world(tmp_path)
    uploads = [with_ledger(u, tmp_path / f"dp-{u.name}", (1,)) for u in w["uploads"]]
    flags = [*org_dp_flags(100)]
    flags[flags.index("--dp-sampling-rate") + 1] = 1e-9  # almost surely none sampled
    agg = tmp_path / "agg-sampled.safetensors"
    result = run("aggregate", "--global", w["g0"], "--out", agg, *flags, *uploads, "--json")
    assert "sampled 0 of 3" in json.loads(result.stdout)["organisation_dp"]
    assert site_rounds(agg) == {"c0": [1], "c1": [1], "c2": [1]}
    bc, g1 = tmp_path / "bc-sampled.safetensors", tmp_path / "g1-sampled.safetensors"
    run("broadcast", "--global", w["g0"], "--aggregate", agg, "--out", bc, "--out-global", g1)
    assert site_rounds(g1) == {"c0": [1], "c1": [1], "c2": [1]}


def uploads_of_round(
    tmp: Path, state: Path, tag: str, ledgers: dict[str, tuple[int, ...] | None]
) -> list[Path]:
    """One upload per client of `ledgers` from `state`, carrying a ledger of those rounds (None: no DP)."""
    out = []
    for i, (client, rounds) in enumerate(ledgers.items()):
        local = make_local(state, tmp / f"local-{tag}-{client}.safetensors", seed=100 + i)
        upload = tmp / f"up-{tag}-{client}.safetensors"
        run("sparsify", "--global", state, "--local", local, "--client", client, "--out", upload)
        out.append(upload if rounds is None else with_ledger(upload, upload, rounds))
    return out


def test_a_round_without_dp_before_a_site_s_ledger_began_is_not_forgotten(tmp_path: Path):
    """A site that sent round 1 without DP and trained with DP from round 2 was accepted by
    `aggregate --require-dp 3`, its ledger showing rounds [2] only."""
    w = make_world(tmp_path)  # round 1 of c0, c1, c2, none with DP: no file records who took part
    late = uploads_of_round(tmp_path, w["g1"], "late", {"c0": (2,), "c1": (2,)})
    out = tmp_path / "agg-late.safetensors"
    refused(
        ["aggregate", "--global", w["g1"], "--require-dp", 3, "--out", out, *late],
        PRIVACY_EXIT,
        "begins at round 2, and nothing recorded since round 1",
        (out,),
        tmp_path,
    )
    # Round 1 with DP at c0 only: from then on the files record every site's rounds.
    first = uploads_of_round(tmp_path, w["g0"], "r1", {"c0": (1,), "c1": None, "c2": None})
    agg1, bc1, g1 = (tmp_path / f"{name}-tracked.safetensors" for name in ("agg1", "bc1", "g1"))
    run("aggregate", "--global", w["g0"], "--out", agg1, *first)
    run("broadcast", "--global", w["g0"], "--aggregate", agg1, "--out", bc1, "--out-global", g1)
    assert read_privacy(read_artifact(g1).header).participants == {"c0": (1,), "c1": (1,), "c2": (1,)}
    second = uploads_of_round(tmp_path, g1, "r2", {"c0": (1, 2), "c1": (2,), "c3": (2,)})
    agg2 = tmp_path / "agg2-tracked.safetensors"
    refused(
        ["aggregate", "--global", g1, "--require-dp", 3, "--out", agg2, *second],
        PRIVACY_EXIT,
        "client 'c1' sent round(s) [1] without DP before its privacy ledger began at round 2",
        (agg2,),
        tmp_path,
    )
    # Without --require-dp the round is taken, and c1's epsilon is infinite; c3 joined in round 2.
    report = json.loads(run("aggregate", "--global", g1, "--out", agg2, *second, "--json").stdout)
    assert report["site_epsilons"]["c1"] is None
    assert report["site_epsilons"]["c0"] is not None and report["site_epsilons"]["c3"] is not None
    assert site_rounds(agg2) == {"c0": [1, 2], "c1": [1, 2], "c3": [2]}
    privacy = json.loads(run("inspect", agg2, "--json").stdout)["privacy"]
    assert privacy["sites"]["c1"]["rounds"][0] == {"round": 1, "mechanism": "none"}
    assert privacy["participants"] == {"c0": [1, 2], "c1": [1, 2], "c2": [1], "c3": [2]}
    assert privacy["agree"]


# ------------------------------------------------------------- row 12: --secure --align-factors


def test_a_secure_aggregate_refuses_align_factors(tmp_path: Path):
    """`aggregate --secure --align-factors` exited 0 and ignored the flag (it needs each site's
    factors, which a secure sum hides); it is refused like with organisation-level DP."""
    w = make_world(tmp_path)
    out = tmp_path / "agg-secure.safetensors"
    args = ["aggregate", "--secure", "--roster", tmp_path / "roster.json", "--trust", tmp_path / "keys"]
    refused(
        [*args, "--global", w["g0"], "--align-factors", "--out", out, *w["uploads"]],
        2,
        "--align-factors depends on each site's factors: not with --secure",
        (out,),
        tmp_path,
    )


def test_demo_assets_refuses_a_folder_it_did_not_write_in_one_line(tmp_path: Path):
    """demo-assets --force on a folder that is not its own printed the cache line, then the error."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for model in ("toy", "smollm2"):
        refused(
            ["demo-assets", "--model", model, "--out", folder, "--force"],
            5,
            "not a fedsrd demo-assets directory",
            (folder / "notes.txt",),
            tmp_path,
        )


def test_inspect_text_says_what_json_says_of_quantized_values_and_aligned_factors(tmp_path: Path):
    """Issue 32, row 13: an int8/int4 broadcast and an aligned aggregate said so only under --json;
    the text says it too."""
    from ..conftest import make_global

    g0 = make_global(tmp_path / "g0.safetensors")
    uploads = []
    for i in range(2):
        local = make_local(g0, tmp_path / f"local-{i}.safetensors", seed=i + 1)
        uploads.append(tmp_path / f"up-{i}.safetensors")
        run("sparsify", "--global", g0, "--local", local, "--client", f"c{i}", "--out", uploads[-1])
    agg = tmp_path / "agg.safetensors"
    run("aggregate", "--global", g0, "--out", agg, "--align-factors", *uploads)
    assert json.loads(run("inspect", agg, "--json").stdout)["info"]["aligned"] is True
    assert "aligned to the clients' own factors (--align-factors)" in run("inspect", agg).stdout
    for value_dtype in ("int8", "int4"):
        bc, nxt = tmp_path / f"bc-{value_dtype}.safetensors", tmp_path / f"g1-{value_dtype}.safetensors"
        run(
            "broadcast", "--global", g0, "--aggregate", agg, "--out", bc, "--out-global", nxt,
            "--value-dtype", value_dtype, "--factor-choice", "both",
        )  # fmt: skip
        assert json.loads(run("inspect", bc, "--json").stdout)["info"]["value_dtype"] == value_dtype
        text = run("inspect", bc).stdout
        assert f"{value_dtype}: block-quantized codes, a float32 scale per 64 values" in text, text
    plain = tmp_path / "agg-plain.safetensors"
    run("aggregate", "--global", g0, "--out", plain, *uploads)
    assert "aligned" not in run("inspect", plain).stdout


def test_demo_assets_refuses_a_model_for_the_real_suite(tmp_path: Path):
    """Issue 32, row 15: `demo-assets --suite real --model toy` ignored --model (the real suite is
    data only, with no base model). Refused in one line, nothing written."""
    out = tmp_path / "real"
    for model in ("toy", "smollm2"):
        refused(
            ["demo-assets", "--suite", "real", "--model", model, "--out", out],
            2,
            f"--model {model} makes the demo's base model, and --suite real writes none",
            watch=(out,),
            root=tmp_path,
        )
