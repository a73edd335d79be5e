"""One client connection: its auth state, the processes it streams, its in-flight uploads.

Requests are handled in arrival order on the connection's reader task, so a
client's `signal_process` never overtakes the `launch_process` before it.
Event streaming runs in one pump task per attached process. Whatever goes
wrong with one request is answered to that request (or, lacking a `corr_id`,
with a `protocol_error` frame) and the connection carries on; a server bug is
logged and answered as an internal error rather than dropping the client.

A connection that has not authenticated within `auth_timeout_s`, or that sends
nothing for `idle_timeout_s` while streaming no process, is closed with 4408.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from pie.errors import PieError, RequestError
from pie.runtime.api import FINAL_EVENTS, Event, ProcessAPI
from pie.server import processes
from pie.server.auth import Reply
from pie.server.mcp_relay import SessionMcpRelay
from pie.server.queries import answer_query
from pie.server.state import ServerState
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
    FrameError,
    LaunchDaemon,
    LaunchProcess,
    ListProcesses,
    McpResponse,
    Ping,
    ProcessEvent,
    ProtocolErrorMessage,
    Query,
    RegisterMcpServer,
    Response,
    ServerMessage,
    SignalProcess,
    TerminateProcess,
    TransferFile,
)

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 4408  # close code for the auth and idle timeouts (as HTTP's 408 Request Timeout)


class Session:
    def __init__(self, ws: web.WebSocketResponse, state: ServerState, peer: str) -> None:
        self.ws = ws
        self.state = state
        self.peer = peer
        self.handshake = state.auth.handshake(peer)
        self._auth_deadline = time.monotonic() + state.options.auth_timeout_s
        self._send_lock = asyncio.Lock()
        self._pumps: dict[str, asyncio.Task[None]] = {}  # process id -> event pump
        self._uploads = Reassembler(max_bytes=state.options.max_upload_bytes)
        self._files = Reassembler(max_bytes=state.options.max_upload_bytes)
        self._handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            AuthIdentify: self._auth_identify, AuthProve: self._auth_prove, AuthByToken: self._auth_by_token,
            Query: self._query, CheckProgram: self._check_program, AddProgram: self._add_program,
            LaunchProcess: self._launch, LaunchDaemon: self._launch_daemon, AttachProcess: self._attach,
            ListProcesses: self._list, SignalProcess: self._signal, TerminateProcess: self._terminate,
            TransferFile: self._transfer_file, Ping: self._ping,
            RegisterMcpServer: self._register_mcp_server, McpResponse: self._mcp_response,
        }
        self.mcp = SessionMcpRelay(self.send, timeout_s=state.options.mcp_call_timeout_s)

    @property
    def username(self) -> str:
        assert self.handshake.username is not None, "handlers past auth run only when authenticated"
        return self.handshake.username

    # -- the connection -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._read()
        except ConnectionError as error:
            log.info("connection %s lost: %s", self.peer, error)
        finally:
            self._close()

    async def _read(self) -> None:
        while True:
            try:
                frame = await self.ws.receive(timeout=self._wait_s())
            except TimeoutError:
                if await self._timed_out():
                    return
                continue
            if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if frame.type is WSMsgType.BINARY:
                await self._on_frame(frame.data)
            elif frame.type is WSMsgType.TEXT and self.handshake.authenticated:
                await self._refuse(None, "text frames are not accepted; send one msgpack map per binary frame")
            elif frame.type is WSMsgType.ERROR:  # e.g. a frame over max_frame_bytes: aiohttp closed with 1009
                self.state.metrics.inc("pie_protocol_errors_total")
                log.info("connection %s closed: %s", self.peer, frame.data)
            if self.handshake.exhausted:
                await self.ws.close(code=4401, message=b"too many failed authentication attempts")

    def _wait_s(self) -> float | None:
        """How long the next frame may take: the rest of the auth timeout, then the idle timeout."""
        if not self.handshake.authenticated:
            return max(0.01, self._auth_deadline - time.monotonic())
        return self.state.options.idle_timeout_s or None

    async def _timed_out(self) -> bool:
        """No frame came in time: close the connection (True), unless it is streaming a process."""
        options = self.state.options
        if not self.handshake.authenticated:
            log.info("closing %s: not authenticated within %g s", self.peer, options.auth_timeout_s)
            await self.ws.close(code=CLOSE_TIMEOUT, message=f"not authenticated within "
                                f"{options.auth_timeout_s:g} s".encode())
            return True
        if self._pumps:  # waiting for a process's events is not idleness
            return False
        log.info("closing %s: idle for %g s", self.peer, options.idle_timeout_s)
        await self.ws.close(code=CLOSE_TIMEOUT, message=f"idle for {options.idle_timeout_s:g} s".encode())
        return True

    def _close(self) -> None:
        """Stop streaming; the processes run on, detached (the server reaps them if nobody attaches)."""
        self.mcp.close()
        for process_id, pump in list(self._pumps.items()):
            pump.cancel()
            process = self.state.runtime.process(process_id)
            if process is not None:
                self.state.attachments.detach(process, self)
        self._pumps.clear()

    def release(self, process_id: str) -> None:
        """Another connection attached to `process_id`: stop streaming it here."""
        pump = self._pumps.pop(process_id, None)
        if pump is not None:
            pump.cancel()

    async def send(self, message: ServerMessage) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(protocol.encode(message))

    # -- dispatch -----------------------------------------------------------------------------------

    async def _on_frame(self, data: bytes) -> None:
        try:
            message = protocol.decode_client(data)
        except FrameError as error:
            if self.handshake.authenticated or error.kind in protocol.AUTH_TYPES:
                await self._refuse(error.corr_id, str(error))
            return
        if not self.handshake.authenticated and not isinstance(message, protocol.AUTH_MESSAGES):
            log.debug("dropping %s from unauthenticated %s", message.TYPE, self.peer)
            return
        self.state.metrics.inc("pie_requests_total", type=message.TYPE)
        try:
            await self._handlers[type(message)](message)
        except PieError as error:  # the client's fault, with a message saying what to fix
            await self._refuse(getattr(message, "corr_id", None), str(error))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as error:  # a server bug: keep serving this client and the others
            log.exception("internal error handling %s from %s", message.TYPE, self.peer)
            await self._refuse(getattr(message, "corr_id", None), f"internal server error: {error!r}")

    async def _refuse(self, corr_id: int | None, why: str) -> None:
        """Answer a refused request with its corr_id, or with a `protocol_error` frame when it had none."""
        self.state.metrics.inc("pie_protocol_errors_total")
        if corr_id is not None:
            await self.send(Response(corr_id, False, why))
        else:
            await self.send(ProtocolErrorMessage(why))

    async def _reply(self, corr_id: int, result: str) -> None:
        await self.send(Response(corr_id, True, result))

    # -- auth ---------------------------------------------------------------------------------------

    async def _auth_identify(self, m: AuthIdentify) -> None:
        await self._auth_reply(m.corr_id, self.handshake.identify(m.username))

    async def _auth_prove(self, m: AuthProve) -> None:
        await self._auth_reply(m.corr_id, self.handshake.prove(m.signature))

    async def _auth_by_token(self, m: AuthByToken) -> None:
        await self._auth_reply(m.corr_id, self.handshake.by_token(m.token, m.username))

    async def _auth_reply(self, corr_id: int, reply: Reply) -> None:
        if not reply.ok:
            self.state.metrics.inc("pie_auth_failures_total")
        await self.send(Response(corr_id, reply.ok, reply.result))

    # -- programs -----------------------------------------------------------------------------------

    async def _query(self, m: Query) -> None:
        # Per-user subjects are answered here, where the user is known.
        if m.subject == "finished_processes":
            rows = [processes.describe(p) for p in self.state.runtime.processes(self.username)
                    if p.ended_at is not None]
            await self._reply(m.corr_id, json.dumps(rows))
            return
        if m.subject in ("programs", "inferlets"):  # what this user can launch, their own uploads included
            infos = self.state.runtime.programs(self.username)
            await self._reply(m.corr_id, json.dumps([dataclasses.asdict(p) for p in infos]))
            return
        await self._reply(m.corr_id, answer_query(self.state.runtime, m.subject, m.record))

    async def _check_program(self, m: CheckProgram) -> None:
        spec = f"{m.name}@{m.version}" if m.version else m.name
        await self._reply(m.corr_id, "true" if self.state.runtime.has_program(spec, self.username) else "false")

    async def _add_program(self, m: AddProgram) -> None:
        data = self._uploads.feed(m.program_hash, m.chunk_index, m.total_chunks, m.chunk_data)
        if data is None:
            return  # pie-client expects one reply, after the last chunk
        check_digest(data, m.program_hash, "program upload")
        info = processes.install(self.state.runtime, data, m.manifest, owner=self.username,
                                    force=m.force_overwrite)
        await self._reply(m.corr_id, f"added {info.name}@{info.version}")

    # -- processes ----------------------------------------------------------------------------------

    async def _launch(self, m: LaunchProcess) -> None:
        if self.state.shutting_down:
            raise RequestError("the server is shutting down and launches nothing new; retry on the next start")
        process = await processes.launch(self.state, m.inferlet, m.input, username=self.username,
                                        token_budget=m.token_budget, mcp_session=self.mcp)
        await self._reply(m.corr_id, process.id)
        if m.capture_outputs:
            self._stream(process)

    async def _launch_daemon(self, m: LaunchDaemon) -> None:
        raise RequestError("launch_daemon is not supported: inferlets here cannot serve their own HTTP port; "
                           "use launch_process, or the server's OpenAI-compatible API under /v1")

    async def _attach(self, m: AttachProcess) -> None:
        process = self._owned(m.process_id)
        await self._reply(m.corr_id, "attached")
        self._stream(process)

    async def _list(self, m: ListProcesses) -> None:
        # Live ones only, as in Pie; finished ones stay attachable for their retention time and are
        # listed by `query finished_processes`.
        rows = [processes.describe(p) for p in self.state.runtime.processes(self.username) if p.ended_at is None]
        await self._reply(m.corr_id, json.dumps(rows))

    async def _signal(self, m: SignalProcess) -> None:
        self._owned(m.process_id).send_message(m.message)

    async def _terminate(self, m: TerminateProcess) -> None:
        await self._owned(m.process_id).terminate("terminated by client")
        await self._reply(m.corr_id, "terminated")

    async def _transfer_file(self, m: TransferFile) -> None:
        process = self._owned(m.process_id)
        data = self._files.feed(m.file_hash, m.chunk_index, m.total_chunks, m.chunk_data)
        if data is not None:
            check_digest(data, m.file_hash, f"file for process {m.process_id}")
            process.send_file(data)

    async def _register_mcp_server(self, m: RegisterMcpServer) -> None:
        self.mcp.register(m)
        await self._reply(m.corr_id, f"registered MCP server {m.name}")

    async def _mcp_response(self, m: McpResponse) -> None:
        self.mcp.answer(m)

    async def _ping(self, m: Ping) -> None:
        await self._reply(m.corr_id, "Pong")

    def _owned(self, process_id: str) -> ProcessAPI:
        """The process, if it belongs to this user; others' processes are reported as missing."""
        process = self.state.runtime.process(process_id)
        if process is None or process.username != self.username:
            raise RequestError(f"no process {process_id!r} for user {self.username!r}; "
                               "list_processes shows yours")
        return process

    # -- event streaming ----------------------------------------------------------------------------

    def _stream(self, process: ProcessAPI) -> None:
        self.release(process.id)
        self.state.attachments.attach(process, self)
        self._pumps[process.id] = self.state.tasks.spawn(self._pump(process), name=f"pump-{process.id}")

    async def _pump(self, process: ProcessAPI) -> None:
        try:
            final_sent = False
            async for event in process.events():
                await self._send_event(process.id, event)
                final_sent = event.kind in FINAL_EVENTS
            if not final_sent:  # attached after the end was delivered elsewhere: repeat the outcome
                await self._send_event(process.id, await process.wait())
        except ConnectionError:
            log.info("connection %s went away while streaming %s", self.peer, process.id)
        finally:
            if self._pumps.get(process.id) is asyncio.current_task():
                del self._pumps[process.id]
                self.state.attachments.finished(process.id, self)

    async def _send_event(self, process_id: str, event: Event) -> None:
        self.state.metrics.inc("pie_process_events_total", event=event.kind)
        if event.kind == "file":
            await self._send_file(process_id, _as_bytes(event.value))
        else:
            await self.send(ProcessEvent(process_id, event.kind, _as_text(event.value)))

    async def _send_file(self, process_id: str, data: bytes) -> None:
        file_hash = digest(data)
        chunks = split(data)
        for index, chunk in enumerate(chunks):
            await self.send(FileChunk(process_id, file_hash, index, len(chunks), chunk))


def _as_text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")
