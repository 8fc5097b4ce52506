"""Catching up after missed rounds: a chain of broadcasts, or the coordinator's state snapshot."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.trust.signing import SigningKey, Trust, generate_keypair

from ..conftest import make_local

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def coordinator_rounds(
    tmp: Path, g0: Path, rounds: int, coordinator_key: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Run `rounds` rounds with two clients: (global states G0..Gk, broadcasts BC1..BCk).

    With coordinator_key, the aggregates, broadcasts and states are signed by the coordinator.
    """
    sign = [] if coordinator_key is None else ["--sign-key", coordinator_key]
    states, broadcasts = [g0], []
    for t in range(1, rounds + 1):
        g = states[-1]
        uploads = []
        for client, seed in (("alice", 10 * t + 1), ("bob", 10 * t + 2)):
            local = make_local(g, tmp / f"local-{client}-{t}.safetensors", seed=seed)
            up = tmp / f"up-{client}-{t}.safetensors"
            result = run("sparsify", "--global", g, "--local", local, "--client", client, "--out", up)
            assert result.exit_code == 0, result.output
            uploads.append(up)
        agg = tmp / f"agg-{t}.safetensors"
        assert run("aggregate", "--global", g, "--out", agg, *uploads, *sign).exit_code == 0
        bc, nxt = tmp / f"bc-{t}.safetensors", tmp / f"g-{t}.safetensors"
        result = run("broadcast", "--global", g, "--aggregate", agg, "--out", bc, "--out-global", nxt, *sign)
        assert result.exit_code == 0, result.output
        states.append(nxt)
        broadcasts.append(bc)
    return states, broadcasts


def test_chain_of_missed_broadcasts_ends_bit_identical(tmp_path: Path, global_path: Path) -> None:
    states, bcs = coordinator_rounds(tmp_path, global_path, 3)
    out = tmp_path / "carol-g3.safetensors"
    args = ["apply", "--global", global_path, "--out", out]
    for bc in bcs:
        args += ["--broadcast", bc]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    assert '"broadcasts_applied": 3' in result.output
    # Unsigned files are canonical, so the client's file is the coordinator's, byte for byte.
    assert out.read_bytes() == states[3].read_bytes()
    # Taking the snapshot instead: the coordinator's state is a valid starting point for round 4.
    local = make_local(states[3], tmp_path / "carol-local.safetensors", seed=99)
    result = run(
        "sparsify",
        "--global",
        states[3],
        "--local",
        local,
        "--client",
        "carol",
        "--out",
        tmp_path / "u.safetensors",
    )
    assert result.exit_code == 0, result.output


def test_gap_and_wrong_order_name_the_missing_round(tmp_path: Path, global_path: Path) -> None:
    states, bcs = coordinator_rounds(tmp_path, global_path, 3)
    out = tmp_path / "out.safetensors"
    gap = run("apply", "--global", global_path, "--broadcast", bcs[0], "--broadcast", bcs[2], "--out", out)
    assert gap.exit_code == 4
    assert "round-3 broadcast" in gap.output and "the round-2 broadcast is missing" in gap.output
    first_missing = run("apply", "--global", global_path, "--broadcast", bcs[1], "--out", out)
    assert first_missing.exit_code == 4 and "the round-1 broadcast is missing" in first_missing.output
    order = run("apply", "--global", global_path, "--broadcast", bcs[1], "--broadcast", bcs[0], "--out", out)
    assert order.exit_code == 4 and "round-1 broadcast is missing" in order.output
    repeat = run("apply", "--global", states[1], "--broadcast", bcs[0], "--out", out)
    assert repeat.exit_code == 4 and "already contained in" in repeat.output
    assert not out.exists()


def test_aggregate_refuses_an_upload_made_against_an_older_state(tmp_path: Path, global_path: Path) -> None:
    states, _ = coordinator_rounds(tmp_path, global_path, 1)
    old_upload = tmp_path / "up-alice-1.safetensors"  # made from round 0
    result = run("aggregate", "--global", states[1], "--out", tmp_path / "a.safetensors", old_upload)
    assert result.exit_code == 4
    assert "belongs to round 1" in result.output and "expecting round 2" in result.output


def test_signed_chain_with_trust_matches_the_coordinators_state(tmp_path: Path, global_path: Path) -> None:
    keys, trust = tmp_path / "keys", tmp_path / "trust"
    keys.mkdir()
    trust.mkdir()
    generate_keypair(keys / "coordinator")
    shutil.copy(keys / "coordinator.pub", trust)
    signed_g0 = tmp_path / "g0-signed.safetensors"
    state = read_artifact(global_path)
    sign = SigningKey.load(keys / "coordinator.key").sign_parts
    write_artifact(signed_g0, state.header, dict(state.iter_tensors()), sign=sign)
    states, bcs = coordinator_rounds(tmp_path, signed_g0, 2, keys / "coordinator.key")
    out = tmp_path / "late-client-g2.safetensors"
    chain = ["--broadcast", bcs[0], "--broadcast", bcs[1]]
    result = run("apply", "--global", signed_g0, *chain, "--out", out, "--trust", trust)
    assert result.exit_code == 0, result.output
    assert read_artifact(out).header == read_artifact(states[2]).header  # same header and content hash
    assert Trust.load(trust).verify_file(states[2]) == "coordinator"  # the snapshot route
    # An unsigned broadcast in the chain is refused.
    plain = tmp_path / "bc-plain.safetensors"
    bc = read_artifact(bcs[1])
    write_artifact(plain, bc.header, dict(bc.iter_tensors()))
    chain = ["--broadcast", bcs[0], "--broadcast", plain]
    refused = run("apply", "--global", signed_g0, *chain, "--out", tmp_path / "x.st", "--trust", trust)
    assert refused.exit_code == 7 and "is not signed" in refused.output
