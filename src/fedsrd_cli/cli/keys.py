"""Key management: keygen, agreement-key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import ForceOpt, JsonOpt
from fedsrd_cli.output import Output, key_value_table


@command("keygen")
def keygen_cmd(
    out_prefix: Annotated[
        Path,
        typer.Option("--out", help="DIR/NAME: writes DIR/NAME.key (private, 0600) and DIR/NAME.pub."),
    ],
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Create an Ed25519 key pair for party NAME (a client id, or `coordinator`).

    Keep NAME.key secret; give NAME.pub to the parties that read your files, who put it
    in their --trust directory.
    """
    from fedsrd_cli.trust.signing import generate_keypair

    out = Output(json_mode)
    key_path, pub_path, fingerprint = generate_keypair(out_prefix, force)
    out.result(
        {
            "party": out_prefix.name,
            "private_key": str(key_path),
            "public_key": str(pub_path),
            "key_id": fingerprint,
        },
        key_value_table(
            [
                ("party", out_prefix.name),
                ("private key", f"{key_path} (keep secret)"),
                ("public key", f"{pub_path} (share)"),
                ("key id", fingerprint),
            ]
        ),
    )


@command("agreement-key")
def agreement_key_cmd(
    sign_key: Annotated[
        Path,
        typer.Option("--sign-key", help="This party's NAME.key (`fedsrd keygen`), which signs the new key."),
    ],
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Create party NAME's X25519 key for secure rounds, beside NAME.key and signed by it.

    Writes NAME.agreement.key (private, 0600) and NAME.agreement: give NAME.agreement to the
    other parties, who put it in their --trust directory beside NAME.pub.
    """
    from fedsrd_cli.trust.agreement import generate_agreement_key
    from fedsrd_cli.trust.signing import SigningKey

    out = Output(json_mode)
    signer = SigningKey.load(sign_key)
    key_path, public_path = generate_agreement_key(signer, sign_key.parent, force)
    out.result(
        {"party": signer.name, "private_key": str(key_path), "public_key": str(public_path)},
        key_value_table(
            [
                ("party", signer.name),
                ("private key", f"{key_path} (keep secret)"),
                ("published key", f"{public_path} (share: the others' --trust directories)"),
            ]
        ),
    )
