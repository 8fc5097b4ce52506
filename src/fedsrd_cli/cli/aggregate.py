"""The coordinator's aggregate, and what it prints of the round's privacy and update norms."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    METHODS_HELP,
    ForceOpt,
    GlobalOpt,
    JsonOpt,
    OutOpt,
    SignKeyOpt,
    ThreadsOpt,
    TrustOpt,
    sign_with,
    trust_from_flags,
)
from fedsrd_cli.cli.render import written
from fedsrd_cli.errors import UsageError
from fedsrd_cli.output import Output


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
    rank_padding: Annotated[
        str,
        typer.Option(
            "--rank-padding",
            help="Uploads of a site rank below the global one (train-local --rank): global (the"
            " untrained components are the global state's: exact) or zeros (HetLoRA's zero padding).",
        ),
    ] = "global",
    update_spread: Annotated[
        bool,
        typer.Option(
            "--update-spread",
            help="Record the norms of the sites' updates and of their mean, which broadcast --step-rule"
            " fedexp reads (sparsified uploads: from their --update-sketch; about m^2 (d_out + d_in) r^2"
            " flops per module for m sites; --secure: from the masked totals of a roster made with"
            " --update-spread).",
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
    from fedsrd_cli.math.threads import thread_map, use_threads
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
        rank_padding=rank_padding,
        update_spread=update_spread,
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
    if secure and rank_padding != "global":
        raise UsageError(
            "--rank-padding zeros needs each site's factors: not with --secure, whose sum hides them"
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
    # Each upload's hash and coded positions are checked on its own: as many at once as threads.
    artifacts = list(thread_map(lambda path: read_verified(path, "upload", trust), uploads))
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
