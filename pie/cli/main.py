"""The `pie` command: one typer app, one module per command group.

    pie serve | run | doctor
    pie inferlet list | info | install | remove
    pie config init | show | set | validate
    pie model list | download | add | remove | info
    pie auth add | remove | list
    pie driver list | dev install | dev set venv | dev set python | dev show | dev doctor
"""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn

import typer

import pie
from pie.cli import auth, config_cmd, driver, inferlet, model
from pie.cli.common import (
    CONTEXT_SETTINGS,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigOption,
    PieGroup,
    set_debug,
    show_usage_error,
    status,
)
from pie.cli.serve import run, serve

app = typer.Typer(cls=PieGroup, name="pie", add_completion=False, rich_markup_mode=None,
                  context_settings=CONTEXT_SETTINGS, invoke_without_command=True,
                  help="pie: programmable LLM serving. Configuration: $PIE_HOME/config.toml (default ~/.pie). "
                       "Start here: pie run text-completion --model pie/tiny-random -- --prompt Hello")
app.command()(serve)
app.command()(run)
app.add_typer(inferlet.app, name="inferlet")
app.add_typer(config_cmd.app, name="config")
app.add_typer(model.app, name="model")
app.add_typer(auth.app, name="auth")
app.add_typer(driver.app, name="driver")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"pie {pie.__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Print tracebacks with errors.")] = False,
    version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_show_version,
                                          help="Print pie's version and exit.")] = False,
) -> None:
    set_debug(ctx, debug)
    if ctx.invoked_subcommand is None:  # bare `pie`: its help is the answer, not an error
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_OK)


@app.command()
def doctor(config: ConfigOption = None) -> None:
    """Check Python, torch, the NVIDIA driver, FlashInfer, the flavor, the config, its devices and models,
    the Hugging Face hub and cache. Exits 1 when something stops `pie serve`."""
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
    except typer.TyperException as error:  # a usage error before any subcommand ran (`pie --bogus`)
        show_usage_error(error)
        return EXIT_ERROR
    except (typer.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Console-script entry point (`pie = "pie.cli.main:main"`)."""
    sys.exit(run_cli(argv))
