"""Commands on any file: inspect, unpack, sign, seal, open."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import ForceOpt, JsonOpt, OutOpt, TrustOpt, trust_from_flags
from fedsrd_cli.cli.render import worst, written
from fedsrd_cli.errors import ArtifactError
from fedsrd_cli.output import Output, data_table, human_bytes, key_value_table


@command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Any safetensors file: a fedsrd artifact, or any other.")],
    json_mode: JsonOpt = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    trust_dir: TrustOpt = None,
) -> None:
    """Show what a file is: for a fedsrd artifact its kind, round, lineage, client, sizes and
    traffic against dense; for any other safetensors file its tensors, shapes and dtypes, and
    the PEFT adapter_config.json beside it.

    Shows who signed an artifact; with --trust the signature is verified (any trusted party
    may have signed it, but an upload only by the client it names).
    """
    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    report = _inspect_file(path, trust)
    if report["kind"] is None:
        out.result(report, *_plain_view(report, tensors))
    else:
        out.result(report, *_artifact_view(report, tensors))


PLAIN_TENSORS_SHOWN = 20


def _inspect_file(path: Path, trust: Any) -> dict[str, Any]:
    """What `inspect` reports on any safetensors file: `describe` for a fedsrd artifact
    (with its signature), `describe_plain` for any other file.

    With `trust`, the file must be a fedsrd artifact signed by a trusted party (an upload
    by the client it names); a plain safetensors file carries no signature and is refused.
    """
    from fedsrd_cli.files.describe import describe, describe_plain, is_artifact
    from fedsrd_cli.trust.signing import describe_signature, read_verified

    if trust is None and not is_artifact(path):
        return describe_plain(path)
    report = describe(read_verified(path, None, trust, accept=tuple(trust.keys) if trust else None))
    report["signature"] = describe_signature(path, verified=trust is not None)
    return report


def _artifact_view(report: dict[str, Any], tensors: bool) -> list[Any]:
    """inspect's tables for a fedsrd artifact."""
    from fedsrd_cli.files.safetensors_io import short

    kind = report["kind"]
    if kind == "state":
        kind = f"{report['state_role']} state"
    if report["method"]:
        kind += f" ({report['method']})"
    round_text = str(report["round"])
    if report.get("state_role") == "local":
        round_text += (
            f" (trained from the round-{report['round']} global state; its upload is round"
            f" {report['round'] + 1})"
        )
    rows = [
        ("file", report["path"]),
        ("kind", kind),
        ("round", round_text),
        ("content hash", short(report["content_hash"])),
        ("parent", short(report["parent_hash"] or "")),
        ("base model", short(report["base_fingerprint"])),
        (
            "lora",
            f"r={report['lora']['r']}, alpha={report['lora']['lora_alpha']:g}, "
            f"targets={','.join(report['lora']['target_modules'])}",
        ),
        ("modules", report["modules"]),
    ]
    if "client_id" in report:
        rows.append(("client id", report["client_id"] or "- (not recorded)"))
    if "num_samples" in report:
        rows.append(("num samples", report["num_samples"] or "0 (not recorded)"))
    if "trained_at" in report:
        trained = report["trained_at"]
        base = trained["base_quantization"]
        shown = "full precision (none)" if base == "none" else f"{base} (bitsandbytes)"
        rank = f"rank {trained['rank']}"
        if trained["rank"] != trained["global_rank"]:
            rank += f" of the global {trained['global_rank']}"
        rows.append(("trained at", f"{rank}, base {shown}"))
    for key in ("seed", "download_sparsity"):
        if key in report:
            rows.append((key.replace("_", " "), report[key]))
    if "result_hash" in report:
        rows.append(("result state", short(report["result_hash"])))
    rows += _broadcast_rows(report.get("info", {}) if report["kind"] == "broadcast" else {})
    rows += _values_rows(report.get("info", {}).get("value_dtype") if report["kind"] == "upload" else None)
    rows += _aggregate_rows(report.get("info", {}) if report["kind"] == "aggregate" else {})
    rows += _fidelity_rows(report.get("info", {}))
    rows += _privacy_rows(report.get("privacy"))
    signature = report["signature"]
    if signature is None:
        rows.append(("signed by", "-"))
    else:
        checked = "verified" if signature["verified"] else "not verified: pass --trust"
        rows.append(("signed by", f"{signature['signer']} ({checked})"))
    rows.append(("bytes on disk", f"{report['bytes_on_disk']:,} ({human_bytes(report['bytes_on_disk'])})"))
    rows.append(("paper accounting", human_bytes(report["paper_bytes"])))
    if report["dense_fp32_bytes"]:
        rows.append(("dense fp32", human_bytes(report["dense_fp32_bytes"])))
        rows.append(
            (
                "ratio to dense",
                f"{report['ratio_to_dense']:.2%} on disk, "
                f"{report['paper_ratio_to_dense']:.2%} paper accounting",
            )
        )
    renderables: list[Any] = [key_value_table(rows)]
    if tensors:
        table = data_table("shape", "nonzeros", "density", "tensor", box=None)
        for t in report["tensors"]:
            density = "" if t["density"] is None else f"{t['density']:.2%}"
            table.add_row("x".join(map(str, t["shape"])), f"{t['nonzeros']:,}", density, t["name"])
        renderables.append(table)
    return renderables


