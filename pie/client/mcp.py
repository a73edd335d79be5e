"""The client's half of session MCP servers: start them, and answer the calls the server relays.

    await client.register_mcp_server("files", command="python", args=["server.py"])

starts the server here (the official `mcp` SDK does the `initialize`
handshake), then registers its name on the connection; inferlets launched on
that connection may call it. Each `mcp_request` from the server is answered by
an `mcp_response` from its own task, so a slow tool delays only its caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pie.mcp_link import INTERNAL_ERROR, McpCallError, McpLink, McpServerSpec, parse_params
from pie.wire.protocol import McpRequest, McpResponse

log = logging.getLogger(__name__)


class ClientMcpServers:
    def __init__(self, send: Callable[[McpResponse], Awaitable[None]]) -> None:
        self._send = send
        self._links: dict[str, McpLink] = {}
        self._answering: set[asyncio.Task[None]] = set()

    async def start(self, spec: McpServerSpec, *, call_timeout_s: float = 30.0) -> None:
        """Start the server and list its tools once, so a broken command fails here and not in an inferlet."""
        link = McpLink(spec, call_timeout_s=call_timeout_s)
        try:
            await link.call("tools/list", {})
        except McpCallError as error:
            await link.close()
            raise ConnectionError(f"MCP server {spec.name!r} ({spec.command or spec.url}) did not start: "
                                  f"{error.message}") from None
        old = self._links.pop(spec.name, None)
        if old is not None:
            await old.close()
        self._links[spec.name] = link

    def answer(self, request: McpRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(request), name=f"mcp-answer-{request.corr_id}")
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, request: McpRequest) -> None:
        link = self._links.get(request.server_name)
        try:
            if link is None:
                raise McpCallError(INTERNAL_ERROR, f"this client runs no MCP server {request.server_name!r}")
            reply = McpResponse(request.corr_id, True, await link.call(request.method, parse_params(request.params)))
        except McpCallError as error:
            reply = McpResponse(request.corr_id, False, error.to_json())
        try:
            await self._send(reply)
        except ConnectionError as error:
            log.info("could not answer an MCP call: %s", error)

    async def close(self) -> None:
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*(link.close() for link in self._links.values()), return_exceptions=True)
        self._links.clear()
