"""The state of a coordinator's inbox: which uploads are there, valid, signed, and is the round ready.

Used by `fedsrd status` (and cron jobs around it). Every upload of the round being
collected is checked exactly as `aggregate` would check it, but a bad file is reported
instead of stopping the scan. Uploads of earlier rounds (an inbox that keeps every round's
files) are listed as "old" and otherwise left alone; other kinds are "ignored". A sealed file
(`sparsify --encrypt-to coordinator`) is "sealed", with its recipients: what it holds cannot be
checked until it is opened (`fedsrd open`), so it counts toward nothing, and is not invalid.

Exit codes of `fedsrd status` (also in errors.py):
    0   ready: every expected upload is present and valid, and nothing invalid lies beside them
    10  waiting: no invalid file, but expected uploads are missing
    11  invalid files present (corrupt, stale, wrong run, unsigned/forged, duplicate or unexpected
        client), or, with --trust, a global state that is not signed by the coordinator
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedsrd_cli.algorithms.protocol import check_uploads
from fedsrd_cli.errors import FedsrdError, RoundInvalidError, StaleUploadError, TrustError
from fedsrd_cli.files.artifacts import Artifact, read_artifact
from fedsrd_cli.files.safetensors_io import SEALED_MAGIC
from fedsrd_cli.trust.sealed import MAX_HEADER, is_sealed, recipients_of
from fedsrd_cli.trust.signing import Trust, check_signer, read_signature, read_verified

EXIT_READY = 0
EXIT_WAITING = 10
EXIT_INVALID = 11


@dataclass
class InboxFile:
    """One `*.safetensors` file of the inbox. status: valid | invalid | stale | old | sealed | ignored.

    old: an upload of an earlier round than the one being collected (not checked further);
    stale: an upload that claims this round or a later one but was made from another state;
    sealed: a sealed file (trust/sealed.py), for `sealed_for` (the only thing it shows unopened).
    """

    path: str
    status: str
    kind: str | None = None
    client_id: str | None = None
    round: int | None = None
    signer: str | None = None
    signature_verified: bool = False
    problem: str | None = None
    sealed_for: list[str] | None = None


# A secure round's masked uploads wait in the inbox as plain uploads do.
UPLOAD_KINDS = ("upload", "masked_upload")


def _earlier_upload(path: Path, round_index: int) -> InboxFile | None:
    """An entry "old" for a readable upload of a round before `round_index`, else None."""
    try:
        head = read_artifact(path, verify=False).header
    except FedsrdError:
        return None  # unreadable: the full check reports it
    if head.kind not in UPLOAD_KINDS or head.round >= round_index:
        return None
    return InboxFile(str(path), "old", head.kind, head.client_id, head.round, signer=_claimed_signer(path))


def _sealed_file(path: Path) -> InboxFile | None:
    """An entry "sealed" for a sealed file (its recipients), "invalid" for a damaged one; None when
    the file is not sealed."""
    try:
        with path.open("rb") as handle:
            start = handle.read(len(SEALED_MAGIC))
            if not is_sealed(start):
                return None
            data = start + handle.read(4 + MAX_HEADER)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None  # unreadable: the full check reports it
    try:
        entries, _, _ = recipients_of(data, str(path), size)
    except FedsrdError as err:
        return InboxFile(str(path), "invalid", problem=str(err))
    return InboxFile(str(path), "sealed", sealed_for=[e["party"] for e in entries])


def _inspect_file(path: Path, global_state: Artifact, trust: Trust | None) -> InboxFile:
    sealed = _sealed_file(path)
    if sealed is not None:
        return sealed
    old = _earlier_upload(path, global_state.header.round + 1)
    if old is not None:
        return old
    entry = InboxFile(str(path), "invalid")
    try:
        if trust is not None:
            entry.signer = trust.verify_file(path)
            entry.signature_verified = True
        else:
            entry.signer = _claimed_signer(path)
        artifact = read_artifact(path)
        head = artifact.header
        entry.kind, entry.round = head.kind, head.round
        if head.kind not in UPLOAD_KINDS:
            entry.status = "ignored"
            return entry
        entry.client_id = head.client_id
        if trust is not None and entry.signer is not None:
            check_signer(artifact, entry.signer)
        check_uploads(global_state, [artifact], "uniform")
    except StaleUploadError as err:
        entry.status, entry.problem = "stale", str(err)
        return entry
    except FedsrdError as err:
        entry.problem = str(err)
        return entry
    entry.status = "valid"
    return entry


def _claimed_signer(path: Path) -> str | None:
    """The signer a file names, unverified (no --trust); None when unsigned or unreadable."""
    try:
        found = read_signature(path)
    except FedsrdError:
        return None
    return found.signer if found else None


def read_global(path: Path, trust: Trust | None) -> Artifact:
    """The global state for `status`; with --trust, one the coordinator did not sign is
    RoundInvalidError (exit 11, as for an untrusted upload), so cron sees one of status's codes."""
    try:
        return read_verified(path, "state", trust)
    except TrustError as err:
        raise RoundInvalidError(f"{err} (status cannot vouch for this round's uploads)") from None


def round_status(
    inbox: Path,
    global_state: Artifact,
    trust: Trust | None = None,
    expect: int | None = None,
    clients: Sequence[str] | None = None,
) -> tuple[dict[str, Any], int]:
    """Scan `inbox` for the round after `global_state`: (report, exit code)."""
    files = [p for p in sorted(inbox.glob("*.safetensors")) if not p.name.startswith(".") and p.is_file()]
    entries = [_inspect_file(p, global_state, trust) for p in files]
    by_client: dict[str, list[InboxFile]] = {}
    for entry in entries:
        if entry.status == "valid" and entry.client_id:
            by_client.setdefault(entry.client_id, []).append(entry)
    for client_id, same in by_client.items():
        if len(same) > 1:
            for entry in same:
                entry.status = "invalid"
                entry.problem = f"client {client_id!r} has {len(same)} uploads in this inbox; keep one"
        elif clients is not None and client_id not in clients:
            same[0].status = "invalid"
            same[0].problem = f"client {client_id!r} is not among the expected clients"
    valid = [e for e in entries if e.status == "valid"]
    present = sorted(e.client_id for e in valid if e.client_id)
    if clients is not None:
        missing = sorted(set(clients) - set(present))
        waiting_for = len(missing)
    else:
        missing = []
        waiting_for = max(0, (expect if expect is not None else 1) - len(valid))
    invalid = [e for e in entries if e.status in ("invalid", "stale")]
    old = [e for e in entries if e.status == "old"]
    sealed = [e for e in entries if e.status == "sealed"]
    ready = not invalid and waiting_for == 0
    code = EXIT_INVALID if invalid else (EXIT_READY if ready else EXIT_WAITING)
    report = {
        "inbox": str(inbox),
        "round": global_state.header.round + 1,
        "global": str(global_state.path),
        "global_hash": global_state.header.content_hash,
        "files": [asdict(e) for e in entries],
        "valid_uploads": [e.path for e in valid],
        "present_clients": present,
        "missing_clients": missing,
        "waiting_for": waiting_for,
        "invalid_files": len(invalid),
        "old_files": len(old),
        "sealed_files": len(sealed),
        "ready": ready,
        "status": {EXIT_READY: "ready", EXIT_WAITING: "waiting", EXIT_INVALID: "invalid"}[code],
        "exit_code": code,
    }
    return report, code
