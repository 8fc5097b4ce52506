"""The one place the CLI prints: results (rich for people, JSON for scripts), errors, progress.

Results go to stdout; progress, notes and errors go to stderr, so `--json` output
can be piped as is.

On a terminal, tables fit its width and fold a long cell onto more lines; no column ever
cuts a name with "...". Anywhere else (a pipe, a log file, cron) nothing is wrapped or padded:
a table has no box, each row is one line, whatever COLUMNS says, its cells separated by one tab
(a header line first where the table has headers), without trailing whitespace, so a path or a
hash can be copied or grepped from the output as is, and a column cut out with `cut -f`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.table import Table
from rich.text import Text

T = TypeVar("T")
PROGRESS_DELAY_S = 1.0
# The width rich lays out for when the stream is not a terminal: wider than any line we print.
UNWRAPPED_WIDTH = 100_000


def _console(stderr: bool) -> Console:
    """A console of stdout or stderr: the terminal's width on a terminal, no wrapping elsewhere."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, soft_wrap=True, width=UNWRAPPED_WIDTH)
    return console


class Output:
    """Printing for one command run: `json_mode` prints a single JSON object; `quiet` prints nothing else."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)

    def result(self, data: dict[str, Any], *renderables: Any) -> None:
        """The command's result: `data` as JSON with --json, else the renderables (str or rich)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()
            return
        if self.quiet:
            return
        for item in renderables:
            self._print(item)

    def _print(self, item: Any) -> None:
        if self.out.is_terminal:
            self.out.print(item)
            return
        if isinstance(item, Table):
            sys.stdout.write("".join(line + "\n" for line in plain_rows(item)))
            sys.stdout.flush()
            return
        with self.out.capture() as captured:
            self.out.print(item)
        lines = [line.rstrip() for line in captured.get().splitlines()]
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()

    def note(self, message: str) -> None:
        """A side remark for people (stderr); silent with --json or --quiet."""
        if not (self.json_mode or self.quiet):
            self.err.print(message, markup=False)

    def error(self, message: str) -> None:
        """One line on stderr: always printed, whatever the mode."""
        self.err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)

    def steps(self, total: int, label: str) -> StepProgress:
        """A progress bar for a loop of `total` steps with a status text (terminal only)."""
        return StepProgress(self, total, label)

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


class StepProgress:
    """A progress bar with free-form fields (loss, throughput); does nothing when not shown."""

    def __init__(self, output: Output, total: int, label: str):
        self.shown = not (output.json_mode or output.quiet) and output.err.is_terminal
        self.progress: Any = None
        self.task: Any = None
        if self.shown:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                "{task.fields[status]}",
                TimeRemainingColumn(),
                console=output.err,
                transient=True,
            )
            self.task = self.progress.add_task(label, total=total, status="")

    def __enter__(self) -> StepProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def update(self, completed: int, status: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, status=status)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _plain(cell: Any) -> str:
    """A table cell as text without markup (what rich would show of it), on one line."""
    if isinstance(cell, str):
        try:
            cell = Text.from_markup(cell)
        except MarkupError:  # text that only looks like markup (a model's "[/INST]"): as it is
            cell = Text(cell)
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return " ".join(text.splitlines())


def plain_rows(table: Table) -> list[str]:
    """A table for a pipe or a file: its title, header and rows, one line each, cells joined by a
    tab; no box, no padding, no trailing whitespace."""
    lines = [] if table.title is None else [_plain(table.title)]
    columns = [list(column.cells) for column in table.columns]
    if table.show_header:
        lines.append("\t".join(_plain(column.header) for column in table.columns))
    for row in zip(*columns, strict=True):
        lines.append("\t".join(_plain(cell) for cell in row))
    return [line.rstrip() for line in lines]


def key_value_table(rows: Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    """A two-column table for a command's summary."""
    table = Table(show_header=False, title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def data_table(*headers: str, title: str | None = None, **options: Any) -> Table:
    """A table whose columns never cut a value: on a narrow terminal a long cell folds onto
    more lines instead of ending in "..."."""
    result = Table(title=title, title_justify="left", **options)
    for header in headers:
        result.add_column(header, overflow="fold")
    return result


def human_bytes(n: float) -> str:
    """Bytes in binary units (MB = 2^20 bytes, as in the paper)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def human_duration(seconds: float) -> str:
    """A duration as people read it: "45 s", "12 min", "3.5 h", "2.1 days"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
