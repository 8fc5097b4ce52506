"""The coordinator's status: which uploads of this round are in its inbox, valid and signed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import GlobalOpt, JsonOpt, TrustOpt, check_client_id, trust_from_flags
from fedsrd_cli.errors import UsageError
from fedsrd_cli.output import Output, data_table, key_value_table

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
