"""Key management: keygen."""

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
    from fedsrd_cli.signing import generate_keypair

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
