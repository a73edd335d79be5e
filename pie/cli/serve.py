"""`pie serve` and `pie run`: the two commands that start the stack.

What can be checked without loading anything is checked first, so a mistake costs a second, not a
model load: the inferlet's name and arguments (its Pie.toml `[parameters]`), and that each model is
built in, a folder, cached, or the hub is reachable to fetch it (pie.model_source.check_obtainable).
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from pie.cli.args import fold_args
from pie.cli.common import ConfigOption, fail, print_notes, set_debug
from pie.config import Config, load_config
from pie.mcp_link import McpServerSpec

ModelOption = Annotated[str | None, typer.Option(
    "--model", help="Serve this model for this run instead of the config's: a Hugging Face repo id "
                    "(Qwen/Qwen3-0.6B), a checkpoint folder, or pie/tiny-random (built in, offline) "
                    "[default: the config's models].")]


def serve(
    ctx: typer.Context,
    config: ConfigOption = None,
    model: ModelOption = None,
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
    settings = with_model(settings, model)
    print_notes(settings.notes)
    check_models(settings)
    from pie.server.app import run_server

    logging = {k: v for k, v in (("log_level", log_level), ("log_format", log_format)) if v not in (None, "text")}
    raise typer.Exit(run_server(settings, debug=debug, monitor=monitor, **logging))  # unset: the server's defaults


def parse_mcp(text: str) -> McpServerSpec:
    """`NAME=COMMAND ARGS...` (shell-quoted) -> a stdio MCP server spec."""
    name, sep, command = text.partition("=")
    words = shlex.split(command) if sep else []
    if not name.strip() or not words:
        fail(f"--mcp {text!r}: write NAME=COMMAND, e.g. --mcp 'calc=python calc_server.py'")
    return McpServerSpec(name.strip(), "stdio", words[0], tuple(words[1:]))


def run(
    words: Annotated[list[str] | None, typer.Argument(
        metavar="NAME[@VERSION] [-- ARGS...]", show_default=False,
        help="The inferlet (omit it with --path), then after `--` its arguments, folded into its input: "
             "`--max-tokens 64` -> {\"max_tokens\": 64}; `pie inferlet info NAME` lists them.")] = None,
    config: ConfigOption = None,
    model: ModelOption = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print the text as it is generated (sets the "
                                         "inferlet's `stream` parameter).")] = False,
    server: Annotated[str | None, typer.Option(help="URL of a running `pie serve` (ws://HOST:PORT/v1/ws); "
                                               "default: start the stack in this process for one run.")] = None,
    port: Annotated[int | None, typer.Option(help="Shorthand for --server ws://127.0.0.1:PORT/v1/ws.")] = None,
    path: Annotated[Path | None, typer.Option("--path", "-p", help="Run a local inferlet: a folder with "
                                              "Pie.toml and main.py, or one .py file.")] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="The inferlet's Pie.toml when it "
                                                  "is not beside the program.", dir_okay=False)] = None,
    log: Annotated[Path | None, typer.Option(help="Write the server's log to this file.", dir_okay=False)] = None,
    mcp: Annotated[list[str] | None, typer.Option(
        "--mcp", metavar="NAME=COMMAND", help="Start a stdio MCP server here and offer it to the inferlet as "
        "NAME (repeatable): --mcp 'calc=python calc_server.py'.")] = None,
) -> None:
    """Run one inferlet and stream its output; exits 0 when it returns, 1 when it fails, 130 on Ctrl-C."""
    words = list(words or [])
    program = None if path is not None else (words.pop(0) if words else None)
    if program is None and path is None:
        fail("name an inferlet (`pie run text-completion -- --prompt hi`; `pie inferlet list` shows them) "
             "or a local one with --path")
    if server is not None and port is not None:
        fail("give --server or --port, not both")
    if model is not None and (server is not None or port is not None):
        fail("--model chooses what this run's own stack loads; a running server serves its own models "
             "(pass the inferlet's own `-- --model NAME` to pick one of them)")
    if port is not None:
        server = f"ws://127.0.0.1:{port}/v1/ws"
    settings = with_model(load_config(config), model)
    print_notes(settings.notes)
    input = fold_args(words) | ({"stream": True} if stream else {})
    if server is None:  # the stack starts here: check what it would launch before loading a model
        input = checked_input(settings, program, path, manifest, input)
        check_models(settings)
        models = ", ".join(f"{m.hf_repo} (device {', '.join(m.device)})" for m in settings.models)
        typer.echo(f"starting pie for this run with {models}", err=True)
    from pie.cli.params import check_served_input
    from pie.client.run import run_inferlet

    raise typer.Exit(run_inferlet(settings, program, input, server_url=server, path=path, manifest=manifest,
                                  log=log, check=check_served_input if server is not None else None,
                                  mcp=[parse_mcp(m) for m in mcp or []]))


def with_model(settings: Config, model: str | None) -> Config:
    """`settings` serving only `model` (named after it), on the first configured model's devices and options."""
    if model is None:
        return settings
    if not model.strip():
        fail("--model needs a name: a Hugging Face repo id, a checkpoint folder, or pie/tiny-random")
    first = dataclasses.replace(settings.models[0], name=model, hf_repo=model, revision="")
    return dataclasses.replace(settings, models=(first,))


def check_models(settings: Config) -> None:
    """Every model is obtainable (built in, a folder, cached, or the hub reachable): fails in ~2 s offline."""
    from pie.model_source import check_obtainable

    for model in settings.models:
        check_obtainable(model.hf_repo, revision=model.revision or None)


def checked_input(settings: Config, program: str | None, path: Path | None, manifest: Path | None,
                  input: dict[str, Any]) -> dict[str, Any]:
    """`input` checked against the inferlet's `[parameters]`; an unknown name lists the inferlets."""
    from pie.cli.inferlet import resolve
    from pie.cli.params import check_input
    from pie.runtime.programs import MANIFEST_FILE, Manifest

    if program is not None:
        return check_input(resolve(settings, program).manifest, input)
    assert path is not None, "run names a program or a path"
    toml = manifest or (path / MANIFEST_FILE if path.is_dir() else path.parent / MANIFEST_FILE)
    if not toml.is_file():  # a lone script declares no parameters; a missing one is reported on upload
        return input
    return check_input(Manifest.parse(toml.read_text(), str(toml)), input)
