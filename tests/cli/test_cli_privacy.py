"""Differential privacy through the command line, on a real (tiny) model: a DP round, the ledger
`inspect` shows and recomputes, and every refusal (one line, its exit code, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.safetensors_io import encode_safetensors, open_safetensors
from fedsrd_cli.privacy.ledger import RECORD, Ledger, read_privacy
from fedsrd_cli.trust.signing import SigningKey, generate_keypair

from ..conftest import TINY_RECORDS, write_jsonl

runner = CliRunner()
PRIVACY_EXIT = 8


def run(*args: object, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A round-0 state of the tiny model, two sites' data (120 records each) and keys."""
    tmp = tmp_path_factory.mktemp("dp")
    run(
        "init",
        "--base",
        tiny_model,
        "--rank",
        4,
        "--targets",
        "q_proj,v_proj",
        "--out",
        tmp / "g0.safetensors",
    )
    for site, records in (("site-a", TINY_RECORDS * 20), ("site-b", TINY_RECORDS[::-1] * 20)):
        write_jsonl(tmp / f"{site}.jsonl", records)
    keys = tmp / "keys"
    keys.mkdir()
    trust = tmp / "trust"
    trust.mkdir()
    for party in ("coordinator", "site-a", "site-b"):
        generate_keypair(keys / party)
        shutil.copy(keys / f"{party}.pub", trust)
    return {"tmp": tmp, "model": tiny_model, "keys": keys, "trust": trust}


def train(world, site: str, state: Path, out: Path, *flags: object, code: int = 0):
    return run(
        "train-local",
        "--base",
        world["model"],
        "--global",
        state,
        "--data",
        world["tmp"] / f"{site}.jsonl",
        "--client",
        site,
        "--steps",
        3,
        "--batch-size",
        4,
        "--max-length",
        64,
        "--out",
        out,
        *flags,
        code=code,
    )


def dp_round(world, state: Path, tag: str, *flags: object) -> dict[str, Path]:
    """Both sites train with DP-SGD (epsilon 3 over 2 rounds) and sparsify; aggregate --require-dp
    3; broadcast. Returns the files."""
    tmp = world["tmp"]
    uploads = []
    for site in ("site-a", "site-b"):
        local = tmp / f"local-{tag}-{site}.safetensors"
        train(world, site, state, local, "--dp-epsilon", 3, "--dp-rounds", 2, *flags)
        upload = tmp / f"up-{tag}-{site}.safetensors"
        run("sparsify", "--global", state, "--local", local, "--client", site, "--out", upload)
        uploads.append(upload)
    agg = tmp / f"agg-{tag}.safetensors"
    run("aggregate", "--global", state, "--require-dp", 3, "--out", agg, *uploads)
    bc, nxt = tmp / f"bc-{tag}.safetensors", tmp / f"g-{tag}.safetensors"
    run("broadcast", "--global", state, "--aggregate", agg, "--out", bc, "--out-global", nxt)
    return {"uploads": uploads, "aggregate": agg, "broadcast": bc, "next": nxt}


@pytest.fixture(scope="module")
def two_rounds(world):
    first = dp_round(world, world["tmp"] / "g0.safetensors", "r1")
    second = dp_round(world, first["next"], "r2")
    return first, second


def test_a_dp_round_records_each_site_s_ledger_everywhere(world, two_rounds):
    first, second = two_rounds
    report = json.loads(run("inspect", first["uploads"][0], "--json").stdout)["privacy"]
    ledger = report["record_level"]
    assert ledger["party"] == "site-a" and ledger["unit"] == "record" and ledger["accountant"] == "rdp"
    assert [r["round"] for r in ledger["rounds"]] == [1]
    step = ledger["rounds"][0]
    assert step["mechanism"] == "dp-sgd" and step["population"] == 120 and step["steps"] == 3
    assert step["sample_rate"] == pytest.approx(4 / 120) and step["clip"] == 1.0
    assert ledger["delta"] == pytest.approx(1 / 120)
    assert ledger["recomputed_epsilon"] == ledger["epsilon"] and ledger["agrees"] and report["agree"]
    # The global state of round 2 carries both sites' ledgers, which the client's apply reproduces.
    state = json.loads(run("inspect", second["next"], "--json").stdout)["privacy"]
    assert sorted(state["sites"]) == ["site-a", "site-b"]
    a = state["sites"]["site-a"]
    assert [r["round"] for r in a["rounds"]] == [1, 2] and a["agrees"]
    assert 2.9 <= a["epsilon"] <= 3.0  # the plan of 2 rounds ends at its epsilon
    applied = world["tmp"] / "client-g2.safetensors"
    run("apply", "--global", first["next"], "--broadcast", second["broadcast"], "--out", applied)
    assert applied.read_bytes() == second["next"].read_bytes()
    human = run("inspect", second["next"]).stdout
    assert "site-a: epsilon" in human and "agrees" in human


def test_train_local_refuses_to_overspend_before_it_trains(world, two_rounds):
    _first, second = two_rounds
    out = world["tmp"] / "local-r3.safetensors"
    # The plan of 2 rounds is spent; and a cap below what one more round costs.
    spent = train(
        world, "site-a", second["next"], out, "--dp-epsilon", 3, "--dp-rounds", 2, code=PRIVACY_EXIT
    )
    assert "plan is spent" in error_line(spent)
    capped = train(
        world,
        "site-a",
        second["next"],
        out,
        "--dp-noise-multiplier",
        0.5,
        "--dp-max-epsilon",
        3.2,
        code=PRIVACY_EXIT,
    )
    assert "past its budget 3.2" in error_line(capped) and "nothing was trained" in error_line(capped)
    assert not out.exists() and not Path(str(out) + ".log.jsonl").exists()


@pytest.mark.parametrize("flags", [("--dp-noise-multiplier", 10), ("--dp-noise-multiplier", 1e6)])
def test_huge_noise_records_epsilon_zero_not_a_negative_one(world, flags):
    """Issue 32, row 2: the RDP conversion's bound was -0.0065 at noise 10 and the state was refused
    after training (exit 3); the guarantee is epsilon 0, and the state is written."""
    out = world["tmp"] / f"local-huge-noise-{flags[1]:g}.safetensors"
    train(world, "site-a", world["tmp"] / "g0.safetensors", out, *flags)
    ledger = read_privacy(read_artifact(out).header).record_level
    assert ledger is not None and ledger.epsilon == 0.0 and ledger.agrees()


def rewrite_ledger(source: Path, target: Path, change) -> Path:
    """Write `source` again with its record-level ledger changed (unsigned, consistent otherwise)."""
    upload = read_artifact(source)
    ledger = read_privacy(upload.header).record_level
    privacy = {"record_level": change(ledger).to_json()}
    write_artifact(target, replace(upload.header, privacy=privacy), dict(upload.iter_tensors()), force=True)
    return target


def test_aggregate_require_dp_refuses_and_writes_nothing(world, two_rounds):
    first, second = two_rounds
    tmp = world["tmp"]
    out = tmp / "agg-refused.safetensors"
    # A reset budget: site-a shows round 2 alone, though the state recorded round 1 for it.
    reset = rewrite_ledger(
        second["uploads"][0],
        tmp / "up-reset.safetensors",
        lambda ledger: Ledger.start(RECORD, "site-a", ledger.delta).extended(ledger.releases[-1]),
    )
    result = run(
        "aggregate", "--global", first["next"], "--require-dp", 3, "--out", out, reset, code=PRIVACY_EXIT
    )
    assert "reset" in error_line(result) and "site-a" in error_line(result)
    # Over the coordinator's bound.
    result = run(
        "aggregate",
        "--global",
        first["next"],
        "--require-dp",
        1,
        "--out",
        out,
        second["uploads"][1],
        code=PRIVACY_EXIT,
    )
    assert "over --require-dp 1" in error_line(result)
    # No ledger at all.
    plain = tmp / "local-plain.safetensors"
    train(world, "site-b", first["next"], plain)
    plain_upload = tmp / "up-plain.safetensors"
    run("sparsify", "--global", first["next"], "--local", plain, "--client", "site-b", "--out", plain_upload)
    result = run(
        "aggregate",
        "--global",
        first["next"],
        "--require-dp",
        3,
        "--out",
        out,
        plain_upload,
        code=PRIVACY_EXIT,
    )
    assert "no privacy ledger" in error_line(result)
    # An epsilon edited down, its history left as it was.
    forged = rewrite_ledger(
        second["uploads"][0],
        tmp / "up-forged.safetensors",
        lambda ledger: Ledger(ledger.unit, ledger.party, ledger.delta, ledger.releases, ledger.epsilon / 2),
    )
    result = run("aggregate", "--global", first["next"], "--out", out, forged, code=PRIVACY_EXIT)
    assert "but its history gives" in error_line(result)
    assert not out.exists()


