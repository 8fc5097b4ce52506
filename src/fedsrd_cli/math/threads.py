"""Small dense factorizations run on one thread.

LAPACK routines on small matrices (eigh, svd, cholesky, QR of a few hundred columns) are
chains of short parallel regions; with every core busy, each region waits for a thread the
scheduler has not run yet, and a 256 x 256 SVD that takes 16 ms on one thread took 80 ms to
1.6 s on two busy cores here. One thread costs them little even on idle cores, so the
coordinator's small factorizations run single-threaded, and large matrix products keep
torch's thread count (`--threads`). Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
