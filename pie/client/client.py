"""An async client for `pie serve`: connect, authenticate, install, launch, stream, attach.

    async with PieClient("ws://127.0.0.1:8080") as client:
        await client.authenticate("alice", key="~/.ssh/id_ed25519")
        process = await client.launch("text-completion", {"prompt": "Hello", "max_tokens": 16})
        async for event in process.events():
            print(event.kind, event.value)

Speaks the same wire protocol as the `pie-client` package (see
`pie/wire/protocol.py`) plus what that package cannot: SSH-key
challenge-response and the internal token. See docs/client.md.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from pie.client.mcp import ClientMcpServers
from pie.client.signing import PrivateKey, load_private_key, sign
from pie.errors import AuthError, ProtocolError, RequestError
from pie.mcp_link import McpServerSpec
from pie.runtime.api import FINAL_EVENTS, Event
from pie.wire import protocol
from pie.wire.chunks import Reassembler, check_digest, digest, split
from pie.wire.protocol import (
    AddProgram,
    AttachProcess,
    AuthByToken,
    AuthIdentify,
    AuthProve,
    CheckProgram,
    FileChunk,
    LaunchProcess,
    ListProcesses,
    McpRequest,
    Ping,
    ProcessEvent,
    ProtocolErrorMessage,
    Query,
    RegisterMcpServer,
    Response,
    SignalProcess,
    TerminateProcess,
    TransferFile,
)

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 1024 * 1024 * 1024
_CLOSED = Event("error", "connection to the server closed")


class ProcessFailed(RequestError):
    """The inferlet ended with an error event."""


class PieClient:
    def __init__(self, url: str, *, open_timeout_s: float = 10.0) -> None:
        self.url = normalize_url(url)
        self._open_timeout_s = open_timeout_s
        self._ws: ClientConnection | None = None
        self._listener: asyncio.Task[None] | None = None
        self._corr_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[bool, str]]] = {}
        self._queues: defaultdict[str, asyncio.Queue[Event]] = defaultdict(asyncio.Queue)
        self._downloads = Reassembler(max_bytes=MAX_FILE_BYTES)
        self.protocol_errors: list[str] = []  # `protocol_error` frames the server sent (no corr_id to answer)
        self.mcp = ClientMcpServers(self._send)  # the MCP servers this session offers its inferlets

    async def __aenter__(self) -> PieClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            self._ws = await websockets.connect(self.url, max_size=MAX_FRAME_BYTES,
                                                open_timeout=self._open_timeout_s)
        except (OSError, websockets.InvalidHandshake, TimeoutError) as error:
            raise ConnectionError(f"cannot connect to {self.url}: {error}; is `pie serve` running there?") from None
        self._listener = asyncio.create_task(self._listen(), name="pie-client-listener")

    async def close(self) -> None:
        await self.mcp.close()
        if self._ws is not None:
            await self._ws.close()
        if self._listener is not None:
            await asyncio.gather(self._listener, return_exceptions=True)

    # -- authentication -----------------------------------------------------------------------------

    async def authenticate(self, username: str, *, key: PrivateKey | Path | str | None = None,
                           password: bytes | None = None) -> None:
        """Identify as `username`; when the server asks for proof, sign its challenge with `key`."""
        result = await self._ok(AuthIdentify(0, username), AuthError)
        if result.startswith(("authenticated", "already authenticated")):
            return
        if key is None:
            raise AuthError(f"{self.url} requires key authentication for {username!r}; pass key= (a private "
                            "key whose public half `pie auth add` registered)")
        private = key if isinstance(key, PrivateKey) else load_private_key(key, password)
        signature = sign(private, base64.b64decode(result))
        await self._ok(AuthProve(0, base64.b64encode(signature).decode("ascii")), AuthError)

    async def authenticate_token(self, token: str, username: str | None = None) -> None:
        await self._ok(AuthByToken(0, token, username), AuthError)

    # -- server information -------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._ok(Ping(0))

    async def query(self, subject: str, record: str = "") -> str:
        return await self._ok(Query(0, subject, record))

    async def models(self) -> list[str]:
        return list(json.loads(await self.query("models")))

    async def model_status(self) -> dict[str, dict[str, Any]]:
        return dict(json.loads(await self.query("model_status")))

    async def programs(self) -> list[dict[str, Any]]:
        return list(json.loads(await self.query("programs")))

    async def health(self) -> dict[str, Any]:
        """GET /health on the same server."""
        async with httpx.AsyncClient(timeout=self._open_timeout_s) as http:
            response = await http.get(http_url(self.url) + "/health")
        return dict(response.json())

    # -- programs -----------------------------------------------------------------------------------

    async def check_program(self, program: str) -> bool:
        name, _, version = program.partition("@")
        return await self._ok(CheckProgram(0, name, version or None)) == "true"

    async def install_program(self, source: bytes, manifest: str, *, force: bool = False) -> str:
        """Upload a program (Python source) and its Pie.toml; returns the server's confirmation."""
        chunks, corr_id = split(source), next(self._corr_ids)
        future = self._expect(corr_id)
        for index, chunk in enumerate(chunks):
            await self._send(AddProgram(corr_id, digest(source), manifest, index, len(chunks), chunk, force))
        return _result(await future, RequestError)

    # -- MCP servers --------------------------------------------------------------------------------

    async def register_mcp_server(self, name: str, command: str | None = None, args: list[str] | None = None, *,
                                  transport: str = "stdio", url: str | None = None) -> None:
        """Start an MCP server here (stdio: `command` + `args`; http: `url`) and offer it to the inferlets
        this connection launches from now on. Their calls are relayed here and answered by it."""
        try:
            spec = McpServerSpec(name, transport, command or "", tuple(args or ()), url or "")  # type: ignore[arg-type]
        except ValueError as error:
            raise RequestError(str(error)) from None
        await self.mcp.start(spec)
        await self._ok(RegisterMcpServer(0, name, transport, command, list(args or []), url))

    # -- processes ----------------------------------------------------------------------------------

    async def launch(self, program: str, input: Mapping[str, Any] | None = None, *,
                     capture_outputs: bool = True, token_budget: int | None = None) -> Process:
        message = LaunchProcess(0, program, json.dumps(dict(input or {})), capture_outputs, token_budget)
        return Process(self, await self._ok(message))

    async def attach(self, process_id: str) -> Process:
        await self._ok(AttachProcess(0, process_id))
        return Process(self, process_id)

    async def list_processes(self) -> list[dict[str, Any]]:
        return list(json.loads(await self._ok(ListProcesses(0))))

    async def terminate(self, process_id: str) -> None:
        await self._ok(TerminateProcess(0, process_id))

    async def signal(self, process_id: str, message: str) -> None:
        await self._send(SignalProcess(process_id, message))

    async def send_file(self, process_id: str, data: bytes) -> None:
        chunks, file_hash = split(data), digest(data)
        for index, chunk in enumerate(chunks):
            await self._send(TransferFile(process_id, file_hash, index, len(chunks), chunk))

    async def next_event(self, process_id: str) -> Event:
        return await self._queues[process_id].get()

    # -- plumbing -----------------------------------------------------------------------------------

    async def _ok(self, message: Any, error: type[Exception] = RequestError) -> str:
        """Send a request (its corr_id replaced by a fresh one) and return the result of its `ok` reply."""
        corr_id = next(self._corr_ids)
        future = self._expect(corr_id)
        await self._send(dataclasses.replace(message, corr_id=corr_id))
        return _result(await future, error)

    def _expect(self, corr_id: int) -> asyncio.Future[tuple[bool, str]]:
        if self._ws is None or self._listener is None or self._listener.done():
            raise ConnectionError(f"not connected to {self.url}")
        future: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._pending[corr_id] = future
        return future

    async def _send(self, message: protocol.Message) -> None:
        if self._ws is None:
            raise ConnectionError(f"not connected to {self.url}; call connect() first")
        await self._ws.send(protocol.encode(message))

    async def _listen(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                if isinstance(frame, bytes):
                    self._dispatch(protocol.decode_server(frame))
        except (websockets.ConnectionClosed, ProtocolError) as error:
            log.info("connection to %s ended: %s", self.url, error)
        finally:
            self._fail_all()

    def _dispatch(self, message: protocol.ServerMessage) -> None:
        if isinstance(message, Response):
            future = self._pending.pop(message.corr_id, None)
            if future is not None and not future.done():
                future.set_result((message.ok, message.result))
        elif isinstance(message, ProcessEvent):
            self._queues[message.process_id].put_nowait(Event(message.event, message.value))  # type: ignore[arg-type]
        elif isinstance(message, FileChunk):
            data = self._downloads.feed(message.file_hash, message.chunk_index, message.total_chunks,
                                        message.chunk_data)
            if data is not None:
                check_digest(data, message.file_hash, f"file from process {message.process_id}")
                self._queues[message.process_id].put_nowait(Event("file", data))
        elif isinstance(message, McpRequest):
            self.mcp.answer(message)
        elif isinstance(message, ProtocolErrorMessage):
            log.warning("server refused a frame: %s", message.message)
            self.protocol_errors.append(message.message)

    def _fail_all(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"connection to {self.url} closed"))
        self._pending.clear()
        for queue in self._queues.values():
            queue.put_nowait(_CLOSED)