def _plain_view(report: dict[str, Any], tensors: bool) -> list[Any]:
    """inspect's tables for a safetensors file that is not a fedsrd artifact."""
    from fedsrd_cli.files.safetensors_io import short

    dtypes = ", ".join(f"{dtype} x{count}" for dtype, count in sorted(report["dtypes"].items()))
    rows: list[tuple[str, Any]] = [
        ("file", report["path"]),
        ("kind", f"not a fedsrd artifact: {report['what']}"),
        ("tensors", f"{report['tensor_count']:,} ({report['parameters']:,} values; {dtypes or '-'})"),
    ]
    lineage = report.get("exported_from")
    if lineage is not None:
        rows.append(
            (
                "exported from",
                f"state {short(lineage['content_hash'])}, round {lineage['round']}"
                f" (recorded in {lineage['recorded_in']})",
            )
        )
    if "unpacked_from" in report:
        source = report["unpacked_from"]
        rows.append(("unpacked from", f"{source['kind']} {short(source['content_hash'] or '')}"))
    config = report.get("peft_config")
    if config is not None:
        if "error" in config:
            rows.append(("peft config", f"{config['path']}: {config['error']}"))
        else:
            targets = config["target_modules"]
            targets = ",".join(sorted(targets)) if isinstance(targets, list) else targets
            rows.append(
                (
                    "peft config",
                    f"{config['peft_type']}, r={config['r']}, alpha={config['lora_alpha']},"
                    f" targets={targets}, base={config['base_model_name_or_path'] or '-'}",
                )
            )
    other = sorted(k for k in report["metadata"] if k != "format" and not k.startswith("fedsrd."))
    if other:
        rows.append(("metadata", ", ".join(other)))
    rows.append(("bytes on disk", f"{report['bytes_on_disk']:,} ({human_bytes(report['bytes_on_disk'])})"))
    shown = report["tensors"] if tensors else report["tensors"][:PLAIN_TENSORS_SHOWN]
    if len(shown) < report["tensor_count"]:
        rows.append(
            ("listed", f"the first {len(shown)} tensors (--tensors lists all {report['tensor_count']:,})")
        )
    table = data_table("shape", "dtype", "tensor", box=None)
    for t in shown:
        table.add_row("x".join(map(str, t["shape"])) or "scalar", t["dtype"], t["name"])
    return [key_value_table(rows), table]


def _broadcast_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """inspect's lines on how a broadcast was solved and how well it fits its target."""
    rows = []
    if "download_fit" in info:
        choice, damping = info["factor_choice"], info["damping"]
        rows.append(("download", f"fit {info['download_fit']}, factor choice {choice}, damping {damping:g}"))
    rows += _values_rows(info.get("value_dtype"))
    if "server_lr" in info:
        rows.append(("server lr", f"{info['server_lr']:g}: every factor update sent is scaled by it"))
    set_by = info.get("step_calibration", {})
    if "extrapolation" in set_by:
        eta, target = set_by["extrapolation"], set_by["target"]
        rows.append(("", f"FedExP's extrapolation {eta:g} times --server-lr {target:g}"))
    if "upload_gain" in set_by:
        rows.append(("", f"divided by the uploads' gain {set_by['upload_gain']:g}"))
    if "update_error" in info:
        error = info["update_error"]
        rows.append(("update error", f"{error['overall']:.4g} overall; worst {worst(error['modules'])}"))
    if info.get("update_step", {}).get("factors"):
        rows.append(("largest step", worst(info["update_step"]["factors"])))
    return rows


