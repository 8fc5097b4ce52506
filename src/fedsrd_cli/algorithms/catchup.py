"""Catching up: a client that missed rounds applies the broadcasts it missed, in order.

Each broadcast names the state it updates (parent_hash) and the state it yields
(result_hash), so a chain G_t -> BC_{t+1} -> ... -> BC_{t+k} either links up exactly
or names the first round that is missing or out of order. The result is bit-identical
to the coordinator's global state of the last round (apply_update runs the same
function on the same bits). The other way to catch up is to take the coordinator's
global state file itself (verified with --trust).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from fedsrd_cli.algorithms.base import Payload
from fedsrd_cli.algorithms.protocol import apply_broadcast, describe_state
from fedsrd_cli.errors import StaleUploadError, UsageError
from fedsrd_cli.files.artifacts import Artifact, Header
from fedsrd_cli.files.safetensors_io import content_hash, short


class MemoryState:
    """An intermediate global state held in memory; reads like a state Artifact."""

    def __init__(self, label: str, header: Header, tensors: dict[str, torch.Tensor]):
        self.path = Path(label)
        self.header = header
        self._tensors = tensors
        self.shapes = {name: tuple(t.shape) for name, t in tensors.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def check_next_broadcast(state: Artifact | MemoryState, broadcast: Artifact) -> None:
    """The broadcast must be the very next round of `state`; names the missing round if not."""
    current = state.header.round
    expected = current + 1
    found = broadcast.header.round
    if found > expected:
        raise StaleUploadError(
            f"{broadcast.path}: is the round-{found} broadcast, but the state is at round {current}; the"
            f" round-{expected} broadcast is missing (give the broadcasts of rounds {expected} to {found}"
            " in order, or take the coordinator's global state)"
        )
    if found < expected:
        raise StaleUploadError(
            f"{broadcast.path}: is the round-{found} update of state {short(broadcast.header.parent_hash)},"
            f" already contained in {describe_state(state)}; give only later broadcasts, in round order"
        )


def apply_chain(global_state: Artifact, broadcasts: Sequence[Artifact]) -> Payload:
    """Apply broadcasts of rounds t+1, t+2, ... to the round-t state, checking each link.

    Every broadcast is checked as `apply` checks one (parent hash, LoRA config, shapes,
    result hash), after `check_next_broadcast` has named any gap or wrong order.
    """
    if not broadcasts:
        raise UsageError("give at least one --broadcast")
    state: Artifact | MemoryState = global_state
    payloads: list[Payload] = []
    for broadcast in broadcasts:
        check_next_broadcast(state, broadcast)
        payload = apply_broadcast(state, broadcast)  # type: ignore[arg-type]
        header = replace(payload.header, content_hash=content_hash(payload.tensors))
        state = MemoryState(f"<state after round {header.round}>", header, dict(payload.tensors))
        payloads.append(payload)
    return payloads[-1]
