"""How many threads torch uses: one per idle core, and small factorizations on one thread.

Every command that computes (training, evaluation, the coordinator's products) calls
`use_threads` once it starts: one thread per core that other processes leave idle, measured
over 50 ms from /proc/stat. A thread that waits for a busy core stalls every parallel region
it is part of: a 28-layer coordinator round took 20 s on 2 idle cores and 149 s with 2
threads beside one busy process.

Small dense factorizations run on one thread.

LAPACK routines on small matrices (eigh, svd, cholesky, QR of a few hundred columns) are
chains of short parallel regions; with every core busy, each region waits for a thread the
scheduler has not run yet, and a 256 x 256 SVD that takes 16 ms on one thread took 80 ms to
1.6 s on two busy cores here. One thread costs them little even on idle cores, so the
coordinator's small factorizations run single-threaded, and large matrix products keep
torch's thread count (`--threads`). Pure torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedsrd_cli.errors import UsageError


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with torch.set_num_threads(1); restore the previous count after it."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_threads(threads: int | None) -> int:
    """Apply --threads, or pick the count: one thread per core left idle by other processes
    (measured over 50 ms from /proc/stat; all usable cores where that cannot be read), at
    least 1. A thread that waits for a busy core stalls every parallel region it is part of:
    a 28-layer coordinator round took 20 s on 2 idle cores and 149 s with 2 threads beside
    one busy process. Returns the count set."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        idle = idle_cores()
        threads = cores if idle is None else max(1, min(cores, int(idle + 0.5)))
    torch.set_num_threads(threads)
    return threads


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal


def idle_cores(window: float = 0.05) -> float | None:
    """How many cores other processes left idle over the last `window` seconds, or None."""
    before = _cpu_times()
    time.sleep(window)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)