def test_tampering_with_a_signed_ledger_breaks_the_signature(world, two_rounds):
    first, _second = two_rounds
    tmp = world["tmp"]
    signed = tmp / "up-signed.safetensors"
    upload = read_artifact(first["uploads"][0])
    write_artifact(
        signed,
        upload.header,
        dict(upload.iter_tensors()),
        sign=SigningKey.load(world["keys"] / "site-a.key").sign_parts,
    )
    g0 = tmp / "g0-signed.safetensors"  # the same state, signed by the coordinator
    state = read_artifact(tmp / "g0.safetensors")
    coordinator = SigningKey.load(world["keys"] / "coordinator.key")
    write_artifact(g0, state.header, dict(state.iter_tensors()), force=True, sign=coordinator.sign_parts)
    agg = tmp / "agg-signed.safetensors"
    run("aggregate", "--global", g0, "--trust", world["trust"], "--require-dp", 3, "--out", agg, signed)
    # Halve the recorded noise multiplier and recompute the epsilon, so the ledger is consistent.
    meta = dict(open_safetensors(signed).metadata())
    ledger = read_privacy(upload.header).record_level
    step = ledger.releases[0]
    lighter = Ledger.start(RECORD, "site-a", ledger.delta).extended(
        replace(step, noise_multiplier=step.noise_multiplier * 2)
    )
    meta["fedsrd.privacy"] = json.dumps({"record_level": lighter.to_json()}, sort_keys=True)
    tampered = tmp / "up-tampered.safetensors"
    tampered.write_bytes(b"".join(bytes(p) for p in encode_safetensors(dict(upload.iter_tensors()), meta)))
    out = tmp / "agg-tampered.safetensors"
    result = run("aggregate", "--global", g0, "--trust", world["trust"], "--out", out, tampered, code=7)
    assert "signature" in error_line(result)
    assert not out.exists()


def test_organisation_level_dp_through_the_console_script(world, two_rounds):
    """aggregate --method fedsrd-e --dp-clip ... then broadcast, as a user runs them; apply agrees."""
    first, _second = two_rounds
    tmp = world["tmp"]
    g0 = tmp / "g0.safetensors"
    agg, bc, nxt = (tmp / f"{name}-org.safetensors" for name in ("agg", "bc", "g1"))
    fedsrd = [sys.executable, "-m", "fedsrd_cli.cli"]
    flags = [
        "--dp-clip",
        "0.05",
        "--dp-noise-multiplier",
        "1.5",
        "--dp-delta",
        "1e-3",
        "--dp-sampling-rate",
        "1",
    ]
    subprocess.run(
        [
            *fedsrd,
            "aggregate",
            "--global",
            g0,
            "--method",
            "fedsrd-e",
            *flags,
            "--out",
            agg,
            *first["uploads"],
        ],
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [
            *fedsrd,
            "broadcast",
            "--global",
            g0,
            "--aggregate",
            agg,
            "--out",
            bc,
            "--out-global",
            nxt,
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    printed = json.loads(done.stdout)
    assert "std" in printed["organisation_noise"] and "after 1 rounds" in printed["organisation_epsilon"]
    applied = tmp / "client-g1-org.safetensors"
    run("apply", "--global", g0, "--broadcast", bc, "--out", applied)
    assert applied.read_bytes() == nxt.read_bytes()
    report = json.loads(run("inspect", bc, "--json").stdout)
    org = report["privacy"]["organisation_level"]
    assert (
        org["agrees"] and org["rounds"][0]["noise_multiplier"] == 1.5 and org["rounds"][0]["population"] == 2
    )
    assert report["aggregate_hash"] == "" and "update_error" not in report["info"]
    # Another method, or the download's fit choice, is refused before anything is written.
    out = tmp / "agg-fedsrd.safetensors"
    result = run(
        "aggregate", "--global", g0, "--method", "fedsrd", *flags, "--out", out, *first["uploads"], code=2
    )
    assert "fedsrd-e only" in error_line(result) and not out.exists()
    result = run(
        "broadcast",
        "--global",
        g0,
        "--aggregate",
        agg,
        "--out",
        tmp / "x.safetensors",
        "--out-global",
        tmp / "y.safetensors",
        "--factor-choice",
        "fit",
        code=2,
    )
    assert "--factor-choice b" in error_line(result)
    assert not (tmp / "x.safetensors").exists() and not (tmp / "y.safetensors").exists()
