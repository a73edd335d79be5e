"""What every `pie` command shares: error handling and exit codes, the --config option, status lines.

Exit codes (docs/cli.md): 0 success; 1 any error, printed as one line that says what to do (the
traceback too with --debug); 130 interrupted. `pie serve` passes the server's own code through
(pie.server.app: 1 = startup failed, 130 = a second signal forced the shutdown).

Every group is made by `command_group`: plain help text (typer's Rich markup would eat the
`[default: ...]` in help strings and typer's own defaults), `-h` beside `--help`.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer vendors click; `pie config` with no subcommand
from typer.core import TyperGroup

from pie.errors import PieError

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
DEBUG_KEY = "pie.debug"  # in click's ctx.meta, shared by every context of one invocation
# Inherited by every subcommand's context (click passes help_option_names down from the parent).
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def command_group(help: str, **kwargs: Any) -> typer.Typer:
    """A `pie` command group: help with visible defaults, `-h`, its help when called bare (exit 0)."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT_SETTINGS,
                       **kwargs)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file [default: $PIE_HOME/config.toml, else ~/.pie/config.toml].",
                 dir_okay=False),
]


class PieGroup(TyperGroup):
    """The root group: turns errors into one line and an exit code, for every subcommand."""

    def invoke(self, ctx: Any) -> Any:  # typer's own Context class (its vendored click) is private
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError as error:  # `pie config`: its help is what was asked for
            typer.echo(error.ctx.get_help() if error.ctx is not None else error.format_message())
            raise typer.Exit(EXIT_OK) from None
        except PieError as error:
            report(ctx, error, str(error))
        except typer.TyperException as error:  # usage errors: unknown command or option, bad value
            show_usage_error(error)
            raise typer.Exit(EXIT_ERROR) from None
        except (KeyboardInterrupt, typer.Abort):
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as error:  # a file the user named cannot be read or written
            report(ctx, error, f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
        raise AssertionError("unreachable")


def show_usage_error(error: typer.TyperException) -> None:
    show = getattr(error, "show", None)  # typer's click-style errors print usage and hint
    if callable(show):
        show()
    else:
        typer.echo(f"error: {error.format_message()}", err=True)


def report(ctx: Any, error: BaseException, message: str) -> None:
    if ctx.meta.get(DEBUG_KEY):
        traceback.print_exception(error, file=sys.stderr)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_ERROR)


def set_debug(ctx: Any, debug: bool) -> None:
    if debug:
        ctx.meta[DEBUG_KEY] = True


def status(level: str, text: str) -> None:
    """One check result: `ok`, `warn` or `fail`, aligned."""
    colors = {"ok": typer.colors.GREEN, "warn": typer.colors.YELLOW, "fail": typer.colors.RED}
    typer.echo(f"{typer.style(f'{level:>4}', fg=colors.get(level))}  {text}")


def print_notes(notes: tuple[str, ...]) -> None:
    for note in notes:
        typer.echo(f"note: {note}", err=True)


def confirm(question: str) -> bool:
    """Ask yes/no (default no); no answer (end of input) is no."""
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:
        typer.echo("", err=True)
        return False


def fail(message: str) -> None:
    """Stop the command with exit code 1 and `message` (for checks that are not exceptions)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_ERROR)
