"""`pie run`: run one inferlet and print what it streams.

With `--server URL` it connects to a running `pie serve`. Without, it starts
the same stack in this process for one run: the runtime and the server on a
free loopback port, reached with the server's internal token, and stops it
when the inferlet ends.

Output: `stdout` and `message` events go to stdout, `stderr` events to
stderr, the return value is printed last, unless it is the text the messages
already showed (a streaming inferlet sends its text as message deltas, then
returns all of it). With `stream` in the input, messages are printed as they
come, without a newline after each. Exit codes: 0 when the inferlet
returns, 1 when it fails (or anything else goes wrong), 130 on Ctrl-C (the
inferlet is terminated first).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TextIO

from pie.client.client import PieClient, Process
from pie.client.signing import default_key_path
from pie.errors import PieError, RequestError
from pie.mcp_link import McpServerSpec
from pie.runtime.api import FINAL_EVENTS, Event
from pie.server.app import Server, capture_signals
from pie.server.options import ServerOptions
from pie.server.processes import manifest_identity

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130


# Checks (and may convert) the input of a named program against what the server lists:
# (programs query result, name[@version], input) -> input. The CLI passes its Pie.toml check.
InputCheck = Callable[[list[dict[str, Any]], str, dict[str, Any]], dict[str, Any]]


def run_inferlet(config: Any, program: str | None, input: Mapping[str, Any] | str, *,
                 server_url: str | None = None, path: Path | None = None, manifest: Path | None = None,
                 log: Path | None = None, check: InputCheck | None = None,
                 mcp: Sequence[McpServerSpec] = ()) -> int:
    """Run `program` (name[@version]), or the local inferlet at `path`, with `input` (a dict, or JSON text).
    With `check` and a running server, a named program's input is checked before it is launched; `mcp`:
    MCP servers to start here and offer to the inferlet."""
    _setup_logging(log)
    input_json = input if isinstance(input, str) else json.dumps(dict(input))
    try:
        return asyncio.run(_run(config, program, input_json, server_url, path, manifest, check, mcp))
    except (PieError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _run(config: Any, program: str | None, input_json: str, server_url: str | None,
               path: Path | None, manifest: Path | None, check: InputCheck | None,
               mcp: Sequence[McpServerSpec] = ()) -> int:
    async with AsyncExitStack() as stack:
        if server_url is None:
            server = await stack.enter_async_context(LocalServer(config))
            client = await stack.enter_async_context(PieClient(server.url))
            await client.authenticate_token(server.token, getpass.getuser())
        else:
            client = await stack.enter_async_context(PieClient(server_url))
            await client.authenticate(getpass.getuser(), key=default_key_path())
        if path is not None:
            program = await install_local(client, path, manifest)
        if not program:
            raise RequestError("name an inferlet to run (`pie run NAME`) or a local one (`pie run --path DIR`)")
        input = json.loads(input_json)
        if check is not None and path is None and isinstance(input, dict):
            input = check(await client.programs(), program, input)
        for spec in mcp:
            await client.register_mcp_server(spec.name, spec.command, list(spec.args), transport=spec.transport,
                                             url=spec.url or None)
        process = await client.launch(program, input)
        deltas = isinstance(input, dict) and input.get("stream") is True
        return await stream(process, sys.stdout, sys.stderr, deltas=deltas)
    raise AssertionError("unreachable")


class LocalServer:
    """The in-process stack for one run: runtime + server on a free loopback port."""

    def __init__(self, config: Any) -> None:
        options = ServerOptions.from_config(config, host="127.0.0.1", port=0, enable_auth=False,
                                            shutdown_timeout_s=0.0)
        self.server = Server(config, options)
        self.task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> Server:
        self.task = asyncio.create_task(self.server.serve(handle_signals=False))
        started = asyncio.ensure_future(self.server.started.wait())
        await asyncio.wait({self.task, started}, return_when=asyncio.FIRST_COMPLETED)
        if not self.server.started.is_set():
            started.cancel()
            await self.task
            raise PieError("the in-process server did not start (see the messages above)")
        return self.server

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.server.request_exit()
        await self.task


async def install_local(client: PieClient, path: Path, manifest: Path | None) -> str:
    """Upload a local inferlet (a folder with Pie.toml + main.py, or one .py file); returns name@version."""
    source, manifest_text = read_local_program(path, manifest)
    name, version = manifest_identity(manifest_text)
    await client.install_program(source, manifest_text, force=True)
    return f"{name}@{version}"


def read_local_program(path: Path, manifest: Path | None) -> tuple[bytes, str]:
    path = Path(path)
    if path.is_dir():
        main, manifest = path / "main.py", manifest or path / "Pie.toml"
    elif path.suffix == ".py" and path.is_file():
        main = path
        manifest = manifest or (path.parent / "Pie.toml" if (path.parent / "Pie.toml").is_file() else None)
    else:
        raise RequestError(f"{path} is neither a folder holding main.py and Pie.toml nor a .py file")
    if not main.is_file():
        raise RequestError(f"{main} does not exist; an inferlet folder holds main.py and Pie.toml")
    if manifest is None:  # a lone script: name it after the file
        name = path.stem.replace("_", "-")
        return main.read_bytes(), f'[package]\nname = "{name}"\nversion = "0.0.0"\n'
    if not Path(manifest).is_file():
        raise RequestError(f"{manifest} does not exist; pass the inferlet's Pie.toml with --manifest")
    return main.read_bytes(), Path(manifest).read_text()


async def stream(process: Process, out: TextIO, err: TextIO, *, deltas: bool = False) -> int:
    """Print the process's events until it ends; on SIGINT/SIGTERM terminate it and return 130.
    `deltas`: messages are pieces of one text (printed as they are, not one per line)."""
    interrupted = asyncio.Event()
    printer = asyncio.create_task(_print_events(process, out, err, deltas))
    waiter = asyncio.create_task(interrupted.wait())
    with capture_signals(lambda signum: interrupted.set()):
        await asyncio.wait({printer, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if printer.done():
        return printer.result()
    printer.cancel()
    err.write(f"\ninterrupted: terminating process {process.id}\n")
    await process.terminate()
    return EXIT_INTERRUPTED


async def _print_events(process: Process, out: TextIO, err: TextIO, deltas: bool) -> int:
    messages: list[str] = []  # what the message events showed, to not print the same text again
    async for event in process.events():
        _print_event(event, out, err, deltas, messages)
        if event.kind in FINAL_EVENTS:
            return EXIT_OK if event.kind == "return" else EXIT_ERROR
    raise AssertionError("events() ends with a final event")


def _print_event(event: Event, out: TextIO, err: TextIO, deltas: bool, messages: list[str]) -> None:
    value = event.value if isinstance(event.value, str) else event.value.decode("utf-8", errors="replace")
    if event.kind == "stdout":
        out.write(value)
    elif event.kind == "stderr":
        err.write(value)
    elif event.kind == "message":
        messages.append(value)
        out.write(value if deltas else value + "\n")
    elif event.kind == "file":
        err.write(f"[file: {len(event.value)} bytes]\n")
    elif event.kind == "return" and messages and value == "".join(messages):
        if deltas and not value.endswith("\n"):
            out.write("\n")  # the streamed text is complete: end its line
    elif event.kind == "return" and value:
        out.write(value if value.endswith("\n") else value + "\n")
    elif event.kind == "error":
        err.write(f"error: {value}\n")
    out.flush()
    err.flush()


def _setup_logging(log: Path | None) -> None:
    """Server logs go to `log` when given, else only warnings reach stderr (the output stays readable)."""
    if log is not None:
        logging.basicConfig(filename=str(log), level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("pie.load")  # the engine's weight-loading lines, on stderr as they come
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (a test may have replaced it since)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass
