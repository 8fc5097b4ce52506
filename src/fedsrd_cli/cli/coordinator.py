"""The coordinator's set-up of a round: init (the round-0 global state), roster (a secure round's sites)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    EncryptToOpt,
    ForceOpt,
    GlobalOpt,
    JsonOpt,
    OutOpt,
    SignKeyOpt,
    TrustOpt,
    check_client_id,
    seal_for,
    sign_with,
    trust_from_flags,
)
from fedsrd_cli.cli.render import written
from fedsrd_cli.errors import UsageError
from fedsrd_cli.output import Output, key_value_table


@command("init")
def init_cmd(
    base: Annotated[
        Path, typer.Option("--base", help="Local base model: a save_pretrained directory or a .gguf file.")
    ],
    out_path: OutOpt,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha.")] = 16.0,
    targets: Annotated[
        str, typer.Option("--targets", help="all-linear, or module names like q_proj,v_proj.")
    ] = "all-linear",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random A factors.")] = 0,
    encrypt_to: EncryptToOpt = None,
    trust_dir: TrustOpt = None,
    sign_key: SignKeyOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Create the round-0 global state for a base model (reads only its config, or a GGUF's metadata)."""
    from fedsrd_cli.algorithms.protocol import initial_state
    from fedsrd_cli.config import InitConfig
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import ensure_writable
    from fedsrd_cli.files.model_spec import fingerprint_base, lora_module_shapes
    from fedsrd_cli.trust.signing import COORDINATOR

    out = Output(json_mode)
    config = InitConfig(rank, alpha, targets, seed)
    signer, _ = trust_from_flags(sign_key, None)
    seal = seal_for(encrypt_to, trust_dir)
    writer = signer.name if signer is not None else COORDINATOR  # init is the coordinator's
    if seal is not None and writer not in seal.parties:
        raise UsageError(
            f"--encrypt-to {','.join(seal.parties)} would seal the only copy of the round-0 state so that"
            f" {writer!r}, who writes it and aggregates from it, cannot read it: add {writer} to"
            " --encrypt-to, or write it plain and `fedsrd seal` a copy for the sites"
        )
    ensure_writable(out_path, force, [("--base", base)])
    fingerprint = fingerprint_base(base)
    lora, shapes = lora_module_shapes(base, config.targets, config.rank, config.alpha)
    payload = initial_state(shapes, lora, config.seed, fingerprint)
    header = write_artifact(
        out_path, payload.header, payload.tensors, force, sign=sign_with(signer), seal=seal
    )
    params = sum(t.numel() for t in payload.tensors.values())
    written(
        out,
        out_path,
        header,
        {"modules": len(shapes), "lora_parameters": params, "lora": lora.describe()},
        sealed_for=seal,
    )


@command("roster")
def roster_cmd(
    global_path: GlobalOpt,
    sites: Annotated[str, typer.Option("--sites", help="Comma-separated site ids that mask for each other.")],
    out_path: OutOpt,
    sign_key: Annotated[Path, typer.Option("--sign-key", help="The coordinator's key (coordinator.key).")],
    clip: Annotated[
        float,
        typer.Option(
            "--clip",
            help="Range X of every masked value: |w (B_i A_i - B A) A^T| <= X, elementwise (a site over it"
            " refuses and asks for more).",
        ),
    ] = 1.0,
    attempt: Annotated[
        int,
        typer.Option("--attempt", help="1, then 2, 3 ... when a site dropped out and the others mask again."),
    ] = 1,
    secure_density: Annotated[
        float,
        typer.Option(
            "--secure-density",
            help="Share of each projection every site sends, at public positions of the state's hash;"
            " each site keeps the rest and sends it later (sparsify --residual-out / --residual-in).",
        ),
    ] = 1.0,
    word_bits: Annotated[
        int,
        typer.Option(
            "--word-bits",
            help="Fixed-point word of each masked value: 16 (up to 128 sites) or 32 bits.",
        ),
    ] = 32,
    update_spread: Annotated[
        bool,
        typer.Option(
            "--update-spread",
            help="Every site also adds its squared update norm to the masked sum, so `aggregate --secure"
            " --update-spread` can record FedExP's step; the coordinator learns that one total too.",
        ),
    ] = False,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Coordinator: sign the roster of a secure round: the sites that mask for each other.

    Every site on it runs `sparsify --secure --roster ...`; if one does not deliver, sign a new
    roster without it (--attempt 2) and the others mask again (docs/security.md).
    """
    from fedsrd_cli.files.atomic import ensure_writable
    from fedsrd_cli.trust.roster import make_roster, write_roster
    from fedsrd_cli.trust.signing import SigningKey, read_verified

    out = Output(json_mode)
    names = [check_client_id(s.strip()) for s in sites.split(",") if s.strip()]
    signer = SigningKey.load(sign_key)
    _, trust = trust_from_flags(None, trust_dir)
    ensure_writable(out_path, force, [("--global", global_path)])
    global_state = read_verified(global_path, "state", trust)
    head = global_state.header
    roster = make_roster(
        head.content_hash, head.round + 1, names, attempt, clip, secure_density, word_bits, update_spread
    )
    write_roster(out_path, roster, signer, force)
    out.result(
        {"path": str(out_path), "roster": roster.hash, **roster.body()},
        key_value_table(
            [
                ("wrote", f"{out_path} (roster of round {roster.round}, attempt {roster.attempt})"),
                ("sites", ", ".join(roster.sites)),
                ("hash", roster.hash.removeprefix("sha256:")[:12]),
                ("clip", f"{roster.clip:g}"),
                ("positions", f"density {roster.density:g}, {roster.word_bits}-bit words"),
                ("spread", "every site adds its squared update norm" if roster.spread else "none"),
            ]
        ),
    )
