"""The algorithm interface: what every federated method does, in three pure steps.

An algorithm turns artifacts into in-memory payloads (header + tensors); it never
writes files. The CLI writes payloads with `artifacts.write_artifact`; `simulate`
serializes them in memory. Progress reporting is passed in (`track`), not built in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.files.adapters import LocalAdapter
from fedsrd_cli.files.artifacts import Artifact, Header
from fedsrd_cli.math.lowrank import scheduled_factor

T = TypeVar("T")
Track = Callable[[Iterable[T], int, str], Iterable[T]]


def no_progress(items: Iterable[T], total: int, label: str) -> Iterable[T]:
    """The default `track`: report nothing."""
    return items


@dataclass
class Payload:
    """An artifact in memory: its header (content hash not yet set) and its tensors."""

    header: Header
    tensors: dict[str, torch.Tensor]


class Algorithm(ABC):
    """One federated method: client upload, coordinator aggregate, coordinator broadcast.

    dense_download: True when the broadcast sends whole factors, so its download sparsity
    must be 0 (`default_download_sparsity` is what the CLI uses when the user gives none).
    local_training: which LoRA factors clients train: "both"; "B" (A frozen, FFA-LoRA:
    `train-local --freeze-a`); "alternate" (only the factor the round's broadcast updates,
    B in odd rounds and A in even ones: `train-local --alternate`).
    default_base_sparsity: the upload's base sparsity alpha when the user gives none.
    """

    name: str
    dense_download: bool = False
    dense_upload: bool = False  # uploads carry whole factor deltas (Method: its encoder's)
    local_training: str = "both"
    # `sparsify --base-sparsity` when the user gives none (importance-sparsifying methods).
    default_base_sparsity: float = SparsifyConfig.base_sparsity

    def trained_factor(self, round_index: int) -> str | None:
        """The only factor ("A" or "B") clients may change in round t; None when both."""
        if self.local_training == "both":
            return None
        if self.local_training == "B":
            return "B"
        return scheduled_factor(round_index)

    @property
    def training_flag(self) -> str | None:
        """The `train-local` flag that trains what this method expects (None: no flag)."""
        return {"both": None, "B": "--freeze-a", "alternate": "--alternate"}[self.local_training]

    @property
    def default_download_sparsity(self) -> float:
        """The broadcast's download sparsity when the user gives none: 0 for dense downloads."""
        return 0.0 if self.dense_download else BroadcastConfig().download_sparsity

    @abstractmethod
    def upload(
        self,
        global_state: Artifact,
        local: LocalAdapter,
        client_id: str,
        num_samples: int,
        config: SparsifyConfig,
        track: Track = no_progress,
    ) -> Payload:
        """A client's upload for round global_state.round + 1."""

    @abstractmethod
    def aggregate(
        self,
        global_state: Artifact,
        uploads: Sequence[Artifact],
        config: AggregateConfig,
        track: Track = no_progress,
    ) -> Payload:
        """The coordinator's aggregate of the round's uploads."""

    @abstractmethod
    def broadcast(
        self,
        global_state: Artifact,
        aggregate: Artifact,
        config: BroadcastConfig,
        track: Track = no_progress,
    ) -> tuple[Payload, Payload]:
        """(broadcast to send, next global state) computed from exactly what is sent."""
