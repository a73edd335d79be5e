"""`pie serve` and `pie run`: the two commands that start the stack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pie.cli.args import fold_args
from pie.cli.common import ConfigOption, fail, print_notes, set_debug
from pie.config import Config, load_config


def serve(
    ctx: typer.Context,
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help=f"Interface to listen on [config: host, default {Config.host}].")] = None,
    port: Annotated[int | None, typer.Option(help=f"TCP port [config: port, default {Config.port}].")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Turn authentication off for this run "
                                          "(overrides enable_auth).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Debug logging; tracebacks on errors.")] = False,
    monitor: Annotated[bool, typer.Option("--monitor", "-m", help="Live view of running inferlets, batches "
                                          "and KV usage.")] = False,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error (default info; "
                                                  "--debug = debug).")] = None,
    log_format: Annotated[str, typer.Option(help="text, or json (one object per line).")] = "text",
) -> None:
    """Start the server with the config; flags override it for this run. Stop with Ctrl-C (twice: at once)."""
    set_debug(ctx, debug)
    from pie.server.logs import LOG_FORMATS, LOG_LEVELS

    if log_level is not None and log_level not in LOG_LEVELS:
        fail(f"--log-level {log_level}: use one of {', '.join(LOG_LEVELS)}")
    if log_format not in LOG_FORMATS:
        fail(f"--log-format {log_format}: use one of {', '.join(LOG_FORMATS)}")
    settings = load_config(config).with_overrides(host=host, port=port, enable_auth=False if no_auth else None)
    print_notes(settings.notes)
    from pie.server.app import run_server

    logging = {k: v for k, v in (("log_level", log_level), ("log_format", log_format)) if v not in (None, "text")}
    raise typer.Exit(run_server(settings, debug=debug, monitor=monitor, **logging))  # unset: the server's defaults


def run(
    words: Annotated[list[str] | None, typer.Argument(
        metavar="NAME[@VERSION] [-- ARGS...]", show_default=False,
        help="The inferlet (omit it with --path), then after `--` its arguments, folded into its input: "
             "`--max-tokens 64` -> {\"max_tokens\": 64}.")] = None,
    config: ConfigOption = None,
    server: Annotated[str | None, typer.Option(help="URL of a running `pie serve` (ws://HOST:PORT/v1/ws); "
                                               "default: start the stack in this process for one run.")] = None,
    port: Annotated[int | None, typer.Option(help="Shorthand for --server ws://127.0.0.1:PORT/v1/ws.")] = None,
    path: Annotated[Path | None, typer.Option("--path", "-p", help="Run a local inferlet: a folder with "
                                              "Pie.toml and main.py, or one .py file.")] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="The inferlet's Pie.toml when it "
                                                  "is not beside the program.", dir_okay=False)] = None,
    log: Annotated[Path | None, typer.Option(help="Write the server's log to this file.", dir_okay=False)] = None,
) -> None:
    """Run one inferlet and stream its output; exits 0 when it returns, 1 when it fails, 130 on Ctrl-C."""
    words = list(words or [])
    program = None if path is not None else (words.pop(0) if words else None)
    if program is None and path is None:
        fail("name an inferlet (`pie run text-completion -- --prompt hi`) or a local one with --path")
    if server is not None and port is not None:
        fail("give --server or --port, not both")
    if port is not None:
        server = f"ws://127.0.0.1:{port}/v1/ws"
    settings = load_config(config)
    print_notes(settings.notes)
    from pie.client.run import run_inferlet

    raise typer.Exit(run_inferlet(settings, program, fold_args(words), server_url=server, path=path,
                                  manifest=manifest, log=log))
