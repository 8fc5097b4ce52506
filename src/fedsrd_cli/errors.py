"""The errors fedsrd raises on purpose.

Every error a user can cause (a wrong file, a stale round, a corrupt copy, a bad
flag) is one of these. The CLI entry point turns them into a single line on
stderr and the exit code below; anything else is a bug and keeps its traceback.

Exit codes:
    1  unexpected internal error (a bug: please report it)
    2  usage: bad flag values or combinations
    3  artifact: a file that is missing, unreadable, corrupt or not what fedsrd wrote
    4  mismatch: a valid file that does not belong here (wrong kind, round, run,
       LoRA config, model, shapes, modules, duplicate client)
    5  output: the output path exists (pass --force) or cannot be written
    6  data: training/eval data or a model directory that cannot be used, or
       training that diverged
    7  trust: missing, unknown or invalid signatures
    8  privacy: a privacy ledger that is missing, inconsistent, reset or over budget, or a
       round that would spend more than the budget allows (docs/privacy.md)

`fedsrd status` also exits (see algorithms/round_status.py), for cron:
    0   the round is ready to aggregate
    10  waiting: expected uploads are missing, nothing invalid
    11  invalid upload files are present in the inbox, or (with --trust) the
        global state itself is not trusted (RoundInvalidError)
"""

from __future__ import annotations


def a_or_an(word: str) -> str:
    """The word with its indefinite article, as a message needs it: "an upload", "a state"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


class FedsrdError(Exception):
    """Base class: a problem the user can fix. `str(err)` is the whole message."""

    exit_code = 1


class UsageError(FedsrdError):
    """Flags that are out of range or contradict each other."""

    exit_code = 2


class ArtifactError(FedsrdError):
    """A file that cannot be read as a valid fedsrd artifact (missing, truncated, corrupt)."""

    exit_code = 3


class MismatchError(FedsrdError):
    """A valid artifact that does not fit with the others it is used with."""

    exit_code = 4


class StaleUploadError(MismatchError):
    """An upload (or broadcast) that derives from another global state than the one given."""


class OutputError(FedsrdError):
    """An output that cannot be written: it exists (without --force), or its folder refuses it."""

    exit_code = 5


class OutputExistsError(OutputError):
    """Refusing to overwrite an existing file without --force."""


class DataError(FedsrdError):
    """Training or evaluation data, or a model directory, that cannot be used."""

    exit_code = 6


class TrainingDivergedError(DataError):
    """Local training that diverged: a NaN or Inf loss or factor (the cure is a lower --lr)."""


class TrustError(FedsrdError):
    """A signature that is missing, unknown, or does not verify."""

    exit_code = 7


class PrivacyError(FedsrdError):
    """A DP budget refused: a ledger missing, inconsistent or reset, or a round over budget."""

    exit_code = 8


class RoundInvalidError(FedsrdError):
    """`fedsrd status`: the round cannot go ahead as it stands (exit 11, like invalid uploads)."""

    exit_code = 11
