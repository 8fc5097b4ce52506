"""Federated algorithms behind one interface (base.Algorithm), shared by the CLI and simulate."""

from __future__ import annotations

from fedsrd_cli.algorithms.base import Algorithm
from fedsrd_cli.algorithms.fedsrd import FedSRD
from fedsrd_cli.errors import UsageError

ALGORITHMS: dict[str, Algorithm] = {
    "fedsrd": FedSRD(exact=False),
    "fedsrd-e": FedSRD(exact=True),
}


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under `name` (UsageError listing the known ones otherwise)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(ALGORITHMS)}") from None
