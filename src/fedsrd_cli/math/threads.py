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
coordinator's small factorizations run single-threaded.

The coordinator's modules are independent of each other, so `aggregate` and `broadcast` work on
as many modules at once as they have threads (`thread_map`; `aggregate` reads its uploads so
too), each module's torch work on one thread: their many small factorizations then keep every
core busy instead of one. The files do not depend on it: with this CPU build of torch (MKL,
OpenMP) a whole 28-layer round wrote the same bytes with --threads 1, with --threads 2 and
module by module, and the tests' pinned round digests are the same either way. Pure torch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from fedsrd_cli.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


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


def thread_map(work: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """work(item) for every item, yielded in the items' order, computed on `workers` threads
    (torch's thread count when None), each with torch on one thread.

    At most 2 x workers items are in flight, so a slow consumer never holds more than that many
    results. An exception in work is raised where its result would have been yielded (the items
    after it are not started once the generator is closed). With one worker it is plain map(),
    on the caller's thread and thread count. `work` must depend on its item only (no shared
    random stream, no shared mutable state): the order in which items run is not fixed.
    """
    workers = torch.get_num_threads() if workers is None else workers
    if workers <= 1:
        yield from map(work, items)
        return
    with single_threaded(), ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


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
