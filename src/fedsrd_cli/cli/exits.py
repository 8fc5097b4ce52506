"""The one place a FedsrdError becomes a line on stderr and an exit code.

Exit codes (errors.py holds the error classes; docs/cli.md the table):
    0    success
    1    an unexpected internal error: a bug, shown with its traceback
    2-8  FedsrdError.exit_code: usage, artifact, mismatch, output, data, trust, privacy
    10, 11  `fedsrd status` only: waiting, invalid files (algorithms/round_status.py)
    130  interrupted (Ctrl-C)

`--debug` (before or after the command name) or FEDSRD_DEBUG=1 shows the traceback
of a FedsrdError instead of its line.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import typer

from fedsrd_cli.cli.options import DebugOpt
from fedsrd_cli.errors import FedsrdError
from fedsrd_cli.output import Output

EXIT_INTERRUPTED = 130
_state = {"debug": False}


def start_run(debug: bool) -> None:
    """Called first in every run (the root callback): `fedsrd --debug`, or FEDSRD_DEBUG=1.

    It sets the flag afresh, so a run in the same process (a test's CliRunner) never
    inherits the previous run's --debug.
    """
    _state["debug"] = debug or os.environ.get("FEDSRD_DEBUG", "") not in ("", "0")


def one_line(message: str) -> str:
    """An error message as one line (a library message is one already; a third party's may not be)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with a --debug option of its own and the error-to-exit-code mapping around it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        if debug:  # `fedsrd COMMAND --debug`
            _state["debug"] = True
        try:
            return fn(*args, **kwargs)
        except FedsrdError as err:
            if _state["debug"]:
                raise
            Output().error(one_line(str(err)))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            Output().error("interrupted; no partly written file was left (files are renamed into place)")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    signature = inspect.signature(fn, eval_str=True)
    debug = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOpt)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), debug]
    )
    return wrapper
