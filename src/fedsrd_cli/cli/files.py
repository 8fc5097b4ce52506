"""Commands on any file: inspect, unpack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import ForceOpt, JsonOpt, OutOpt, TrustOpt, trust_from_flags
from fedsrd_cli.cli.render import worst
from fedsrd_cli.output import Output, human_bytes, key_value_table


@command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Any fedsrd artifact.")],
    json_mode: JsonOpt = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    trust_dir: TrustOpt = None,
) -> None:
    """Show an artifact's kind, round, lineage, modules, sizes and traffic against dense.

    Shows who signed it; with --trust the signature is verified (any trusted party may
    have signed it, but an upload only by the client it names).
    """
    from fedsrd_cli.artifacts import short
    from fedsrd_cli.describe import describe
    from fedsrd_cli.signing import describe_signature, read_verified

    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    report = describe(read_verified(path, None, trust, accept=tuple(trust.keys) if trust else None))
    report["signature"] = describe_signature(path, verified=trust is not None)
    rows = [
        ("file", report["path"]),
        ("kind", f"{report['kind']}" + (f" ({report['method']})" if report["method"] else "")),
        ("round", report["round"]),
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
    for key in ("client_id", "num_samples", "seed", "download_sparsity"):
        if key in report:
            rows.append((key.replace("_", " "), report[key]))
    if "result_hash" in report:
        rows.append(("result state", short(report["result_hash"])))
    rows += _broadcast_rows(report.get("info", {}) if report["kind"] == "broadcast" else {})
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
        from rich.table import Table

        table = Table("shape", "nonzeros", "density", "tensor", box=None)
        table.columns[3].overflow = "fold"
        for t in report["tensors"]:
            density = "" if t["density"] is None else f"{t['density']:.2%}"
            table.add_row("x".join(map(str, t["shape"])), f"{t['nonzeros']:,}", density, t["name"])
        renderables.append(table)
    out.result(report, *renderables)


def _broadcast_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """inspect's lines on how a broadcast was solved and how well it fits its target."""
    rows = []
    if "download_fit" in info:
        choice, damping = info["factor_choice"], info["damping"]
        rows.append(("download", f"fit {info['download_fit']}, factor choice {choice}, damping {damping:g}"))
    if "update_error" in info:
        error = info["update_error"]
        rows.append(("update error", f"{error['overall']:.4g} overall; worst {worst(error['modules'])}"))
    if info.get("update_step", {}).get("factors"):
        rows.append(("largest step", worst(info["update_step"]["factors"])))
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

    from fedsrd_cli.artifacts import ensure_writable, write_bytes_atomic
    from fedsrd_cli.describe import dense_tensors
    from fedsrd_cli.signing import read_verified

    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    ensure_writable(out_path, force)
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
