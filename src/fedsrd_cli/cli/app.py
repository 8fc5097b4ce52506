"""The `fedsrd` Typer application: its root options and the decorator that registers a command."""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer
from typer.core import TyperCommand, TyperGroup

from fedsrd_cli import __version__
from fedsrd_cli.cli.exits import EXIT_INTERRUPTED, guarded, one_line, start_run
from fedsrd_cli.cli.options import DebugOpt
from fedsrd_cli.limits import Limit, limit_of
from fedsrd_cli.output import Output


def plain_help(text: str) -> str:
    """typer < 0.21 escapes "[" in help for rich's HTML export even when it prints plain text
    ("\\[required]"); the help fedsrd prints is plain text."""
    return text.replace("\\[", "[")


class PlainHelpCommand(TyperCommand):
    """A command whose --help is plain text."""

    def get_help(self, ctx: click.Context) -> str:
        return plain_help(super().get_help(ctx))


class OneLineErrors(TyperGroup):
    """The command group: click's own usage errors (a missing option, a value that is not a
    number) become one line on stderr and exit 2, like every error fedsrd raises itself."""

    def get_help(self, ctx: click.Context) -> str:
        return plain_help(super().get_help(ctx))

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except click.exceptions.NoArgsIsHelpError as err:  # `fedsrd` alone: the help
            err.show()
            result = 0
        except click.ClickException as err:
            command = f" {err.ctx.command_path}" if getattr(err, "ctx", None) is not None else ""
            hint = f" (see{command} --help)" if command else ""
            Output().error(one_line(err.format_message()).rstrip(".") + hint)
            result = err.exit_code
        except click.Abort:
            Output().error("interrupted")
            result = EXIT_INTERRUPTED
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="fedsrd",
    help="Federated LoRA fine-tuning with FedSRD: every step reads and writes safetensors files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command under `name`, with --debug, the shared error-to-exit-code mapping and
    the range check of every numeric option (limits.py) before its body runs."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        bounded = numeric_options(name, fn)

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for parameter, (flag, limit) in bounded.items():
                if kwargs.get(parameter) is not None:
                    limit.check(flag, kwargs[parameter])
            return fn(*args, **kwargs)

        summary = " ".join((fn.__doc__ or "").split("\n\n")[0].split())
        app.command(name, help=fn.__doc__, short_help=summary, cls=PlainHelpCommand)(guarded(checked))
        return fn

    return register


def numeric_options(name: str, fn: Callable[..., Any]) -> dict[str, tuple[str, Limit]]:
    """{parameter: (its flag, its Limit)} for every int or float option of command `name`;
    RuntimeError (at import) for one without a Limit."""
    found = {}
    hints = typing.get_type_hints(fn, include_extras=True)
    for parameter in inspect.signature(fn).parameters:
        hint = hints.get(parameter)
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        kind, *extras = typing.get_args(hint)
        if not ({int, float} & {kind, *typing.get_args(kind)}) or bool in {kind, *typing.get_args(kind)}:
            continue
        info = next((e for e in extras if isinstance(e, typer.models.ParameterInfo)), None)
        if not isinstance(info, typer.models.OptionInfo):
            continue
        decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
        flag = decls[0] if decls else "--" + parameter.replace("_", "-")
        limit = limit_of(name, flag)
        if limit is None:
            raise RuntimeError(f"{name} {flag}: a numeric option without a range in limits.py")
        found[parameter] = (flag, limit)
    return found


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
