"""The MCP servers a client registered on its connection, reached through that client.

The client runs the servers (`pie.client.mcp`); the server only knows their
names. An inferlet launched on the connection calls one; the call goes to the
client as an `mcp_request` frame and its `mcp_response` resolves the call.
Implements `pie.runtime.mcp.McpRelay` for the instances of one session. When
the connection closes, the servers vanish for those instances and every call
still waiting fails at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from pie.errors import RequestError
from pie.mcp_link import INTERNAL_ERROR, TIMEOUT, McpCallError
from pie.wire.protocol import McpRequest, McpResponse, RegisterMcpServer, ServerMessage

MAX_SERVERS = 64
MAX_NAME = 128


class SessionMcpRelay:
    def __init__(self, send: Callable[[ServerMessage], Awaitable[None]], *, timeout_s: float) -> None:
        self._send = send
        self._timeout_s = timeout_s
        self._names: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[bool, str]]] = {}
        self._closed = False

    def register(self, m: RegisterMcpServer) -> None:
        """Record a server the client offers; the client has started it (and answers for it)."""
        if not m.name or len(m.name) > MAX_NAME or not m.name.isprintable():
            raise RequestError(f"an MCP server name must be 1 to {MAX_NAME} printable characters, got {m.name!r}")
        if m.transport not in ("stdio", "http"):
            raise RequestError(f"MCP server {m.name!r}: transport {m.transport!r} is not one of stdio, http")
        if m.name not in self._names:
            if len(self._names) >= MAX_SERVERS:
                raise RequestError(f"a connection may register at most {MAX_SERVERS} MCP servers")
            self._names.append(m.name)

    def servers(self) -> list[str]:
        return [] if self._closed else list(self._names)

    async def request(self, server: str, method: str, params: str) -> str:
        if self._closed:
            raise McpCallError(INTERNAL_ERROR, f"the client that registered MCP server {server!r} has disconnected")
        corr_id = next(self._ids)
        future: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._waiting[corr_id] = future
        try:
            await self._send(McpRequest(corr_id, server, method, params))
            ok, result = await asyncio.wait_for(future, timeout=self._timeout_s)
        except TimeoutError:
            raise McpCallError(TIMEOUT, f"the client did not answer {method} on MCP server {server!r} within "
                                        f"{self._timeout_s:g} s") from None
        except ConnectionError as error:
            raise McpCallError(INTERNAL_ERROR, f"cannot reach the client of MCP server {server!r}: {error}") from None
        finally:
            self._waiting.pop(corr_id, None)
        if not ok:
            raise McpCallError.from_json(result)
        return result

    def answer(self, m: McpResponse) -> None:
        """The client's answer; one for a call that already timed out (or never was) is dropped."""
        future = self._waiting.get(m.corr_id)
        if future is not None and not future.done():
            future.set_result((m.ok, m.result))

    def close(self) -> None:
        self._closed = True
        gone = McpCallError(INTERNAL_ERROR, "the client that registered this MCP server has disconnected")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(gone)
        self._waiting.clear()
