"""Signed artifacts: keys, signatures, trust checks, and a signed 3-client round through the CLI."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.errors import TrustError
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.safetensors_io import encode_safetensors, open_safetensors
from fedsrd_cli.trust.signing import SIGNATURE_FIELDS, SigningKey, Trust, generate_keypair, read_signature

from ..conftest import make_global, make_local

runner = CliRunner()
CLIENTS = ("alice", "bob", "carol")


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def sign_file(path: Path, key: Path) -> None:
    """Re-write an artifact signed by `key` (as a party would have written it)."""
    artifact = read_artifact(path)
    tensors = dict(artifact.iter_tensors())
    write_artifact(path, artifact.header, tensors, force=True, sign=SigningKey.load(key).sign_parts)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """Keys for the coordinator, three clients and an outsider; trust dirs; a signed round-0 state."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for party in ("coordinator", *CLIENTS, "mallory"):
        generate_keypair(keys / party)
    coord_trust = tmp_path / "trust-coordinator"
    client_trust = tmp_path / "trust-client"
    coord_trust.mkdir()
    client_trust.mkdir()
    for party in ("coordinator", *CLIENTS):
        shutil.copy(keys / f"{party}.pub", coord_trust)
    shutil.copy(keys / "coordinator.pub", client_trust)
    g0 = make_global(tmp_path / "g0.safetensors")
    sign_file(g0, keys / "coordinator.key")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return {"tmp": tmp_path, "keys": keys, "ct": coord_trust, "kt": client_trust, "g0": g0, "inbox": inbox}


def test_keygen_writes_private_key_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    result = run("keygen", "--out", tmp_path / "alice", "--json")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "alice.key").stat().st_mode) == 0o600
    assert (tmp_path / "alice.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = run("keygen", "--out", tmp_path / "alice")
    assert again.exit_code == 5 and "already exists" in again.output
    bad = run("keygen", "--out", tmp_path / "bad name")
    assert bad.exit_code == 2


def test_signing_keeps_content_hash_and_only_adds_metadata(world: dict[str, Path], tmp_path: Path) -> None:
    state = read_artifact(make_global(tmp_path / "plain.safetensors"))
    signed = read_artifact(world["g0"])
    assert signed.header == state.header  # same header, content hash included
    meta = open_safetensors(world["g0"]).metadata()
    assert set(SIGNATURE_FIELDS) <= set(meta)
    trust = Trust.load(world["ct"])
    assert trust.verify_file(world["g0"]) == "coordinator"
    # The unsigned form of the signed file is byte-identical to the unsigned file.
    unsigned = b"".join(
        bytes(p) for p in encode_safetensors(dict(state.iter_tensors()), state.header.to_metadata())
    )
    assert (tmp_path / "plain.safetensors").read_bytes() == unsigned
    assert read_signature(tmp_path / "plain.safetensors") is None


def test_each_trust_failure_has_its_own_message(world: dict[str, Path], tmp_path: Path) -> None:
    trust = Trust.load(world["ct"])
    keys = world["keys"]
    unsigned = make_global(tmp_path / "unsigned.safetensors")
    with pytest.raises(TrustError, match="is not signed"):
        trust.verify_file(unsigned)
    outsider = make_global(tmp_path / "outsider.safetensors")
    sign_file(outsider, keys / "mallory.key")
    with pytest.raises(TrustError, match="unknown party 'mallory'"):
        trust.verify_file(outsider)
    # Mallory names herself "alice": a key that is not alice's trusted key.
    forged_key = keys / "forge" / "alice.key"
    forged_key.parent.mkdir()
    shutil.copy(keys / "mallory.key", forged_key)
    forged = make_global(tmp_path / "forged.safetensors")
    sign_file(forged, forged_key)
    with pytest.raises(TrustError, match="claims to be signed by 'alice' but with another key"):
        trust.verify_file(forged)
    # One byte flipped in the tensor data, then in the metadata (round 0 -> 8).
    for offset_from_end, label in ((3, "data"), (None, "metadata")):
        tampered = tmp_path / f"tampered-{label}.safetensors"
        raw = bytearray(world["g0"].read_bytes())
        if offset_from_end is not None:
            raw[-offset_from_end] ^= 0x01
        else:
            at = raw.index(b'"fedsrd.round":"0"') + len(b'"fedsrd.round":"')
            raw[at] = ord("8")
        tampered.write_bytes(bytes(raw))
        with pytest.raises(TrustError, match="does not verify: the file was modified after signing"):
            trust.verify_file(tampered)
    # A header re-encoded with spaces (not canonical) cannot be checked.
    raw = world["g0"].read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length].replace(b'":"', b'": "', 1)
    header += b" " * (-len(header) % 8)
    noncanonical = tmp_path / "noncanonical.safetensors"
    noncanonical.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + length :])
    with pytest.raises(TrustError, match="not in fedsrd's canonical form"):
        trust.verify_file(noncanonical)


