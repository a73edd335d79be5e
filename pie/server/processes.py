"""Installing programs and launching processes on behalf of a client, with the checks a client relies on.

Shared by the WebSocket session and the OpenAI-compatible HTTP API, so both
refuse bad input with the same messages and both count and trace launches.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from typing import Any

from pie import telemetry
from pie.errors import InputError, RequestError
from pie.runtime.api import ProcessAPI, ProgramInfo, RuntimeAPI
from pie.runtime.mcp import McpRelay
from pie.server.safe_json import loads_limited
from pie.server.state import ServerState

log = logging.getLogger("pie.access")
WASM_MAGIC = b"\0asm"
PYTHON_ENTRY_FILE = "main.py"


def install(runtime: RuntimeAPI, data: bytes, manifest: str, *, owner: str, force: bool) -> ProgramInfo:
    """Install `owner`'s uploaded program (only `owner` can launch it): Python source (a `main.py`, or
    one function from pie-client's `@inferlet`) plus its `Pie.toml`."""
    name, version = manifest_identity(manifest)
    if data.startswith(WASM_MAGIC):
        raise RequestError(f"{name}@{version} is a WebAssembly component; this server runs Python inferlets. "
                           "Upload the inferlet's Python source (`main.py`) with its Pie.toml instead")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"{name}@{version}: the program is not UTF-8 Python source ({error}); "
                           "upload the text of main.py") from None
    return runtime.add_program(name, version, {PYTHON_ENTRY_FILE: data}, manifest, owner=owner, force=force)


def manifest_identity(manifest: str) -> tuple[str, str]:
    try:
        package = tomllib.loads(manifest).get("package")
    except tomllib.TOMLDecodeError as error:
        raise RequestError(f"the manifest is not valid TOML: {error}") from None
    if not isinstance(package, dict):
        raise RequestError("the manifest has no [package] table; it needs [package] name and version")
    name, version = package.get("name"), package.get("version")
    if not isinstance(name, str) or not name or not isinstance(version, str) or not version:
        raise RequestError(f"the manifest's [package] needs string `name` and `version`, got name={name!r}, "
                           f"version={version!r}")
    return name, version


async def launch(state: ServerState, program: str, input: str, *, username: str,
                 token_budget: int | None = None, mcp_session: McpRelay | None = None) -> ProcessAPI:
    """Launch `program` (name or name@version) with `input` (JSON text) for `username`; `mcp_session`: the
    MCP servers of the launching connection."""
    check_input(input)
    runtime = state.runtime
    if not runtime.has_program(program, username):
        raise RequestError(f"unknown inferlet {program!r}; installed: {installed(runtime, username)}. Check the "
                           "name, or upload it first (add_program, or `pie run --path`)")
    if token_budget is not None and token_budget < 1:
        raise RequestError(f"token_budget is {token_budget}; give a positive number of tokens or none")
    process = await runtime.launch(program, input, username=username, token_budget=token_budget,
                                   mcp_session=mcp_session)
    log.info("launched %s as process %s for user %s (input %d bytes)", process.program, process.id, username,
             len(input))
    state.metrics.inc("pie_processes_launched_total", program=process.program)
    state.tasks.spawn(_trace_run(process), name=f"trace-{process.id}")
    return process


def check_input(input: str) -> None:
    try:
        loads_limited(input)
    except InputError as error:
        raise InputError(f"the input is not JSON the server accepts ({error}); send a JSON object such as "
                         '{"prompt": "hello"}') from None


def installed(runtime: RuntimeAPI, username: str | None = None, limit: int = 20) -> str:
    names = sorted(f"{p.name}@{p.version}" for p in runtime.programs(username))
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe(process: ProcessAPI) -> dict[str, Any]:
    """A `list_processes` row; pie-client documents id, username, program, arguments, elapsed_secs.
    `arguments` is the input as Pie's argv (`--key value`), `input` the JSON text itself; a finished
    process's elapsed time stops at its end."""
    end = process.ended_at if process.ended_at is not None else time.time()
    return {
        "id": process.id,
        "username": process.username,
        "program": process.program,
        "status": process.status,
        "arguments": as_arguments(process.input),
        "input": process.input,
        "elapsed_secs": round(end - process.started_at, 3),
    }


def as_arguments(input: str) -> list[str]:
    """A JSON input as the argv Pie's inferlets received: `{"max_tokens": 8, "stream": true}` ->
    `["--max_tokens", "8", "--stream"]`; anything else as one word."""
    try:
        value = json.loads(input) if input else {}
    except json.JSONDecodeError:
        return [input]
    if not isinstance(value, dict):
        return [input]
    words: list[str] = []
    for key, item in value.items():
        if item is True:
            words.append(f"--{key}")
        elif item is not False and item is not None:
            words += [f"--{key}", item if isinstance(item, str) else json.dumps(item)]
    return words


async def _trace_run(process: ProcessAPI) -> None:
    """One `inferlet.run` span per process, from launch to its final event."""
    with telemetry.span("inferlet.run", process_id=process.id, program=process.program,
                        username=process.username) as span:
        final = await process.wait()
        span.set("outcome", final.kind)
        span.set("status", process.status)
