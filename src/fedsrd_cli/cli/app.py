"""The `fedsrd` Typer application: its root options and the decorator that registers a command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from fedsrd_cli import __version__
from fedsrd_cli.cli.exits import guarded, start_run
from fedsrd_cli.cli.options import DebugOpt

app = typer.Typer(
    name="fedsrd",
    help="Federated LoRA fine-tuning with FedSRD: every step reads and writes safetensors files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command under `name`, with --debug and the shared error-to-exit-code mapping."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        app.command(name, help=fn.__doc__)(guarded(fn))
        return fn

    return register


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedsrd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: DebugOpt = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    start_run(debug)


def main() -> None:
    """Console-script entry point."""
    app()