def _sparsify(
    world: dict[str, Path], client: str, out: Path, key: str | None, seed: int, g: Path | None = None
):
    g = g or world["g0"]
    local = make_local(g, world["tmp"] / f"local-{client}-{seed}-{g.stem}.safetensors", seed=seed)
    args = ["sparsify", "--global", g, "--local", local, "--client", client, "--out", out]
    if key:
        args += ["--sign-key", world["keys"] / f"{key}.key"]
    return run(*args)


def test_signed_round_refuses_each_bad_upload_and_completes_with_the_honest_ones(
    world: dict[str, Path],
) -> None:
    tmp, keys, inbox = world["tmp"], world["keys"], world["inbox"]
    for seed, client in enumerate(CLIENTS, start=1):
        result = _sparsify(world, client, inbox / f"{client}.safetensors", client, seed)
        assert result.exit_code == 0, result.output
    bad = tmp / "bad"
    bad.mkdir()
    # Forged: signed by a key nobody trusts.
    forged_key_dir = tmp / "forged-keys"
    forged_key_dir.mkdir()
    generate_keypair(forged_key_dir / "dave")
    dave = _sparsify(world, "dave", bad / "forged.safetensors", None, 11)
    assert dave.exit_code == 0
    sign_file(bad / "forged.safetensors", forged_key_dir / "dave.key")
    # Re-signed by another client: bob signs an upload that names alice.
    assert _sparsify(world, "alice", bad / "resigned.safetensors", None, 12).exit_code == 0
    sign_file(bad / "resigned.safetensors", keys / "bob.key")
    # Tampered: one byte of an honest signed upload flipped.
    raw = bytearray((inbox / "carol.safetensors").read_bytes())
    raw[-5] ^= 0x10
    (bad / "tampered.safetensors").write_bytes(bytes(raw))
    # Unsigned.
    assert _sparsify(world, "bob", bad / "unsigned.safetensors", None, 13).exit_code == 0
    # Stale: signed by its client, but made against another (older) state of the run.
    other = make_global(tmp / "g-other.safetensors", seed=5)
    sign_file(other, keys / "coordinator.key")
    assert _sparsify(world, "alice", bad / "stale.safetensors", "alice", 14, g=other).exit_code == 0

    honest = sorted(inbox.glob("*.safetensors"))
    expected = {
        "forged": "unknown party 'dave'",
        "resigned": "upload of client 'alice' is signed by 'bob'",
        "tampered": "does not verify: the file was modified after signing",
        "unsigned": "is not signed",
        "stale": "belongs to round 1 (made from state",
    }
    messages = set()
    for name, message in expected.items():
        out = tmp / f"agg-{name}.safetensors"
        result = run(
            "aggregate",
            "--global",
            world["g0"],
            "--out",
            out,
            *honest,
            bad / f"{name}.safetensors",
            "--trust",
            world["ct"],
        )
        assert result.exit_code in (4, 7), (name, result.output)
        assert message in result.output, (name, result.output)
        assert not out.exists()
        messages.add(result.output.strip())
    assert len(messages) == len(expected)

    status = run(
        "status", inbox, "--global", world["g0"], "--clients", ",".join(CLIENTS), "--trust", world["ct"]
    )
    assert status.exit_code == 0, status.output
    agg = tmp / "agg1.safetensors"
    ok = run(
        "aggregate",
        "--global",
        world["g0"],
        "--out",
        agg,
        *honest,
        "--trust",
        world["ct"],
        "--sign-key",
        keys / "coordinator.key",
    )
    assert ok.exit_code == 0, ok.output
    bc, g1 = tmp / "bc1.safetensors", tmp / "g1.safetensors"
    result = run(
        "broadcast",
        "--global",
        world["g0"],
        "--aggregate",
        agg,
        "--out",
        bc,
        "--out-global",
        g1,
        "--trust",
        world["ct"],
        "--sign-key",
        keys / "coordinator.key",
    )
    assert result.exit_code == 0, result.output
    assert Trust.load(world["kt"]).verify_file(bc) == "coordinator"
    assert Trust.load(world["kt"]).verify_file(g1) == "coordinator"
    applied = tmp / "alice-g1.safetensors"
    result = run(
        "apply", "--global", world["g0"], "--broadcast", bc, "--out", applied, "--trust", world["kt"]
    )
    assert result.exit_code == 0, result.output
    assert read_artifact(applied).header.content_hash == read_artifact(g1).header.content_hash
    # A client refuses a broadcast not signed by the coordinator (here: re-signed by bob).
    shutil.copy(bc, tmp / "bc-bob.safetensors")
    sign_file(tmp / "bc-bob.safetensors", keys / "bob.key")
    shutil.copy(keys / "bob.pub", world["kt"])
    refused = run(
        "apply",
        "--global",
        world["g0"],
        "--broadcast",
        tmp / "bc-bob.safetensors",
        "--out",
        tmp / "x.safetensors",
        "--trust",
        world["kt"],
    )
    assert refused.exit_code == 7 and "broadcast signed by 'bob'" in refused.output


