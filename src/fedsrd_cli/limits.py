"""The range of every numeric option, declared once and checked before any work.

`command` (cli/app.py) checks every numeric option of a command against its Limit here before the
command's body runs: a value outside its range, NaN or infinite is one line and exit 2, and
nothing has been read or written yet. A numeric option with no Limit is a programming error,
refused when the command is registered. The Flower settings (flower/settings.py) check their
keys, which are the same flag names without the dashes, against the same table.

A bound is the widest value the command can honour in float32 / int64 arithmetic or in the
time a person waits; finer rules (a rank the model's layers can take, delta below 1 / records)
are checked where the data is known.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from fedsrd_cli.errors import UsageError

FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: learning rates, scales, norms
SEED_MAX = 2**63 - 1
EPSILON_MAX = 1e6
# The longest coordinator step (--server-lr); config.BroadcastConfig checks the same bound.
MAX_SERVER_LR = 16.0
# DP-SGD: the clip C of each record's gradient when none is given (train-local, simulate, Flower).
# Here, not in config.py (which imports torch), so the command line's help needs no torch.
DEFAULT_DP_MAX_GRAD_NORM = 1.0


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Limit:
    """[low, high] (an end excluded when its flag says so); high may be computed when checked."""

    low: float
    high: float | Callable[[], float]
    low_included: bool = True
    high_included: bool = True
    meaning: str = ""  # appended to the message, e.g. "the cores this process may use"

    def upper(self) -> float:
        return self.high() if callable(self.high) else self.high

    def describe(self) -> str:
        def show(value: float) -> str:
            return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"

        left = "[" if self.low_included else "("
        right = "]" if self.high_included else ")"
        text = f"{left}{show(self.low)}, {show(self.upper())}{right}"
        return f"{text} ({self.meaning})" if self.meaning else text

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        high = self.upper()
        above = value > self.low if not self.low_included else value >= self.low
        below = value < high if not self.high_included else value <= high
        return above and below

    def check(self, flag: str, value: float) -> None:
        if not self.holds(value):
            raise UsageError(f"{flag} must be in {self.describe()}, got {value!r}")


def _open_low(high: float, **kwargs: object) -> Limit:
    return Limit(0.0, high, low_included=False, **kwargs)  # type: ignore[arg-type]


_PROBABILITY_BELOW_ONE = Limit(0.0, 1.0, high_included=False)
_RATE = Limit(0.0, 1.0, low_included=False)
_DELTA = Limit(0.0, 1.0, low_included=False, high_included=False)

LIMITS: dict[str, Limit] = {
    # LoRA and rounds
    "--rank": Limit(1, 65_536),
    "--alpha": _open_low(FLOAT32_MAX),
    "--seed": Limit(0, SEED_MAX),
    "--rounds": Limit(1, 100_000),
    "--seeds": Limit(1, 100),
    "--sample-clients": Limit(1, 100_000),
    "--expect": Limit(1, 1_000_000),
    # training and evaluation
    "--steps": Limit(1, 10_000_000),
    "--local-steps": Limit(1, 10_000_000),
    "--pretrain-steps": Limit(1, 10_000_000),
    "--epochs": _open_low(10_000),
    "--lr": _open_low(FLOAT32_MAX),
    "--batch-size": Limit(1, 65_536),
    "--grad-accum": Limit(1, 65_536),
    "--max-length": Limit(2, 1_048_576),
    "--max-new-tokens": Limit(1, 65_536),
    "--answers": Limit(0, 1_000_000),
    "--metrics-max-new-tokens": Limit(1, 65_536),
    # the real-task suite (demo-assets --suite real)
    "--eval-size": Limit(1, 100_000),
    "--train-size": Limit(1, 1_000_000),
    "--prox-mu": Limit(0, 1e6),
    "--threads": Limit(1, usable_cores, meaning="the cores this process may use"),
    # uploads
    "--samples": Limit(0, 10**12),
    "--base-sparsity": _PROBABILITY_BELOW_ONE,
    "--kurtosis-coeff": Limit(0, 1e6),
    "--kurtosis-cap": _PROBABILITY_BELOW_ONE,
    "--upload-drop": _PROBABILITY_BELOW_ONE,
    # the coordinator
    "--max-update-norm": _open_low(FLOAT32_MAX),
    "--max-samples": Limit(1, 10**12),
    "--download-sparsity": Limit(0, 0.999),
    "--damping": Limit(0, 1),
    "--server-lr": _open_low(MAX_SERVER_LR),
    "--server-lr-from": Limit(1, 100_000),
    # secure rounds
    "--min-sites": Limit(2, 100_000),
    "--clip": _open_low(1e6),
    "--secure-clip": _open_low(1e6),
    # the public positions' share, and the fixed-point words (16 or 32: the roster checks which)
    "--secure-density": Limit(0.01, 1),
    "--min-density": Limit(0.01, 1),
    "--word-bits": Limit(16, 32),
    "--min-word-bits": Limit(16, 32),
    "--attempt": Limit(1, 1_000),
    # differential privacy
    "--dp-epsilon": _open_low(EPSILON_MAX),
    "--dp-max-epsilon": _open_low(EPSILON_MAX),
    "--require-dp": _open_low(EPSILON_MAX),
    "--dp-delta": _DELTA,
    "--dp-max-grad-norm": _open_low(FLOAT32_MAX),
    "--dp-noise-multiplier": _open_low(1e6),
    "--dp-rounds": Limit(1, 100_000),
    "--dp-clip": _open_low(FLOAT32_MAX),
    "--dp-sampling-rate": _RATE,
    "--dp-org-clip": _open_low(FLOAT32_MAX),
    "--dp-org-noise-multiplier": _open_low(1e6),
    "--dp-org-sampling-rate": _RATE,
    "--dp-org-delta": _DELTA,
    # keys of the Flower settings only (flower/settings.py)
    "--min-clients": Limit(0, 100_000),
    "--round-timeout": _open_low(1e7),
    "--connect-timeout": _open_low(1e7),
    "--eval-batch-size": Limit(1, 65_536),
}

# A command whose option of the same name means something narrower.
PER_COMMAND: dict[tuple[str, str], Limit] = {
    ("simulate", "--seed"): Limit(0, 2**31 - 1),  # seeds seed .. seed + N - 1 seed every run
}


def limit_of(command: str, flag: str) -> Limit | None:
    return PER_COMMAND.get((command, flag), LIMITS.get(flag))
