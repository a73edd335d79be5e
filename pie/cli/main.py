"""The `pie` command: one typer app, one module per command group.

    pie serve | run | doctor
    pie config init | show | set | validate
    pie model list | download | add | remove | info
    pie auth add | remove | list
    pie driver list | dev install | dev set venv | dev set python | dev show | dev doctor
"""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn

import typer

from pie.cli import auth, config_cmd, driver, model
from pie.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    ConfigOption,
    PieGroup,
    set_debug,
    show_usage_error,
    status,
)
from pie.cli.serve import run, serve

app = typer.Typer(cls=PieGroup, name="pie", no_args_is_help=True, add_completion=False,
                  help="pie: programmable LLM serving. Configuration: $PIE_HOME/config.toml (default ~/.pie).")
app.command()(serve)
app.command()(run)
app.add_typer(config_cmd.app, name="config")
app.add_typer(model.app, name="model")
app.add_typer(auth.app, name="auth")
app.add_typer(driver.app, name="driver")


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Print tracebacks with errors.")] = False,
) -> None:
    set_debug(ctx, debug)


@app.command()
def doctor(config: ConfigOption = None) -> None:
    """Check Python, torch, the NVIDIA driver, FlashInfer, the flavor, the config and its models.
    Exits 1 only when something stops `pie serve`."""
    from pie.doctor import run_checks

    checks = run_checks(config)
    for check in checks:
        status(check.level, check.text)
    if any(c.level == "fail" and c.blocking for c in checks):
        raise typer.Exit(EXIT_ERROR)


def run_cli(argv: list[str] | None = None) -> int:
    """Run `pie` with `argv` (default: sys.argv[1:]); returns the exit code."""
    try:
        code = app(args=argv, prog_name="pie", standalone_mode=False)
    except typer.TyperException as error:  # a usage error before any subcommand ran (`pie --bogus`, `pie`)
        show_usage_error(error)
        return EXIT_ERROR
    except (typer.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Console-script entry point (`pie = "pie.cli.main:main"`)."""
    sys.exit(run_cli(argv))
