"""Federated algorithms behind one interface (base.Algorithm), shared by the CLI and simulate.

docs/algorithms.md describes each method and what it sends each way. round_status says which
uploads of a round are in (`status`). May import trust/, privacy/, files/ and math/; never
site/ (no transformers here), suites/, simulation/, cli/ or flower/.
"""

from __future__ import annotations

from fedsrd_cli.algorithms.ablations import (
    FedSRDDenseDownload,
    FedSRDFixedRatio,
    FedSRDNoReconstruction,
    FedSRDRandomSparsify,
)
from fedsrd_cli.algorithms.base import Algorithm
from fedsrd_cli.algorithms.baselines import FedAvg, FedDARE, FedProx, FFALoRA, FlexLoRA
from fedsrd_cli.algorithms.fedsrd import FedSRD, FedSRDAlternate
from fedsrd_cli.config import AGGREGATE_METHODS
from fedsrd_cli.errors import UsageError

ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        FedSRD(exact=False),
        FedSRD(exact=True),
        FedAvg(),
        FedProx(),
        FFALoRA(),
        FlexLoRA(),
        FedDARE(),
        FedSRDFixedRatio(),
        FedSRDRandomSparsify(),
        FedSRDDenseDownload(),
        FedSRDNoReconstruction(),
        FedSRDAlternate(),
    )
}

if tuple(ALGORITHMS) != AGGREGATE_METHODS:  # a programming error: fail at import, not later
    raise RuntimeError(
        f"config.AGGREGATE_METHODS {AGGREGATE_METHODS} and the registry {tuple(ALGORITHMS)} disagree"
    )


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under `name` (UsageError listing the known ones otherwise)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(ALGORITHMS)}") from None
