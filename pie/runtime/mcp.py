"""The MCP servers one inferlet may use, and how its calls reach them.

Two kinds of server, as the inferlet sees them:

- **session servers**: registered by the client that launched the inferlet
  (`register_mcp_server` on its connection). They run on the client's
  machine; the server relays each call to that client (`McpRelay`) and awaits
  its answer. An inferlet sees only the servers of the session that launched
  it, never another session's or another user's.
- **shared servers**: declared by the operator in config.toml
  (`[[mcp_server]]`), started and supervised by `pie serve`, usable by every
  inferlet (`SharedMcpServers`).

A session server shadows a shared one of the same name (the client's own
choice wins). Every call is bounded by a timeout, so a hung server fails its
caller and stalls nobody else. In isolated mode the sandbox reaches all of
them only through these host calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from pie.mcp_link import INTERNAL_ERROR, McpCallError, McpLink, McpServerSpec, parse_params

log = logging.getLogger(__name__)


class McpRelay(Protocol):
    """A client session's MCP servers, reached through that client (`pie.server.mcp_relay`)."""

    def servers(self) -> list[str]: ...

    async def request(self, server: str, method: str, params: str) -> str: ...  # raises McpCallError


class SharedMcpServers:
    """The operator's `[[mcp_server]]`s: one supervised link each, shared by every inferlet."""

    def __init__(self, specs: Iterable[McpServerSpec], *, call_timeout_s: float = 30.0) -> None:
        self._links = {s.name: McpLink(s, call_timeout_s=call_timeout_s) for s in specs}
        self._warming: set[asyncio.Task[None]] = set()

    def names(self) -> list[str]:
        return list(self._links)

    def start(self) -> None:
        """Start every server in the background, so a bad command is logged at startup, not at first use."""
        for name in self._links:
            task = asyncio.get_running_loop().create_task(self._warm(name), name=f"mcp-warm-{name}")
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def _warm(self, name: str) -> None:
        try:
            await self._links[name].call("tools/list", {})
        except McpCallError as error:
            log.warning("MCP server %r (config [[mcp_server]]) is not usable yet: %s", name, error.message)

    async def request(self, server: str, method: str, params: str) -> str:
        link = self._links.get(server)
        if link is None:
            raise McpCallError(INTERNAL_ERROR, f"no MCP server {server!r}")
        return await link.call(method, parse_params(params))

    async def close(self) -> None:
        for task in list(self._warming):
            task.cancel()
        await asyncio.gather(*(link.close() for link in self._links.values()), return_exceptions=True)


class McpRouter:
    """One instance's view: its launching session's servers, then the shared ones."""

    def __init__(self, session: McpRelay | None, shared: SharedMcpServers | None) -> None:
        self._session = session
        self._shared = shared

    def servers(self) -> list[str]:
        own = self._session.servers() if self._session is not None else []
        shared = self._shared.names() if self._shared is not None else []
        return own + [name for name in shared if name not in own]

    async def call(self, server: str, method: str, params: str) -> str:
        if self._session is not None and server in self._session.servers():
            return await self._session.request(server, method, params)
        if self._shared is not None and server in self._shared.names():
            return await self._shared.request(server, method, params)
        known = ", ".join(self.servers()) or "none"
        raise McpCallError(INTERNAL_ERROR, f"no MCP server {server!r} is available to this inferlet "
                                           f"(available: {known}); the client registers session servers "
                                           "(`pie run --mcp NAME=COMMAND`), the operator shared ones "
                                           "([[mcp_server]] in config.toml)")
