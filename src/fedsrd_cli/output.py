"""The one place the CLI prints: results (rich for people, JSON for scripts), errors, progress.

Results go to stdout; progress, notes and errors go to stderr, so `--json` output
can be piped as is.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

T = TypeVar("T")
PROGRESS_DELAY_S = 1.0


class Output:
    """Printing for one command run: `json_mode` prints a single JSON object; `quiet` prints nothing else."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def result(self, data: dict[str, Any], *renderables: Any) -> None:
        """The command's result: `data` as JSON with --json, else the renderables (str or rich)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()
            return
        if self.quiet:
            return
        for item in renderables:
            self.out.print(item)

    def note(self, message: str) -> None:
        """A side remark for people (stderr); silent with --json or --quiet."""
        if not (self.json_mode or self.quiet):
            self.err.print(message)

    def error(self, message: str) -> None:
        """One line on stderr: always printed, whatever the mode."""
        self.err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)

    def track(self, items: Iterable[T], total: int, label: str) -> Iterator[T]:
        """Yield items; show a progress bar on a terminal once the work has taken over a second."""
        if self.json_mode or self.quiet or not self.err.is_terminal:
            yield from items
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        start = time.monotonic()
        progress = None
        task = None
        try:
            for done, item in enumerate(items):
                if progress is None and time.monotonic() - start > PROGRESS_DELAY_S:
                    progress = Progress(
                        "[progress.description]{task.description}",
                        BarColumn(),
                        MofNCompleteColumn(),
                        TimeRemainingColumn(),
                        console=self.err,
                        transient=True,
                    )
                    progress.start()
                    task = progress.add_task(label, total=total, completed=done)
                yield item
                if progress is not None:
                    progress.update(task, completed=done + 1)
        finally:
            if progress is not None:
                progress.stop()


def key_value_table(rows: Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    """A two-column table for a command's summary."""
    table = Table(show_header=False, title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def human_bytes(n: float) -> str:
    """Bytes in binary units (MB = 2^20 bytes, as in the paper)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"
