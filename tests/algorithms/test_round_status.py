"""`fedsrd status`: the inbox report and its cron exit codes (0 ready, 10 waiting, 11 invalid)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from fedsrd_cli.algorithms.round_status import EXIT_INVALID, EXIT_READY, EXIT_WAITING
from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.trust.signing import SigningKey, generate_keypair

from ..conftest import make_global, make_local

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def upload(tmp: Path, g: Path, client: str, seed: int, out: Path, key: Path | None = None) -> Path:
    local = make_local(g, tmp / f"local-{client}-{seed}.safetensors", seed=seed)
    args = ["sparsify", "--global", g, "--local", local, "--client", client, "--out", out]
    if key is not None:
        args += ["--sign-key", key]
    assert run(*args).exit_code == 0
    return out


def test_waiting_ready_invalid(tmp_path: Path, global_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    base = ["status", inbox, "--global", global_path]
    empty = run(*base, "--expect", 2, "--json")
    assert empty.exit_code == EXIT_WAITING and json.loads(empty.output)["waiting_for"] == 2
    upload(tmp_path, global_path, "alice", 1, inbox / "alice.safetensors")
    waiting = run(*base, "--clients", "alice,bob", "--json")
    assert waiting.exit_code == EXIT_WAITING, waiting.output
    report = json.loads(waiting.output)
    assert report["missing_clients"] == ["bob"] and report["present_clients"] == ["alice"]
    upload(tmp_path, global_path, "bob", 2, inbox / "bob.safetensors")
    ready = run(*base, "--clients", "alice,bob", "--json")
    assert ready.exit_code == EXIT_READY and json.loads(ready.output)["ready"] is True
    assert run(*base, "--expect", 2).exit_code == EXIT_READY
    # A global state lying in the inbox is listed and ignored.
    shutil.copy(global_path, inbox / "global.safetensors")
    assert run(*base, "--expect", 2).exit_code == EXIT_READY
    # A truncated copy, a stale upload and a duplicate client are each invalid.
    (inbox / "carol.safetensors").write_bytes((inbox / "bob.safetensors").read_bytes()[:100])
    bad = run(*base, "--expect", 2, "--json")
    assert bad.exit_code == EXIT_INVALID
    files = {Path(f["path"]).name: f for f in json.loads(bad.output)["files"]}
    assert files["carol.safetensors"]["status"] == "invalid" and files["carol.safetensors"]["problem"]
    assert files["global.safetensors"]["status"] == "ignored"
    (inbox / "carol.safetensors").unlink()
    other = make_global(tmp_path / "other.safetensors", seed=3)
    upload(tmp_path, other, "dave", 4, inbox / "dave.safetensors")
    stale = run(*base, "--json")
    assert stale.exit_code == EXIT_INVALID
    dave = next(f for f in json.loads(stale.output)["files"] if f["client_id"] == "dave")
    assert dave["status"] == "stale" and "belongs to round 1" in dave["problem"]
    (inbox / "dave.safetensors").unlink()
    upload(tmp_path, global_path, "bob", 5, inbox / "bob-again.safetensors")
    dup = run(*base, "--clients", "alice,bob")
    assert dup.exit_code == EXIT_INVALID and "has 2 uploads" in dup.output
    (inbox / "bob-again.safetensors").unlink()
    upload(tmp_path, global_path, "erin", 6, inbox / "erin.safetensors")
    unexpected = run(*base, "--clients", "alice,bob", "--json")
    assert unexpected.exit_code == EXIT_INVALID and "not among the expected" in unexpected.output


def test_signatures_reported_and_checked(tmp_path: Path, global_path: Path) -> None:
    keys, trust, inbox = tmp_path / "keys", tmp_path / "trust", tmp_path / "inbox"
    for d in (keys, trust, inbox):
        d.mkdir()
    for party in ("alice", "bob"):
        generate_keypair(keys / party)
    shutil.copy(keys / "alice.pub", trust)
    upload(tmp_path, global_path, "alice", 1, inbox / "alice.safetensors", keys / "alice.key")
    upload(tmp_path, global_path, "bob", 2, inbox / "bob.safetensors", keys / "bob.key")
    no_trust = run("status", inbox, "--global", global_path, "--expect", 2, "--json")
    assert no_trust.exit_code == EXIT_READY
    files = {f["client_id"]: f for f in json.loads(no_trust.output)["files"]}
    assert files["bob"]["signer"] == "bob" and files["bob"]["signature_verified"] is False
    # With --trust the global state must itself be signed by the coordinator.
    generate_keypair(keys / "coordinator")
    shutil.copy(keys / "coordinator.pub", trust)
    state = read_artifact(global_path)
    signed_global = tmp_path / "g0-signed.safetensors"
    sign = SigningKey.load(keys / "coordinator.key").sign_parts
    write_artifact(signed_global, state.header, dict(state.iter_tensors()), sign=sign)
    with_trust = run("status", inbox, "--global", signed_global, "--expect", 2, "--trust", trust, "--json")
    assert with_trust.exit_code == EXIT_INVALID
    files = {Path(f["path"]).name: f for f in json.loads(with_trust.output)["files"]}
    assert files["alice.safetensors"]["signature_verified"] is True
    assert "unknown party 'bob'" in files["bob.safetensors"]["problem"]


def test_usage_errors(tmp_path: Path, global_path: Path) -> None:
    assert run("status", tmp_path / "nope", "--global", global_path).exit_code == 2
    assert run("status", tmp_path, "--global", global_path, "--expect", 1, "--clients", "a").exit_code == 2
    assert run("status", tmp_path, "--global", global_path, "--expect", 0).exit_code == 2


def test_a_sealed_upload_is_reported_as_sealed_not_invalid(tmp_path: Path, global_path: Path) -> None:
    """Issue 32, row 8: an upload sealed for the coordinator (`sparsify --encrypt-to coordinator`,
    as the docs suggest) made `status` say "invalid" and exit 11 every round. It is "sealed", with
    its recipients, and counts toward nothing until it is opened; a damaged one is invalid."""
    from fedsrd_cli.trust.agreement import generate_agreement_key

    keys, trust, inbox = tmp_path / "keys", tmp_path / "trust", tmp_path / "inbox"
    trust.mkdir()
    inbox.mkdir()
    for party in ("coordinator", "alice"):
        generate_keypair(keys / party)
        generate_agreement_key(SigningKey.load(keys / f"{party}.key"), keys)
        for suffix in (".pub", ".agreement"):
            shutil.copy(keys / f"{party}{suffix}", trust)
    assert run("sign", global_path, "--sign-key", keys / "coordinator.key").exit_code == 0
    local = make_local(global_path, tmp_path / "local-alice.safetensors", seed=1)
    sealed = inbox / "alice.safetensors"
    sparsify = [
        "sparsify", "--global", global_path, "--local", local, "--client", "alice", "--out", sealed,
        "--encrypt-to", "coordinator", "--trust", trust, "--sign-key", keys / "alice.key",
    ]  # fmt: skip
    assert run(*sparsify).exit_code == 0
    base = ["status", inbox, "--global", global_path, "--clients", "alice"]
    waiting = run(*base, "--json")
    assert waiting.exit_code == EXIT_WAITING, waiting.output
    report = json.loads(waiting.output)
    (entry,) = report["files"]
    assert entry["status"] == "sealed" and entry["sealed_for"] == ["coordinator"] and not entry["problem"]
    assert report["invalid_files"] == 0 and report["sealed_files"] == 1
    assert report["missing_clients"] == ["alice"]
    text = run(*base, "--trust", trust)
    assert text.exit_code == EXIT_WAITING and "sealed (for coordinator)" in text.output
    assert "invalid" not in text.output.replace("invalid files\t0", "")
    # Opened beside it, the plain copy counts; the sealed one still counts toward nothing.
    opened = inbox / "alice-opened.safetensors"
    key = keys / "coordinator.agreement.key"
    assert run("open", sealed, "--agreement-key", key, "--out", opened).exit_code == 0
    assert run(*base, "--trust", trust).exit_code == EXIT_READY
    # A sealed file cut inside its header, or in its body (whose length the header records), is a
    # truncated copy: invalid.
    for size in (40, len(sealed.read_bytes()) - 100):
        (inbox / "cut.safetensors").write_bytes(sealed.read_bytes()[:size])
        bad = run(*base, "--json")
        assert bad.exit_code == EXIT_INVALID
        cut = next(f for f in json.loads(bad.output)["files"] if f["path"].endswith("cut.safetensors"))
        assert cut["status"] == "invalid" and "truncated" in cut["problem"]


def test_masked_uploads_get_one_answer_in_text_and_json(tmp_path: Path, global_path: Path) -> None:
    """Issue 32, row 9: with a secure round's masked uploads the text said "ignored
    (masked_upload)" yet counted them present and said "ready", while --json said "valid". Both say
    valid (the text adds "masked"); the status line and exit code agree with them."""
    from fedsrd_cli.trust.agreement import generate_agreement_key

    keys, trust, inbox = tmp_path / "keys", tmp_path / "trust", tmp_path / "inbox"
    trust.mkdir()
    inbox.mkdir()
    for party in ("coordinator", "alice", "bob"):
        generate_keypair(keys / party)
        generate_agreement_key(SigningKey.load(keys / f"{party}.key"), keys)
        for suffix in (".pub", ".agreement"):
            shutil.copy(keys / f"{party}{suffix}", trust)
    assert run("sign", global_path, "--sign-key", keys / "coordinator.key").exit_code == 0
    roster = tmp_path / "roster.json"
    made = run(
        "roster", "--global", global_path, "--sites", "alice,bob", "--sign-key", keys / "coordinator.key",
        "--out", roster,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    for seed, site in enumerate(("alice", "bob"), start=1):
        local = make_local(global_path, tmp_path / f"local-{site}.safetensors", seed=seed)
        masked = run(
            "sparsify", "--secure", "--global", global_path, "--local", local, "--client", site,
            "--roster", roster, "--agreement-key", keys / f"{site}.agreement.key", "--trust", trust,
            "--sign-key", keys / f"{site}.key", "--out", inbox / f"{site}.safetensors",
        )  # fmt: skip
        assert masked.exit_code == 0, masked.output
    base = ["status", inbox, "--global", global_path, "--clients", "alice,bob", "--trust", trust]
    report = json.loads(run(*base, "--json").output)
    assert [f["status"] for f in report["files"]] == ["valid", "valid"]
    assert report["present_clients"] == ["alice", "bob"] and report["status"] == "ready"
    text = run(*base)
    assert text.exit_code == EXIT_READY, text.output
    assert text.output.count("valid (masked)") == 2 and "ignored" not in text.output
