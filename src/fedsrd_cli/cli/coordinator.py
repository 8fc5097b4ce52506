"""The coordinator's commands: init, aggregate, broadcast, status."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    ThreadsOpt,
    TrustOpt,
    check_client_id,
    seal_for,
    sign_with,
    trust_from_flags,
)
from fedsrd_cli.cli.render import worst, written
from fedsrd_cli.errors import UsageError
from fedsrd_cli.output import Output, data_table, key_value_table


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
    roster = make_roster(head.content_hash, head.round + 1, names, attempt, clip)
    write_roster(out_path, roster, signer, force)
    out.result(
        {"path": str(out_path), "roster": roster.hash, **roster.body()},
        key_value_table(
            [
                ("wrote", f"{out_path} (roster of round {roster.round}, attempt {roster.attempt})"),
                ("sites", ", ".join(roster.sites)),
                ("hash", roster.hash.removeprefix("sha256:")[:12]),
                ("clip", f"{roster.clip:g}"),
            ]
        ),
    )


@command("aggregate")
def aggregate_cmd(
    global_path: GlobalOpt,
    out_path: OutOpt,
    uploads: Annotated[list[Path], typer.Argument(help="Upload files of this round.")],
    method: Annotated[str, typer.Option("--method", help=f"Method: {METHODS_HELP}.")] = "fedsrd",
    weighting: Annotated[str, typer.Option("--weighting", help="uniform or samples.")] = "uniform",
    max_update_norm: Annotated[
        float | None,
        typer.Option(
            "--max-update-norm",
            help="Bound on each client's update norm ||B_i A_i - B A||_F (all modules in quadrature).",
        ),
    ] = None,
    on_outlier: Annotated[
        str,
        typer.Option(
            "--on-outlier", help="refuse (error naming the client) or clip (scale it to the bound)."
        ),
    ] = "refuse",
    truncation: Annotated[
        str,
        typer.Option(
            "--truncation",
            help="Rank-r projection: exact (stacked factors, cost ~ m^2), randomized (linear in m),"
            " or auto (exact up to 12 clients at the default sketch).",
        ),
    ] = "auto",
    align_factors: Annotated[
        bool,
        typer.Option(
            "--align-factors",
            help="fedsrd, fedsrd-e: store W as rank-r factors in the clients' own scale (one least-squares"
            " sweep from their mean factors), for broadcast --factor-choice both (few, long rounds).",
        ),
    ] = False,
    max_samples: Annotated[
        int | None,
        typer.Option(
            "--max-samples",
            help="Refuse uploads that record more training samples than this (a site that claims a huge"
            " count would dominate --weighting samples).",
            show_default=False,
        ),
    ] = None,
    require_dp: Annotated[
        float | None,
        typer.Option(
            "--require-dp",
            help="Refuse uploads without a record-level privacy ledger, with an epsilon over this, or"
            " with a history shorter than the one the global state recorded for the site.",
            show_default=False,
        ),
    ] = None,
    dp_clip: Annotated[
        float | None,
        typer.Option(
            "--dp-clip",
            help="Organisation-level DP (--method fedsrd-e): clip each site's update ||B_i A_i - B A||_F"
            " to this; the broadcast adds the noise (docs/privacy.md).",
            show_default=False,
        ),
    ] = None,
    dp_noise_multiplier: Annotated[
        float | None,
        typer.Option(
            "--dp-noise-multiplier",
            help="Organisation-level DP: noise std / sensitivity.",
            show_default=False,
        ),
    ] = None,
    dp_sampling_rate: Annotated[
        float,
        typer.Option(
            "--dp-sampling-rate",
            help="Organisation-level DP: each upload given takes part with this probability (Poisson,"
            " drawn here in secret).",
        ),
    ] = 1.0,
    dp_delta: Annotated[
        float | None, typer.Option("--dp-delta", help="Organisation-level DP: delta.", show_default=False)
    ] = None,
    dp_max_epsilon: Annotated[
        float | None,
        typer.Option(
            "--dp-max-epsilon",
            help="Refuse a round that takes the organisation-level epsilon past this.",
            show_default=False,
        ),
    ] = None,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Sum the masked uploads of a secure round (needs --roster and --trust; FedSRD-e's route).",
        ),
    ] = False,
    roster_path: Annotated[
        Path | None, typer.Option("--roster", help="The secure round's roster (`fedsrd roster`).")
    ] = None,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Coordinator: aggregate this round's uploads (FedSRD: reconstruct in full-rank space).

    With --trust, every upload must be signed by the client it names. --require-dp checks the
    sites' privacy ledgers; --dp-clip with --dp-noise-multiplier and --dp-delta makes the round
    organisation-level DP (docs/privacy.md).
    """
    from dataclasses import replace

    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.algorithms.private import aggregate_privacy, sample_sites
    from fedsrd_cli.algorithms.protocol import check_uploads
    from fedsrd_cli.config import AggregateConfig
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import ensure_writable
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.privacy.ledger import OrganisationDp
    from fedsrd_cli.trust.signing import read_verified

    out = Output(json_mode)
    org_flags = (dp_clip, dp_noise_multiplier, dp_delta)
    if any(flag is not None for flag in org_flags) and None in org_flags:
        raise UsageError(
            "organisation-level DP needs --dp-clip, --dp-noise-multiplier and --dp-delta together"
        )
    if dp_clip is None and dp_sampling_rate != 1.0:
        raise UsageError("--dp-sampling-rate samples sites for organisation-level DP: give --dp-clip too")
    if not 0.0 < dp_sampling_rate <= 1.0:
        raise UsageError(f"--dp-sampling-rate must be in (0, 1], got {dp_sampling_rate}")
    # The flags' own checks (OrganisationDp, AggregateConfig) before any file is read; the
    # settings go in with the rest, so --dp-max-epsilon finds the DP it caps.
    organisation_dp = None
    if dp_clip is not None:
        assert dp_noise_multiplier is not None and dp_delta is not None
        organisation_dp = OrganisationDp(
            dp_clip, dp_noise_multiplier, dp_sampling_rate, dp_delta, max(1, len(uploads)), 0
        )
    config = AggregateConfig(
        method,
        weighting,
        max_update_norm,
        on_outlier,
        truncation,
        require_dp,
        organisation_dp=organisation_dp,
        max_epsilon=dp_max_epsilon,
        max_samples=max_samples,
        align=align_factors,
    )
    if secure and (roster_path is None or trust_dir is None):
        raise UsageError("--secure needs --roster and --trust (the sites' keys)")
    if not secure and roster_path is not None:
        raise UsageError("--roster belongs to a secure round: add --secure")
    if secure and (method not in ("fedsrd", "fedsrd-e") or config.organisation_dp is not None):
        raise UsageError(
            "a secure round runs FedSRD-e's route, without organisation-level DP (its noise would have to"
            " be added by the sites, which is not built)"
        )
    if secure and align_factors:
        raise UsageError(
            "--align-factors depends on each site's factors: not with --secure, whose sum hides them"
        )
    threads = use_threads(threads)
    algorithm = get_algorithm("fedsrd-e" if secure else method)
    signer, trust = trust_from_flags(sign_key, trust_dir)
    ensure_writable(
        out_path, force, [("--global", global_path), ("--roster", roster_path), ("the upload", uploads)]
    )
    global_state = read_verified(global_path, "state", trust)
    if secure:
        from fedsrd_cli.algorithms.secure import secure_aggregate
        from fedsrd_cli.trust.roster import read_roster

        assert trust is not None and roster_path is not None
        roster = read_roster(roster_path, trust)
        masked = [read_verified(path, "masked_upload", trust) for path in uploads]
        payload = secure_aggregate(global_state, masked, roster, replace(config, method="fedsrd-e"))
        header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
        written(
            out,
            out_path,
            header,
            {
                "method": "fedsrd-e (secure)",
                "clients": [a.header.client_id for a in masked],
                "roster": roster.hash,
                "threads": threads,
                **_privacy_summary(header),
            },
        )
        return
    artifacts = [read_verified(path, "upload", trust) for path in uploads]
    released = artifacts  # every upload given: sampling below may leave some out of the sum
    if config.organisation_dp is not None:
        check_uploads(global_state, artifacts, weighting, max_samples)  # every file, sampled or not
        aggregate_privacy(global_state, released, config)  # every site's ledger, before any work
        artifacts, config = sample_sites(artifacts, config)
    payload = algorithm.aggregate(global_state, artifacts, config, out.track)
    if config.organisation_dp is not None:
        # An upload that sampling left out was released to the coordinator all the same: its
        # round counts in its site's ledger (docs/privacy.md), so the sites' ledgers are those
        # of every upload given (which also keeps the secret sample out of them).
        privacy = aggregate_privacy(global_state, released, config)
        payload = replace(payload, header=replace(payload.header, privacy=privacy))
    header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
    if require_dp is not None and trust is None:
        out.note("note: without --trust the privacy ledgers are not authenticated (anyone could edit them)")
    decisions = header.info.get("update_norms", [])
    for d in decisions:
        if d["action"] == "clipped":
            out.note(
                f"clipped client {d['client_id']!r}: update norm {d['update_norm']:.6g} scaled by"
                f" {d['scale']:.4g} to {d['update_norm'] * d['scale']:.6g}"
            )
    written(
        out,
        out_path,
        header,
        {
            "method": method,
            "weighting": weighting,
            "clients": [a.header.client_id for a in artifacts],
            "threads": threads,
            **_privacy_summary(header),
            **({"truncation": header.info["truncation"]} if "truncation" in header.info else {}),
            **({"update_norms": decisions} if decisions else {}),
            **({"norm_guard": _norm_summary(decisions)} if decisions else {}),
        },
    )


