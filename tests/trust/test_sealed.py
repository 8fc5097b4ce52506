"""Sealed files (sealed.py): only the parties a file is sealed for can open it; a changed byte or
another key is refused; readers say how to open one; commands seal what they write for others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli.errors import ArtifactError, TrustError
from fedsrd_cli.trust.agreement import AgreementKey, generate_agreement_key
from fedsrd_cli.trust.sealed import MAGIC, open_sealed, seal
from fedsrd_cli.trust.signing import SigningKey, generate_keypair

from ..cli.test_cli import run
from ..cli.test_cli_surprises import refused
from ..conftest import make_global, make_local

runner = CliRunner()
PARTIES = ("coordinator", "site-a", "site-b", "site-c")


@pytest.fixture
def world(tmp_path: Path) -> dict:
    keys, trust = tmp_path / "keys", tmp_path / "trust"
    trust.mkdir()
    for party in PARTIES:
        generate_keypair(keys / party)
        generate_agreement_key(SigningKey.load(keys / f"{party}.key"), keys)
        shutil.copy(keys / f"{party}.pub", trust)
        shutil.copy(keys / f"{party}.agreement", trust)
    g0 = make_global(tmp_path / "g0.safetensors")
    run("sign", g0, "--sign-key", keys / "coordinator.key")
    return {"tmp": tmp_path, "keys": keys, "trust": trust, "g0": g0}


def key(world, party: str) -> AgreementKey:
    return AgreementKey.load(world["keys"] / f"{party}.agreement.key")


def test_a_sealed_file_opens_for_each_recipient_and_no_one_else(world):
    plain = world["g0"].read_bytes()
    recipients = {p: key(world, p).public for p in ("site-a", "site-b")}
    sealed = seal(plain, recipients)
    assert b"fedsrd.kind" not in sealed and b"lora_B" not in sealed  # nothing of the file shows
    for party in recipients:
        assert open_sealed(sealed, key(world, party), "f") == plain
    with pytest.raises(TrustError, match="sealed for site-a, site-b, not for this key of 'site-c'"):
        open_sealed(sealed, key(world, "site-c"), "f")
    for position in (len(sealed) // 2, len(sealed) - 1):  # the body, the tag
        changed = bytearray(sealed)
        changed[position] ^= 1
        with pytest.raises(TrustError, match="changed after sealing"):
            open_sealed(bytes(changed), key(world, "site-a"), "f")
    assert seal(plain, recipients) != sealed  # a fresh file key and nonce every time


def test_a_change_to_any_byte_of_a_sealed_header_is_refused_as_tampering(world):
    # The header is JSON with random base64 in it: a flipped bit may leave it parsing (the tag
    # fails) or not (the parser fails). Every byte, several bits, so both paths are taken each run.
    # The body's recorded length is part of the header: a digit changed to claim more bytes than
    # the file has reads as a copy cut short (exit 3, what a real cut looks like); still refused.
    sealed = seal(world["g0"].read_bytes(), {"site-a": key(world, "site-a").public})
    start = len(MAGIC) + 4
    end = start + int.from_bytes(sealed[len(MAGIC) : start], "little")
    length_at = sealed.index(b'"length":', start) + len(b'"length":')
    length_span = range(length_at, length_at + len(str(json.loads(sealed[start:end])["length"])))
    seen = set()
    for position in range(start, end):
        for bit in (1, 4, 64):
            changed = bytearray(sealed)
            changed[position] ^= bit
            expected = (TrustError, ArtifactError) if position in length_span else TrustError
            with pytest.raises(expected) as refusal:  # a name or key hash changed: "not for this key"
                open_sealed(bytes(changed), key(world, "site-a"), "f")
            message = str(refusal.value)
            seen.add(
                next(
                    k
                    for k in ("its header was changed", "it was changed", "not for this key", "cut short")
                    if k in message
                )
            )
    # all four paths
    assert seen == {"its header was changed", "it was changed", "not for this key", "cut short"}


def test_an_upload_sealed_for_the_coordinator_travels_and_aggregates(world):
    tmp, keys = world["tmp"], world["keys"]
    local = make_local(world["g0"], tmp / "local.safetensors", seed=1)
    sealed = tmp / "up-sealed.safetensors"
    run(
        "sparsify", "--global", world["g0"], "--local", local, "--client", "site-a", "--out", sealed,
        "--encrypt-to", "coordinator", "--trust", world["trust"], "--sign-key", keys / "site-a.key",
    )  # fmt: skip
    agg = tmp / "agg.safetensors"
    line = refused(
        ["aggregate", "--global", world["g0"], "--out", agg, sealed], 3, "is sealed (for coordinator)"
    )
    assert "fedsrd open" in line
    opened = tmp / "up.safetensors"
    refused(
        ["open", sealed, "--agreement-key", keys / "site-b.agreement.key", "--out", opened],
        7,
        "not for this key",
        watch=(opened,),
    )
    run("open", sealed, "--agreement-key", keys / "coordinator.agreement.key", "--out", opened)
    report = json.loads(run("inspect", opened, "--json", "--trust", world["trust"]).stdout)
    assert report["signature"]["signer"] == "site-a" and report["signature"]["verified"]  # signed inside
    run("aggregate", "--global", world["g0"], "--out", agg, opened)


def test_a_broadcast_sealed_for_the_sites_and_any_file_sealed_afterwards(world):
    tmp, keys = world["tmp"], world["keys"]
    local = make_local(world["g0"], tmp / "local.safetensors", seed=2)
    up, agg = tmp / "up.safetensors", tmp / "agg.safetensors"
    run("sparsify", "--global", world["g0"], "--local", local, "--client", "site-a", "--out", up)
    run("aggregate", "--global", world["g0"], "--out", agg, up, "--sign-key", keys / "coordinator.key")
    bc, nxt = tmp / "bc.sealed", tmp / "g1.safetensors"
    run(
        "broadcast", "--global", world["g0"], "--aggregate", agg, "--out", bc, "--out-global", nxt,
        "--encrypt-to", "site-a,site-b", "--trust", world["trust"],
    )  # fmt: skip
    assert run("inspect", nxt, "--json").stdout  # the coordinator's own copy stays plain
    for site in ("site-a", "site-b"):
        opened = tmp / f"bc-{site}.safetensors"
        run("open", bc, "--agreement-key", keys / f"{site}.agreement.key", "--out", opened)
        run("apply", "--global", world["g0"], "--broadcast", opened, "--out", tmp / f"g1-{site}.safetensors")
    sealed_g0 = tmp / "g0.sealed"
    run("seal", world["g0"], "--to", "site-c", "--trust", world["trust"], "--out", sealed_g0)
    back = tmp / "g0-back.safetensors"
    run("open", sealed_g0, "--agreement-key", keys / "site-c.agreement.key", "--out", back)
    assert back.read_bytes() == world["g0"].read_bytes()
    refused(
        ["seal", world["g0"], "--to", "nobody", "--trust", world["trust"], "--out", tmp / "x"],
        7,
        "'nobody' is not a trusted party",
    )


def test_a_party_named_twice_is_refused(world):
    """Issue 32, row 15: `seal --to site-a,site-a` was accepted; a list naming a party twice is a
    mistake (a typo for another party, most likely), refused like any bad flag."""
    tmp = world["tmp"]
    out = tmp / "twice.sealed"
    refused(
        ["seal", world["g0"], "--to", "site-a,site-b,site-a", "--trust", world["trust"], "--out", out],
        2,
        "names 'site-a' more than once",
        watch=(out,),
        root=tmp,
    )
    local = make_local(world["g0"], tmp / "local-twice.safetensors", seed=3)
    up = tmp / "up-twice.safetensors"
    refused(
        ["sparsify", "--global", world["g0"], "--local", local, "--client", "site-a", "--out", up]
        + ["--encrypt-to", "coordinator, coordinator", "--trust", world["trust"]],
        2,
        "names 'coordinator' more than once",
        watch=(up,),
        root=tmp,
    )


def test_the_writer_keeps_a_copy_it_can_read_and_every_wrote_line_says_sealed(world, tiny_model):
    """Issue 32, row 11: `init --encrypt-to site-a` sealed the coordinator's only copy of round 0
    without a word, and no "wrote" line said a file was sealed. init refuses to seal its state away
    from its writer (the coordinator, or --sign-key's party); every sealed output says whom for."""
    tmp, trust, keys = world["tmp"], world["trust"], world["keys"]
    g0 = tmp / "init-g0.safetensors"
    init = ["init", "--base", tiny_model, "--rank", 4, "--targets", "q_proj", "--out", g0, "--trust", trust]
    refused([*init, "--encrypt-to", "site-a"], 2, "'coordinator', who writes it", watch=(g0,), root=tmp)
    refused(
        [*init, "--encrypt-to", "coordinator", "--sign-key", keys / "site-a.key"],
        2,
        "add site-a to --encrypt-to",
        watch=(g0,),
        root=tmp,
    )
    made = run(*init, "--encrypt-to", "site-a,coordinator")
    assert "sealed for coordinator, site-a)" in made.stdout.splitlines()[0]
    opened = tmp / "init-g0-open.safetensors"
    run("open", g0, "--agreement-key", keys / "coordinator.agreement.key", "--out", opened)
    # sparsify and broadcast: their "wrote" line, and --json's sealed_for.
    local = make_local(world["g0"], tmp / "local-wrote.safetensors", seed=4)
    up = tmp / "up-wrote.safetensors"
    sparsify = [
        "sparsify", "--global", world["g0"], "--local", local, "--client", "site-a", "--out", up,
        "--encrypt-to", "coordinator", "--trust", trust, "--json",
    ]  # fmt: skip
    assert json.loads(run(*sparsify).stdout)["sealed_for"] == ["coordinator"]
    plain = tmp / "up-wrote-plain.safetensors"
    run("open", up, "--agreement-key", keys / "coordinator.agreement.key", "--out", plain)
    agg = tmp / "agg-wrote.safetensors"
    run("aggregate", "--global", world["g0"], "--out", agg, plain, "--sign-key", keys / "coordinator.key")
    bc, nxt = tmp / "bc-wrote.sealed", tmp / "g1-wrote.safetensors"
    done = run(
        "broadcast", "--global", world["g0"], "--aggregate", agg, "--out", bc, "--out-global", nxt,
        "--encrypt-to", "site-b,site-a", "--trust", trust,
    )  # fmt: skip
    wrote = done.stdout.splitlines()[0]
    assert wrote.startswith("wrote") and wrote.endswith("; sealed for site-a, site-b)"), wrote
    assert "sealed" not in run("inspect", nxt).stdout  # the coordinator's next state stays plain


def test_a_sealed_file_cut_anywhere_is_one_truncated_copy_exit_3(world):
    """Issue 32, row 15: a sealed file cut to 10 bytes exited 3, cut to 500 bytes 7 ("changed after
    sealing"). Its header records the body's length, so a cut anywhere is a truncated copy (exit 3),
    for `open` and for any other command; a byte changed in the body is still exit 7."""
    tmp, keys = world["tmp"], world["keys"]
    sealed = tmp / "g0.sealed"
    run("seal", world["g0"], "--to", "coordinator", "--trust", world["trust"], "--out", sealed)
    data = sealed.read_bytes()
    opener = keys / "coordinator.agreement.key"
    for size in (1, 10, 16, 19, 100, 500, len(data) // 2, len(data) - 16, len(data) - 1):
        cut = tmp / f"cut-{size}.sealed"
        cut.write_bytes(data[:size])
        out = tmp / f"opened-{size}.safetensors"
        refused(["open", cut, "--agreement-key", opener, "--out", out], 3, "truncated copy?", watch=(out,))
        refused(["inspect", cut], 3, "is sealed" if size >= 9 else "not a safetensors file")
    changed = bytearray(data)
    changed[len(data) // 2] ^= 1
    (tmp / "changed.sealed").write_bytes(bytes(changed))
    out = tmp / "opened-changed.safetensors"
    refused(
        ["open", tmp / "changed.sealed", "--agreement-key", opener, "--out", out], 7, "changed after sealing"
    )
