"""The signing flags every command shares: `--sign-key KEY` on writers, `--trust DIR` on readers.

Wiring a command (two parameters and one line):

    def my_cmd(..., sign_key: SignKeyOpt = None, trust_dir: TrustOpt = None, ...):
        signer, trust = trust_from_flags(sign_key, trust_dir)
        artifact = read_verified(path, "state", trust)          # instead of read_artifact
        write_artifact(out_path, header, tensors, force, sign=sign_with(signer))

Both flags are optional: without --trust nothing is checked, without --sign-key
nothing is signed. `cryptography` is imported only when a flag is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from fedsrd_cli.signing import SigningKey, Trust

SignKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--sign-key",
        help="Sign the output with this private key (NAME.key from `fedsrd keygen`; NAME is your party id).",
    ),
]
TrustOpt = Annotated[
    Path | None,
    typer.Option(
        "--trust",
        help="Directory of trusted NAME.pub keys: refuse inputs unsigned or signed by the wrong party.",
    ),
]


def trust_from_flags(sign_key: Path | None, trust_dir: Path | None) -> tuple[SigningKey | None, Trust | None]:
    """Load the --sign-key and --trust flags (each may be None). Call it before any work."""
    if sign_key is None and trust_dir is None:
        return None, None
    from fedsrd_cli.signing import SigningKey, Trust

    signer = SigningKey.load(sign_key) if sign_key is not None else None
    trust = Trust.load(trust_dir) if trust_dir is not None else None
    return signer, trust


def sign_with(signer: SigningKey | None) -> Callable[[list[Any]], list[Any]] | None:
    """The `sign=` argument of artifacts.write_artifact for an optional key."""
    return None if signer is None else signer.sign_parts
