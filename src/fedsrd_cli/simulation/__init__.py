"""`simulate`: whole federated runs in one process, with the same algorithms as the CLI.

    config   SimulateConfig: the run's settings and their checks, what config.json records
    rounds   simulate(): the round loop (train, upload, aggregate, broadcast, score), resuming
    records  what a run keeps on disk: config.json, results.json's RoundRecords, resuming
    report   the results: the summary table, results.md and traffic_vs_loss.png

`simulate` and `SimulateConfig` are importable from here. May import suites/, site/,
algorithms/ and everything below; cli/ and flower/ import it, never the other way round.
"""

from __future__ import annotations

from fedsrd_cli.simulation.config import SimulateConfig
from fedsrd_cli.simulation.rounds import simulate

__all__ = ["SimulateConfig", "simulate"]