def test_sparsify_refuses_unsigned_global_and_a_key_of_another_party(world: dict[str, Path]) -> None:
    tmp = world["tmp"]
    plain = make_global(tmp / "plain.safetensors")
    local = make_local(plain, tmp / "local.safetensors", seed=1)
    result = run(
        "sparsify",
        "--global",
        plain,
        "--local",
        local,
        "--client",
        "alice",
        "--out",
        tmp / "u.safetensors",
        "--trust",
        world["kt"],
    )
    assert result.exit_code == 7 and "is not signed" in result.output
    result = run(
        "sparsify",
        "--global",
        world["g0"],
        "--local",
        local,
        "--client",
        "alice",
        "--out",
        tmp / "u.safetensors",
        "--sign-key",
        world["keys"] / "bob.key",
    )
    assert result.exit_code == 2 and "signs as 'bob'" in result.output


def test_cli_import_does_not_load_cryptography() -> None:
    code = "import fedsrd_cli.cli, sys; assert not any(m.startswith('cryptography') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_signature_of_a_state_the_client_computed_itself_is_accepted_for_its_own_name(
    world: dict[str, Path],
) -> None:
    """A client signs the state it computed with apply; sparsify accepts it for that client only."""
    tmp, keys = world["tmp"], world["keys"]
    shutil.copy(keys / "alice.pub", world["kt"])
    g = tmp / "g-alice.safetensors"
    sign_file(shutil.copy(world["g0"], g), keys / "alice.key")
    local = make_local(world["g0"], tmp / "la.safetensors", seed=3)
    args = [
        "sparsify",
        "--global",
        g,
        "--local",
        local,
        "--out",
        tmp / "u.safetensors",
        "--trust",
        world["kt"],
    ]
    assert run(*args, "--client", "alice").exit_code == 0
    refused = run(*args[:-4], "--out", tmp / "u2.safetensors", "--trust", world["kt"], "--client", "bob")
    assert refused.exit_code == 7 and "state signed by 'alice'" in refused.output


def test_tensor_bytes_are_untouched_by_signing(world: dict[str, Path], tmp_path: Path) -> None:
    plain = make_global(tmp_path / "plain.safetensors")
    a, b = read_artifact(plain), read_artifact(world["g0"])
    for name in a.names:
        assert torch.equal(a.tensor(name), b.tensor(name))