def _privacy_summary(header: Any) -> dict[str, Any]:
    """What aggregate prints of the privacy of its round."""
    privacy = header.privacy
    out: dict[str, Any] = {}
    if "sites" in privacy:
        out["site_epsilons"] = {site: ledger["epsilon"] for site, ledger in sorted(privacy["sites"].items())}
    if "organisation_dp" in privacy:
        org = privacy["organisation_dp"]
        out["organisation_dp"] = (
            f"clip {org['clip']:g}, noise multiplier {org['noise_multiplier']:g}, sampled {org['sampled']}"
            f" of {org['population']} sites (rate {org['sampling_rate']:g}), delta {org['delta']:g}"
        )
    return out


def _norm_summary(decisions: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{d['client_id']} {d['update_norm']:.4g} {d['action']}"
        + (f" x{d['scale']:.4g}" if d["action"] == "clipped" else "")
        for d in decisions
    )


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


# Below this many columns, `status` lists one file per line instead of a six-column table.
NARROW_TERMINAL = 100


@command("status")
def status_cmd(
    inbox: Annotated[Path, typer.Argument(help="The coordinator's inbox directory of uploads.")],
    global_path: GlobalOpt,
    expect: Annotated[
        int | None, typer.Option("--expect", help="Number of uploads the round waits for.")
    ] = None,
    clients: Annotated[
        str | None, typer.Option("--clients", help="Comma-separated client ids the round waits for.")
    ] = None,
    trust_dir: TrustOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Coordinator: which uploads of this round are in INBOX, valid and signed; is the round ready?

    Uploads of earlier rounds are listed as old and do not count, nor do sealed files (listed
    with their recipients; `fedsrd open` them first). Exit codes for cron:
    0 ready to aggregate; 10 waiting (expected uploads missing, nothing invalid); 11
    invalid files present (corrupt, stale, unsigned, forged, duplicate or unexpected
    client), or with --trust a global state not signed by the coordinator. Without
    --expect/--clients, one valid upload is enough. Other errors with the flags or the
    global state keep their usual codes (2-6).
    """
    from fedsrd_cli.algorithms.round_status import read_global, round_status
    from fedsrd_cli.files.safetensors_io import short

    out = Output(json_mode)
    if expect is not None and clients is not None:
        raise UsageError("give --expect or --clients, not both")
    if expect is not None and expect < 1:
        raise UsageError("--expect must be >= 1")
    client_list = None
    if clients is not None:
        client_list = [check_client_id(c.strip()) for c in clients.split(",") if c.strip()]
        if not client_list:
            raise UsageError("--clients names no client")
    if not inbox.is_dir():
        raise UsageError(f"{inbox}: not a directory")
    _, trust = trust_from_flags(None, trust_dir)
    report, code = round_status(inbox, read_global(global_path, trust), trust, expect, client_list)
    rows = []
    for f in report["files"]:
        signer = f["signer"] or "-"
        if f["signer"] and not f["signature_verified"]:
            signer += " (unverified)"
        # The text says what --json says; a kind is added where it is not a plain upload.
        if f["status"] == "sealed":
            status = f"sealed (for {', '.join(f['sealed_for'])})"
        elif f["status"] == "ignored":
            status = f"ignored ({f['kind']})"
        elif f["kind"] == "masked_upload":  # a secure round's upload: counted as a plain one is
            status = f"{f['status']} (masked)"
        else:
            status = f["status"]
        round_text = "-" if f["round"] is None else str(f["round"])
        rows.append(
            (Path(f["path"]).name, status, f["client_id"] or "-", round_text, signer, f["problem"] or "")
        )
    if out.out.width < NARROW_TERMINAL:  # a table of six columns would cut the names into slivers
        table: Any = key_value_table(
            (
                name,
                f"{status}; client {client}, round {rnd}, signer {signer}"
                + (f"; {problem}" if problem else ""),
            )
            for name, status, client, rnd, signer, problem in rows
        )
    else:
        table = data_table("file", "status", "client", "round", "signer", "problem")
        for row in rows:
            table.add_row(*row)
    summary = key_value_table(
        [
            ("round", f"{report['round']} (global {short(report['global_hash'])})"),
            ("present", ", ".join(report["present_clients"]) or "-"),
            (
                "missing",
                ", ".join(report["missing_clients"])
                or (str(report["waiting_for"]) if report["waiting_for"] else "-"),
            ),
            ("invalid files", report["invalid_files"]),
            *([("old files", f"{report['old_files']} (earlier rounds)")] if report["old_files"] else []),
            *(
                [("sealed files", f"{report['sealed_files']} (not counted: `fedsrd open` them first)")]
                if report["sealed_files"]
                else []
            ),
            ("status", report["status"]),
        ]
    )
    out.result(report, table, summary)
    if code:
        raise typer.Exit(code)
