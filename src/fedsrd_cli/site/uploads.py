"""A client's upload from its trained adapter: what `sparsify` checks before Algorithm.upload.

Algorithm.upload (through algorithms.protocol.check_local) checks that a local fedsrd state
was trained from the global state given (its parent hash) and has its tensors. This module
adds what only the client side can know, before any work:

- a local state names the client that trained it (`train-local --client`): sparsify refuses
  another --client, so an upload is never relabelled as someone else's;
- a local state keeps the round of the global state it was trained from: a state of another
  round (say, the next global state) is refused even though its parent is the global state;
- an adapter that began as `fedsrd export --global G` records G's content hash (in the
  weights' metadata, or in fedsrd_lineage.json beside them, which stays when PEFT saves the
  trained adapter into the exported folder): it must be the global state given. A raw export
  of the round-1 state given with the round-0 state is refused; an adapter with no record
  (trained elsewhere) is accepted as before;
- a bare PEFT weights file without adapter_config.json takes the global state's LoRA
  settings when every tensor name and shape matches (adapters.read_local).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.base import Payload, Track, no_progress
from fedsrd_cli.algorithms.secure import SecureFloor, masked_upload
from fedsrd_cli.config import SparsifyConfig
from fedsrd_cli.errors import MismatchError, StaleUploadError, TrustError, UsageError
from fedsrd_cli.files.adapters import LocalAdapter, read_local
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.files.atomic import FileWrite
from fedsrd_cli.files.safetensors_io import short
from fedsrd_cli.trust.agreement import AgreementKey, published_key
from fedsrd_cli.trust.roster import Roster

if TYPE_CHECKING:
    from fedsrd_cli.trust.signing import Trust


def check_local_origin(global_state: Artifact, local: LocalAdapter, client: str) -> None:
    """The client, round and export lineage rules above (MismatchError / StaleUploadError)."""
    head = local.header
    where = str(local.path)
    if head is not None:
        if head.client_id and head.client_id != client:
            raise MismatchError(
                f"{where}: is the local state of client {head.client_id!r} (recorded by train-local"
                f" --client); --client is {client!r}. Sparsify it as {head.client_id!r}, or train"
                f" again as {client!r}"
            )
        if head.round != global_state.header.round and head.parent_hash == global_state.header.content_hash:
            raise MismatchError(
                f"{where}: is a round-{head.round} state made from {global_state.path}, not a local state"
                f" trained from it (a local state keeps its global state's round,"
                f" {global_state.header.round}); give the output of train-local"
            )
    lineage = local.lineage
    if lineage is not None and lineage.exported_from != global_state.header.content_hash:
        raise StaleUploadError(
            f"{where}: started as the export of state {short(lineage.exported_from)} (round"
            f" {lineage.round}, recorded in {lineage.source}), not of {global_state.path} (round"
            f" {global_state.header.round}, {short(global_state.header.content_hash)}); train from an"
            f" export of the global state given"
        )


def make_upload(
    global_state: Artifact,
    local_path: str | os.PathLike,
    client: str,
    samples: int | None,
    method: str,
    config: SparsifyConfig,
    track: Track = no_progress,
) -> tuple[Payload, int]:
    """Read the trained adapter, check where it comes from, and build the upload.

    samples: the training sample count; None takes the local state's. Returns the upload
    and the sample count it records.
    """
    local = read_local(local_path, like=global_state)
    check_local_origin(global_state, local, client)
    if samples is None:
        samples = local.header.num_samples if local.header else 0
    payload = get_algorithm(method).upload(global_state, local, client, samples, config, track)
    return payload, samples


def roster_keys(
    trust: Trust, roster: Roster, client: str, key: AgreementKey, key_name: str
) -> dict[str, bytes]:
    """{site: its published X25519 key} for every roster site and `client`; TrustError when `key`
    (named `key_name` in the message) is not the one `client` published."""
    published = {site: published_key(trust, site) for site in {*roster.sites, client}}
    if published[client] != key.public:
        raise TrustError(f"{key_name} is not the key {client!r} published in {trust.directory}")
    return published


def make_masked_upload(
    global_state: Artifact,
    local_path: str | os.PathLike,
    client: str,
    samples: int | None,
    roster: Roster,
    key: AgreementKey,
    published: Mapping[str, bytes],
    accepts: SecureFloor,
    carried: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Payload, int, dict[str, torch.Tensor]]:
    """A secure round's masked upload (algorithms.secure), after the same origin checks as a
    plain upload's, and what it leaves for the next round (empty at density 1). The site refuses
    (MismatchError) a roster below its own floor: fewer sites, a lower density or narrower words
    than `accepts` allows."""
    accepts.check(roster)
    if key.party != client:
        raise UsageError(f"--agreement-key is {key.party!r}'s, not {client!r}'s")
    local = read_local(local_path, like=global_state)
    check_local_origin(global_state, local, client)
    if samples is None:
        samples = local.header.num_samples if local.header else 0
    payload, left = masked_upload(global_state, local, client, samples, roster, key, published, carried)
    return payload, samples, left


@dataclass(frozen=True)
class SecureFiles:
    """A secure upload's inputs beside the states: the signed roster, this site's X25519 key,
    and its residual files (what the last secure upload left out; where to keep this one's)."""

    roster: Path
    agreement_key: Path
    residual_in: Path | None = None
    residual_out: Path | None = None


def secure_upload(
    global_state: Artifact,
    local_path: str | os.PathLike,
    client: str,
    samples: int | None,
    files: SecureFiles,
    trust: Trust,
    floor: SecureFloor,
) -> tuple[Payload, int, FileWrite | None]:
    """`sparsify --secure`: the masked upload, its sample count, and the residual file to write
    with it (None without --residual-out). A roster below density 1 needs --residual-out:
    without it, what the public positions leave out would be lost for good (UsageError)."""
    from fedsrd_cli.algorithms.secure import carried_residual, next_residual
    from fedsrd_cli.files.residual import read_residual, residual_write
    from fedsrd_cli.trust.roster import read_roster

    key = AgreementKey.load(files.agreement_key)
    if key.party != client:
        raise UsageError(f"--agreement-key {files.agreement_key} is {key.party!r}'s, not {client!r}'s")
    roster = read_roster(files.roster, trust)
    if roster.density < 1.0 and files.residual_out is None:
        raise UsageError(
            f"the roster sends {roster.density:g} of each projection; keep the rest for your next"
            " round with --residual-out FILE (and pass it as --residual-in then)"
        )
    published = roster_keys(trust, roster, client, key, f"--agreement-key {files.agreement_key}")
    carried = None
    if files.residual_in is not None:
        where = f"--residual-in {files.residual_in}"
        carried = carried_residual(read_residual(files.residual_in), global_state, client, where)
    payload, samples, left = make_masked_upload(
        global_state, local_path, client, samples, roster, key, published, floor, carried
    )
    if files.residual_out is None:
        return payload, samples, None
    return payload, samples, residual_write(files.residual_out, next_residual(global_state, client, left))
