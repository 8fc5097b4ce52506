"""The `fedsrd` console script: the command line is imported here, inside the Ctrl-C handler.

Importing the command line (typer, rich) takes a moment; a Ctrl-C in it used to print a
traceback. Here it prints one line and exits 130, as a Ctrl-C later in a command does.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main() -> None:
    try:
        from fedsrd_cli.cli import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; no partly written file was left (files are renamed in place)\n")
        sys.exit(EXIT_INTERRUPTED)
