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
from pie.errors import RequestError
from pie.runtime.api import ProcessAPI, ProgramInfo, RuntimeAPI
from pie.server.state import ServerState

log = logging.getLogger("pie.access")
WASM_MAGIC = b"\0asm"
PYTHON_ENTRY_FILE = "main.py"


def install(runtime: RuntimeAPI, data: bytes, manifest: str, *, force: bool) -> ProgramInfo:
    """Install an uploaded program: Python source (a `main.py`, or one function from pie-client's
    `@inferlet`) plus its `Pie.toml`."""
    name, version = manifest_identity(manifest)
    if data.startswith(WASM_MAGIC):
        raise RequestError(f"{name}@{version} is a WebAssembly component; this server runs Python inferlets. "
                           "Upload the inferlet's Python source (`main.py`) with its Pie.toml instead")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"{name}@{version}: the program is not UTF-8 Python source ({error}); "
                           "upload the text of main.py") from None
    return runtime.add_program(name, version, {PYTHON_ENTRY_FILE: data}, manifest, force=force)


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
                 token_budget: int | None = None) -> ProcessAPI:
    """Launch `program` (name or name@version) with `input` (JSON text) for `username`."""
    check_input(input)
    runtime = state.runtime
    if not runtime.has_program(program):
        raise RequestError(f"unknown inferlet {program!r}; installed: {installed(runtime)}. Check the name, "
                           "or upload it first (add_program, or `pie run --path`)")
    if token_budget is not None and token_budget < 1:
        raise RequestError(f"token_budget is {token_budget}; give a positive number of tokens or none")
    process = await runtime.launch(program, input, username=username, token_budget=token_budget)
    log.info("launched %s as process %s for user %s (input %d bytes)", process.program, process.id, username,
             len(input))
    state.metrics.inc("pie_processes_launched_total", program=process.program)
    state.tasks.spawn(_trace_run(process), name=f"trace-{process.id}")
    return process


def check_input(input: str) -> None:
    try:
        json.loads(input)
    except json.JSONDecodeError as error:
        raise RequestError(f"the input is not JSON ({error}); send a JSON object such as "
                           '{"prompt": "hello"}') from None


def installed(runtime: RuntimeAPI, limit: int = 20) -> str:
    names = sorted(f"{p.name}@{p.version}" for p in runtime.programs())
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe(process: ProcessAPI) -> dict[str, Any]:
    """A `list_processes` row; pie-client documents id, username, program, arguments, elapsed_secs."""
    return {
        "id": process.id,
        "username": process.username,
        "program": process.program,
        "status": process.status,
        "arguments": [],
        "elapsed_secs": round(time.time() - process.started_at, 3),
    }


async def _trace_run(process: ProcessAPI) -> None:
    """One `inferlet.run` span per process, from launch to its final event."""
    with telemetry.span("inferlet.run", process_id=process.id, program=process.program,
                        username=process.username) as span:
        final = await process.wait()
        span.set("outcome", final.kind)
        span.set("status", process.status)