def _values_rows(value_dtype: Any) -> list[tuple[str, str]]:
    """inspect's line on how an upload's or broadcast's values are stored (None: no line; an
    upload records info.value_dtype only when its values are quantized)."""
    if value_dtype in ("int8", "int4"):
        from fedsrd_cli.math.quantize import BLOCK

        return [("values", f"{value_dtype}: block-quantized codes, a float32 scale per {BLOCK} values")]
    return [] if value_dtype is None else [("values", str(value_dtype))]


def _aggregate_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """inspect's lines on how an aggregate stores its sum (what --json has in `info` too)."""
    if info.get("aligned"):
        return [("factors", "aligned to the clients' own factors (--align-factors), not the truncated SVD's")]
    return []


def _fidelity_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """inspect's lines on how well uploads carry their sites' exact updates (docs/algorithms.md)."""
    from fedsrd_cli.algorithms.diagnostics import fidelity_line

    rows = []
    if "fidelity" in info:
        rows.append(("reconstructs", fidelity_line(info["fidelity"])))
    if "update_sketch" in info:
        width = info["update_sketch"].get("width")
        rows.append(
            ("update sketch", f"{width} numbers (sparsify --update-sketch, for the coordinator's step)")
        )
    if "upload_fidelity" in info:
        mean = info["upload_fidelity"]
        rows.append(("uploads carry", f"{fidelity_line(mean)} (weighted mean of the sites' own figures)"))
        for client, record in mean["clients"].items():
            rows.append(("", f"{client}: {fidelity_line(record)}"))
    if "update_spread" in info:
        spread = info["update_spread"]
        ratio = spread["mean_sq"] / spread["client_sq"] if spread["client_sq"] > 0 else 0.0
        rows.append(
            (
                "update spread",
                f"the sites' mean update has {ratio:.3g} of their own squared norm"
                f" ({spread.get('source', 'uploads')}); FedExP's extrapolation {spread['extrapolation']:g}",
            )
        )
        if "target" in spread:
            target = spread["target"]
            rows.append(
                ("target fidelity (estimated)", f"{fidelity_line(target)}, against the sites' mean update")
            )
    return rows


def _privacy_rows(privacy: dict[str, Any] | None) -> list[tuple[str, str]]:
    """inspect's lines on the privacy ledgers: each epsilon as recorded and as recomputed."""
    if not privacy:
        return []

    def line(ledger: dict[str, Any]) -> str:
        recorded, recomputed = ledger["epsilon"], ledger["recomputed_epsilon"]
        shown = "inf" if recorded is None else f"{recorded:.4g}"
        again = "inf" if recomputed is None else f"{recomputed:.4g}"
        verdict = "agrees" if ledger["agrees"] else "DOES NOT AGREE"
        rounds = [r["round"] for r in ledger["rounds"]]
        return (
            f"epsilon {shown} at delta {ledger['delta']:.3g}, rounds {rounds} ({ledger['accountant']};"
            f" recomputed {again}: {verdict})"
        )

    rows = []
    if "record_level" in privacy:
        rows.append(
            ("DP, record level", f"{privacy['record_level']['party']}: {line(privacy['record_level'])}")
        )
    for site, ledger in privacy.get("sites", {}).items():
        rows.append(("DP, site ledger", f"{site}: {line(ledger)}"))
    if "organisation_level" in privacy:
        rows.append(("DP, organisation", line(privacy["organisation_level"])))
    if "organisation_dp" in privacy:
        org = privacy["organisation_dp"]
        rows.append(
            (
                "DP, this round",
                f"clip {org['clip']:g}, noise multiplier {org['noise_multiplier']:g}, {org['sampled']} of"
                f" {org['population']} sites sampled at rate {org['sampling_rate']:g}",
            )
        )
    return rows


