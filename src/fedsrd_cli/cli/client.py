"""A client's round files: sparsify (this round's upload), apply (broadcasts onto the global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    METHODS_HELP,
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
from fedsrd_cli.output import Output


@command("sparsify")
def sparsify_cmd(
    global_path: GlobalOpt,
    local: Annotated[Path, typer.Option("--local", help="Trained local state, or a PEFT adapter dir/file.")],
    client: Annotated[str, typer.Option("--client", help="This client's id.")],
    out_path: OutOpt,
    samples: Annotated[
        int | None,
        typer.Option("--samples", help="Training sample count (default: from the local state)."),
    ] = None,
    base_sparsity: Annotated[
        float | None,
        typer.Option(
            "--base-sparsity",
            help="Base pruning ratio alpha (default: the method's, 0.85; 0.7 for fedsrd-alternate).",
            show_default=False,
        ),
    ] = None,
    kurtosis_coeff: Annotated[
        float,
        typer.Option("--kurtosis-coeff", help="c of the adaptive ratio alpha + min(cap, c ln kurtosis)."),
    ] = 0.1,
    kurtosis_cap: Annotated[
        float,
        typer.Option("--kurtosis-cap", help="cap of the adaptive ratio: at most this much above alpha."),
    ] = 0.11,
    no_rescale: Annotated[
        bool, typer.Option("--no-rescale", help="Do not restore the L1 norm of kept values.")
    ] = False,
    value_dtype: Annotated[
        str,
        typer.Option(
            "--value-dtype",
            help="fp32 (the paper's accounting), bf16, fp16, or int8 / int4: block-quantized codes with"
            " a float32 scale per 64 values (keep more of each delta at the same bytes).",
        ),
    ] = "bf16",
    method: Annotated[str, typer.Option("--method", help=f"Method: {METHODS_HELP}.")] = "fedsrd",
    upload_drop: Annotated[
        float, typer.Option("--upload-drop", help="fed-dare: drop probability p of each upload element.")
    ] = 0.9,
    update_sketch: Annotated[
        bool,
        typer.Option(
            "--update-sketch",
            help="Also record a 1,024-number sketch of this site's exact update, from which the"
            " coordinator estimates the sites' mean update (aggregate --update-spread, broadcast"
            " --step-rule fedexp).",
        ),
    ] = False,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Write a masked upload for a secure round (needs --roster, --agreement-key and --trust):"
            " the coordinator learns only the sum of the roster's uploads.",
        ),
    ] = False,
    roster_path: Annotated[
        Path | None, typer.Option("--roster", help="The secure round's roster, signed by the coordinator.")
    ] = None,
    agreement_key: Annotated[
        Path | None,
        typer.Option("--agreement-key", help="This site's NAME.agreement.key (`fedsrd agreement-key`)."),
    ] = None,
    min_sites: Annotated[
        int,
        typer.Option("--min-sites", help="Refuse a secure roster of fewer sites (at least 2)."),
    ] = 2,
    min_density: Annotated[
        float,
        typer.Option("--min-density", help="Refuse a secure roster whose public positions are sparser."),
    ] = 0.01,
    min_word_bits: Annotated[
        int,
        typer.Option("--min-word-bits", help="Refuse a secure roster of narrower words (16 or 32 bits)."),
    ] = 16,
    refuse_spread: Annotated[
        bool,
        typer.Option(
            "--refuse-spread",
            help="Refuse a secure roster that asks for this site's squared update norm"
            " (roster --update-spread).",
        ),
    ] = False,
    residual_in: Annotated[
        Path | None,
        typer.Option(
            "--residual-in",
            help="Secure: what this site's last secure upload left out (its --residual-out), sent now.",
        ),
    ] = None,
    residual_out: Annotated[
        Path | None,
        typer.Option(
            "--residual-out",
            help="Secure: keep what this upload leaves out (a roster below density 1) for the next round.",
        ),
    ] = None,
    encrypt_to: EncryptToOpt = None,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Client: turn a locally trained adapter into this round's upload (sparse for FedSRD; masked
    with --secure)."""
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.config import QUANTIZED_VALUE_DTYPES, SparsifyConfig
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import ensure_writable
    from fedsrd_cli.site.uploads import make_upload
    from fedsrd_cli.trust.signing import COORDINATOR, read_verified

    out = Output(json_mode)
    check_client_id(client)
    signer, trust = trust_from_flags(sign_key, trust_dir)
    if signer is not None and signer.name != client:
        raise UsageError(
            f"--sign-key {sign_key} signs as {signer.name!r} but --client is {client!r}; the coordinator"
            " accepts an upload only when signed by the client it names"
        )
    if samples is not None and samples < 0:
        raise UsageError("--samples must be >= 0")
    algorithm = get_algorithm(method)
    if base_sparsity is None:
        base_sparsity = algorithm.default_base_sparsity
    config = SparsifyConfig(
        base_sparsity, kurtosis_coeff, kurtosis_cap, not no_rescale, value_dtype, upload_drop, update_sketch
    )
    if secure and update_sketch:
        raise UsageError(
            "--update-sketch tells the coordinator about this site's own update, which a --secure"
            " upload hides: leave it out"
        )
    if secure and value_dtype in QUANTIZED_VALUE_DTYPES:
        raise UsageError(
            f"--value-dtype {value_dtype} quantizes a sparse upload's values; a --secure upload sends"
            " masked int32 fixed-point sums, which cannot be quantized: leave --value-dtype out"
        )
    if secure and (roster_path is None or agreement_key is None or trust is None):
        raise UsageError("--secure needs --roster, --agreement-key and --trust (the other sites' keys)")
    if not secure and (roster_path is not None or agreement_key is not None or residual_in or residual_out):
        raise UsageError(
            "--roster, --agreement-key and --residual-in/-out belong to a secure round: add --secure"
        )
    if secure and method not in ("fedsrd", "fedsrd-e"):
        raise UsageError(f"a secure round runs FedSRD-e's route; --method {method} has no secure upload")
    seal = seal_for(encrypt_to, trust_dir)
    inputs = [("--global", global_path), ("--local", local), ("--roster", roster_path)]
    inputs.append(("--residual-in", residual_in))
    ensure_writable(out_path, force, inputs)
    if residual_out is not None:
        ensure_writable(residual_out, force, [*inputs, ("--out", out_path)])
    global_state = read_verified(global_path, "state", trust, accept=(COORDINATOR, client))
    also = []
    if secure:
        from fedsrd_cli.algorithms.secure import SecureFloor
        from fedsrd_cli.site.uploads import SecureFiles, secure_upload

        assert trust is not None and roster_path is not None and agreement_key is not None
        files = SecureFiles(roster_path, agreement_key, residual_in, residual_out)
        floor = SecureFloor(max(min_sites, 2), min_density, min_word_bits, not refuse_spread)
        payload, samples, kept = secure_upload(global_state, local, client, samples, files, trust, floor)
        also = [kept] if kept is not None else []
    else:
        payload, samples = make_upload(global_state, local, client, samples, method, config, out.track)
    header = write_artifact(
        out_path, payload.header, payload.tensors, force, sign=sign_with(signer), also=also, seal=seal
    )
    if samples == 0:
        out.note("note: no sample count recorded; --weighting samples will refuse this upload")
    written(
        out,
        out_path,
        header,
        {
            "client_id": client,
            "num_samples": samples,
            "tensors": len(header.layout or payload.tensors),
            **({"roster": header.info["secure"]["roster"]} if secure else {}),
        },
        sealed_for=seal,
    )


@command("apply")
def apply_cmd(
    global_path: GlobalOpt,
    broadcasts: Annotated[
        list[Path],
        typer.Option(
            "--broadcast",
            help="The coordinator's broadcast; repeat it to catch up on missed rounds, in round order.",
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Next global state file.")],
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Client: apply broadcasts to the global state and verify the coordinator's result hashes.

    With --trust, broadcasts must be signed by `coordinator`, and the state by
    `coordinator` or by the party of --sign-key (a state this client computed itself).
    """
    from fedsrd_cli.algorithms.catchup import apply_chain
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import ensure_writable
    from fedsrd_cli.trust.signing import COORDINATOR, read_verified

    out = Output(json_mode)
    signer, trust = trust_from_flags(sign_key, trust_dir)
    ensure_writable(out_path, force, [("--global", global_path), ("--broadcast", broadcasts)])
    accept = (COORDINATOR,) if signer is None else (COORDINATOR, signer.name)
    global_state = read_verified(global_path, "state", trust, accept=accept)
    chain = [read_verified(path, "broadcast", trust) for path in broadcasts]
    payload = apply_chain(global_state, chain)
    header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
    written(
        out,
        out_path,
        header,
        {"verified": True, "broadcasts_applied": len(chain), "from_round": global_state.header.round},
    )
