"""A whole signed round through the CLI writes, byte for byte, the files it wrote before.

Three sites sign their uploads (sparsify), the coordinator checks them against its trust
folder, signs the aggregate, the broadcast and the next state, and every site applies the
broadcast to a signed state of its own. Keys are made from fixed seeds (Ed25519 signatures
are deterministic), and the local states come from the seeded fixture, so every file of the
round has one possible content.

The digest was computed on 2026-12-07 from commit a5589ee, before the package was regrouped
by role (issue 35); the regroup moved code and changed no file it writes.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.trust.signing import SigningKey

from ..conftest import make_global, make_local

SIGNED_ROUND = "12dd7fa34e19746d230bea4f6b23df555b2cb83ae48b7424571cba42878a8f69"
SITES = ("alice", "bob", "carol")
runner = CliRunner()


def _run(*args: object) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _write_key(folder: Path, party: str) -> None:
    """NAME.key and NAME.pub from a seed derived from the party's name."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(party.encode()).digest())
    (folder / f"{party}.key").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (folder / f"{party}.pub").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_signed_round(tmp: Path) -> list[Path]:
    keys, site_trust, coordinator_trust = tmp / "keys", tmp / "trust-site", tmp / "trust-coordinator"
    for folder in (keys, site_trust, coordinator_trust):
        folder.mkdir()
    for party in ("coordinator", *SITES):
        _write_key(keys, party)
        shutil.copy(keys / f"{party}.pub", coordinator_trust)
    shutil.copy(keys / "coordinator.pub", site_trust)

    g0 = make_global(tmp / "g0.safetensors")
    state = read_artifact(g0)
    write_artifact(
        g0,
        state.header,
        dict(state.iter_tensors()),
        force=True,
        sign=SigningKey.load(keys / "coordinator.key").sign_parts,
    )
    written = [g0]
    for seed, site in enumerate(SITES, start=1):
        local = make_local(g0, tmp / f"local-{site}.safetensors", seed=seed)
        upload = tmp / f"upload-{site}.safetensors"
        _run(
            "sparsify",
            "--global",
            g0,
            "--local",
            local,
            "--client",
            site,
            "--out",
            upload,
            "--sign-key",
            keys / f"{site}.key",
            "--trust",
            site_trust,
        )
        written += [local, upload]
    uploads = [tmp / f"upload-{site}.safetensors" for site in SITES]
    aggregate = tmp / "aggregate.safetensors"
    broadcast, g1 = tmp / "broadcast.safetensors", tmp / "g1.safetensors"
    _run(
        "aggregate",
        "--global",
        g0,
        "--out",
        aggregate,
        *uploads,
        "--trust",
        coordinator_trust,
        "--sign-key",
        keys / "coordinator.key",
    )
    _run(
        "broadcast",
        "--global",
        g0,
        "--aggregate",
        aggregate,
        "--out",
        broadcast,
        "--out-global",
        g1,
        "--trust",
        coordinator_trust,
        "--sign-key",
        keys / "coordinator.key",
    )
    written += [aggregate, broadcast, g1]
    for site in SITES:
        applied = tmp / f"g1-{site}.safetensors"
        _run(
            "apply",
            "--global",
            g0,
            "--broadcast",
            broadcast,
            "--out",
            applied,
            "--trust",
            site_trust,
            "--sign-key",
            keys / f"{site}.key",
        )
        written.append(applied)
    return written


def test_a_signed_round_writes_the_same_bytes(tmp_path: Path) -> None:
    digest = hashlib.sha256()
    for path in write_signed_round(tmp_path):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    assert digest.hexdigest() == SIGNED_ROUND