@command("unpack")
def unpack_cmd(
    path: Annotated[Path, typer.Argument(help="Any fedsrd artifact.")],
    out_path: OutOpt,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Write an artifact as plain dense tensors (deltas under PEFT names for uploads/broadcasts)."""
    from safetensors.torch import save

    from fedsrd_cli.files.atomic import ensure_writable, write_bytes_atomic
    from fedsrd_cli.files.describe import dense_tensors
    from fedsrd_cli.trust.signing import read_verified

    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    ensure_writable(out_path, force, [("the file", path)])
    artifact = read_verified(path, None, trust, accept=tuple(trust.keys) if trust else None)
    tensors = dense_tensors(artifact)
    metadata = {
        "format": "pt",
        "fedsrd.unpacked_from": artifact.header.kind,
        "fedsrd.source_hash": artifact.header.content_hash,
        "fedsrd.round": str(artifact.header.round),
    }
    write_bytes_atomic(out_path, save(tensors, metadata=metadata), force)
    size = out_path.stat().st_size
    out.result(
        {
            "path": str(out_path),
            "tensors": len(tensors),
            "bytes": size,
            "source_kind": artifact.header.kind,
        },
        key_value_table([("wrote", f"{out_path} ({len(tensors)} dense tensors, {human_bytes(size)})")]),
    )


@command("sign")
def sign_cmd(
    path: Annotated[Path, typer.Argument(help="The fedsrd artifact to sign.")],
    sign_key: Annotated[
        Path,
        typer.Option("--sign-key", help="Your private key (NAME.key from `fedsrd keygen`); signs as NAME."),
    ],
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write the signed copy here (default: sign FILE in place).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace an existing --out, or a signature by another party (or another key)."
        ),
    ] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Sign an existing artifact as party NAME: in place (atomically), or into --out.

    The tensors and the content hash do not change. An upload may be signed only by the
    client it names; a file signed by someone else is refused unless --force.
    """
    from fedsrd_cli.trust.signing import SigningKey, sign_file

    out = Output(json_mode)
    signer = SigningKey.load(sign_key)
    signed = sign_file(path, signer, out_path, force)
    written(
        out,
        signed.path,
        signed.header,
        {
            "signed_by": signer.name,
            "key_id": signer.key_id,
            **({"replaced_signature_of": signed.replaced} if signed.replaced else {}),
        },
    )


@command("seal")
def seal_cmd(
    path: Annotated[Path, typer.Argument(help="The file to seal (any fedsrd file, signed or not).")],
    to: Annotated[str, typer.Option("--to", help="Comma-separated parties who may open it.")],
    trust_dir: Annotated[
        Path, typer.Option("--trust", help="Trust directory with their NAME.agreement files.")
    ],
    out_path: OutOpt,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Seal a file for the parties it is for: a lost copy (a USB stick) reveals nothing.

    The file keeps its signature inside; `fedsrd open` gives it back byte for byte.
    """
    from fedsrd_cli.cli.options import sealing_keys
    from fedsrd_cli.files.atomic import ensure_writable, write_bytes_atomic
    from fedsrd_cli.trust.sealed import seal

    out = Output(json_mode)
    recipients = sealing_keys(to, trust_dir)
    ensure_writable(out_path, force, [("the file", path)])
    write_bytes_atomic(out_path, seal(_read(path), recipients), force)
    out.result(
        {"path": str(out_path), "sealed_for": sorted(recipients), "bytes": out_path.stat().st_size},
        key_value_table([("wrote", f"{out_path} (sealed)"), ("for", ", ".join(sorted(recipients)))]),
    )


@command("open")
def open_cmd(
    path: Annotated[Path, typer.Argument(help="A sealed file.")],
    agreement_key: Annotated[
        Path, typer.Option("--agreement-key", help="Your NAME.agreement.key (`fedsrd agreement-key`).")
    ],
    out_path: OutOpt,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Open a file sealed for you: writes the plain file, its signature intact (check it with --trust
    when you use it)."""
    from fedsrd_cli.files.atomic import ensure_writable, write_bytes_atomic
    from fedsrd_cli.trust.agreement import AgreementKey
    from fedsrd_cli.trust.sealed import open_sealed

    out = Output(json_mode)
    key = AgreementKey.load(agreement_key)
    ensure_writable(out_path, force, [("the file", path)])
    write_bytes_atomic(out_path, open_sealed(_read(path), key, str(path)), force)
    out.result(
        {"path": str(out_path), "opened_by": key.party, "bytes": out_path.stat().st_size},
        key_value_table([("wrote", f"{out_path} (opened by {key.party})")]),
    )


def _read(path: Path) -> bytes:
    """A whole file's bytes; ArtifactError (exit 3) when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path}: cannot be read ({err.strerror or err})") from None