class Process:
    """A process launched or attached through a `PieClient`."""

    def __init__(self, client: PieClient, process_id: str) -> None:
        self.client = client
        self.id = process_id

    async def events(self) -> AsyncIterator[Event]:
        """Events until the final one (`return` or `error`), which is yielded too."""
        while True:
            event = await self.client.next_event(self.id)
            if event is _CLOSED:
                raise ConnectionError(f"connection closed while streaming process {self.id}")
            yield event
            if event.kind in FINAL_EVENTS:
                return

    async def result(self) -> str:
        """Drain the events; the return value, or `ProcessFailed` with the error."""
        async for event in self.events():
            text = event.value if isinstance(event.value, str) else event.value.decode(errors="replace")
            if event.kind == "return":
                return text
            if event.kind == "error":
                raise ProcessFailed(f"process {self.id} failed: {text}")
        raise AssertionError("events() ends with a final event")

    async def send_message(self, message: str) -> None:
        await self.client.signal(self.id, message)

    async def send_file(self, data: bytes) -> None:
        await self.client.send_file(self.id, data)

    async def terminate(self) -> None:
        await self.client.terminate(self.id)


def normalize_url(url: str) -> str:
    """`host:port`, `http(s)://` or `ws(s)://` -> the `ws(s)://.../v1/ws` endpoint."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path.strip("/") else protocol.WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def http_url(ws_url: str) -> str:
    parts = urlsplit(ws_url)
    return urlunsplit(({"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme), parts.netloc, "", "", ""))


def _result(reply: tuple[bool, str], error: type[Exception]) -> str:
    ok, result = reply
    if not ok:
        raise error(result)
    return result
