"""The coordinator's broadcast (the update sent, the next global state) and what it prints of its noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    EncryptToOpt,
    ForceOpt,
    GlobalOpt,
    JsonOpt,
    SignKeyOpt,
    ThreadsOpt,
    TrustOpt,
    seal_for,
    sign_with,
    trust_from_flags,
)
from fedsrd_cli.cli.render import worst, written
from fedsrd_cli.errors import UsageError
from fedsrd_cli.output import Output


@command("broadcast")
def broadcast_cmd(
    global_path: GlobalOpt,
    aggregate: Annotated[Path, typer.Option("--aggregate", help="This round's aggregate file.")],
    out_path: Annotated[Path, typer.Option("--out", help="Broadcast file to send to clients.")],
    out_global: Annotated[Path, typer.Option("--out-global", help="Next global state file.")],
    download_sparsity: Annotated[
        float | None,
        typer.Option(
            "--download-sparsity",
            help="Fraction of the update dropped at random (default 0.8; dense methods: only 0).",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Download-mask seed (default: from the aggregate's hash; under organisation-level DP"
            " from the global state's).",
        ),
    ] = None,
    value_dtype: Annotated[
        str,
        typer.Option(
            "--value-dtype",
            help="fp32 (the paper's accounting), bf16, fp16, or int8 / int4 (block-quantized codes, a"
            " float32 scale per 64 values).",
        ),
    ] = "bf16",
    damping: Annotated[
        float | None,
        typer.Option(
            "--damping",
            help="Ridge weight of the one-factor solve, relative to sigma_max^2 of the inverted factor"
            " (default 1e-3; 0 = the paper's exact pinv).",
            show_default=False,
        ),
    ] = None,
    download_fit: Annotated[
        str | None,
        typer.Option(
            "--download-fit",
            help="dare (default, the paper: whole-factor least squares, kept elements divided by"
            " 1 - p) or lstsq (least squares on the kept elements alone).",
            show_default=False,
        ),
    ] = None,
    factor_choice: Annotated[
        str | None,
        typer.Option(
            "--factor-choice",
            help="fit (default: per module, the factor whose least squares fits the target better),"
            " parity (the paper: B in odd rounds, A in even ones) or b (B in every round; the default"
            " for an organisation-level DP aggregate).",
            show_default=False,
        ),
    ] = None,
    server_lr: Annotated[
        float,
        typer.Option(
            "--server-lr",
            help="The coordinator's step in (0, 16]: every factor update sent is multiplied by it"
            " (1: the download as it is; above 1 extrapolates, FedOpt; docs/algorithms.md).",
        ),
    ] = 1.0,
    calibrate_step: Annotated[
        bool,
        typer.Option(
            "--calibrate-step",
            help="Divide --server-lr by the uploads' gain (how many times their own updates the sites'"
            " reconstructions carry, in the aggregate), so the step is that multiple of the sites' updates.",
        ),
    ] = False,
    step_rule: Annotated[
        str,
        typer.Option(
            "--step-rule",
            help="fixed (the step is --server-lr) or fedexp (--server-lr times FedExP's extrapolation"
            " from the sites' update spread; needs an aggregate made with --update-spread).",
        ),
    ] = "fixed",
    encrypt_to: EncryptToOpt = None,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Coordinator: turn the aggregate into the update to send and the next global state.

    Both files are written or neither: the next state is placed first, then the broadcast,
    and if the broadcast cannot be written the next state is removed again (unless it was
    there before). A rerun after a crash between the two accepts an existing next-state
    file holding exactly the same bytes.
    """
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.algorithms.diagnostics import update_error_warning
    from fedsrd_cli.algorithms.protocol import default_download_seed
    from fedsrd_cli.config import BroadcastConfig
    from fedsrd_cli.files.artifacts import write_artifacts
    from fedsrd_cli.files.atomic import ensure_not_input, ensure_writable
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.trust.signing import read_verified

    threads = use_threads(threads)
    out = Output(json_mode)
    if out_path.resolve() == out_global.resolve():
        raise UsageError("--out and --out-global must be different files")
    signer, trust = trust_from_flags(sign_key, trust_dir)
    seal = seal_for(encrypt_to, trust_dir)  # the broadcast only: the next state is the coordinator's
    inputs = [("--global", global_path), ("--aggregate", aggregate)]
    ensure_writable(out_path, force, inputs)
    if out_path.exists() or not out_global.exists():
        ensure_writable(out_global, force, inputs)
    else:  # a rerun after a crash between the two files may find the next state already there
        ensure_not_input(out_global, inputs)
    global_state = read_verified(global_path, "state", trust)
    agg = read_verified(aggregate, "aggregate", trust)
    if seed is None:
        seed = default_download_seed(global_state, agg)
    algorithm = get_algorithm(agg.header.method)
    if download_sparsity is None:
        download_sparsity = algorithm.default_download_sparsity
    if factor_choice is None and ("organisation_dp" in agg.header.privacy or "secure" in agg.header.info):
        factor_choice = "b"  # the only choice organisation-level DP and secure rounds allow
    given = {"damping": damping, "download_fit": download_fit, "factor_choice": factor_choice}
    config = BroadcastConfig(
        download_sparsity,
        seed,
        value_dtype,
        **{k: v for k, v in given.items() if v is not None},
        server_lr=server_lr,
        calibrate_step=calibrate_step,
        step_rule=step_rule,
    )
    broadcast, next_state = algorithm.broadcast(global_state, agg, config, out.track)
    state_header, header = write_artifacts(
        [
            (out_global, next_state.header, next_state.tensors, True),
            (out_path, broadcast.header, broadcast.tensors, False),
        ],
        force,
        sign=sign_with(signer),
        seal=None if seal is None else {1: seal},
    )
    factors = sorted({name.rsplit(".", 2)[-2] for name in header.layout})
    error = header.info.get("update_error")  # not recorded under organisation-level DP
    warning = update_error_warning(header)
    if warning:
        out.note(f"warning: {warning}")
    written(
        out,
        out_path,
        header,
        {
            "next_global": str(out_global),
            "next_global_hash": state_header.content_hash,
            "factors_sent": ",".join(factors),
            "fallback_modules": len(header.info.get("factor_fallbacks", [])),
            "seed": seed,
            **({"update_error": error["overall"], "worst_module": worst(error["modules"])} if error else {}),
            **_broadcast_privacy_summary(header),
            "threads": threads,
            "warnings": [warning] if warning else [],  # a list, as train-local and simulate give it
        },
        sealed_for=seal,
    )


def _broadcast_privacy_summary(header: Any) -> dict[str, Any]:
    """What broadcast prints of its noise and of the organisation-level ledger."""
    out: dict[str, Any] = {}
    noise = header.info.get("organisation_dp")
    if noise is not None:
        out["organisation_noise"] = (
            f"std {noise['noise_std']:.4g} on every B element (sensitivity {noise['sensitivity']:.4g},"
            f" noise multiplier {noise['noise_multiplier']:g})"
        )
    ledger = header.privacy.get("organisation_level")
    if ledger is not None:
        epsilon = ledger["epsilon"]
        shown = "inf (a round without organisation-level DP)" if epsilon is None else f"{epsilon:.4g}"
        out["organisation_epsilon"] = (
            f"{shown} at delta {ledger['delta']:g} after {len(ledger['rounds'])} rounds"
        )
    return out
