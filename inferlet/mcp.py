"""MCP tools for inferlets, as in Pie's SDK (`inferlet.mcp`).

    from inferlet import mcp

    async def main(input: dict) -> str:
        with mcp.connect("calc") as session:
            tools = json.loads(await session.list_tools())["tools"]
            return await session.call_tool("add", {"a": 2, "b": 3})

The servers an inferlet sees are those of the client session that launched it
(registered with `register_mcp_server`, e.g. `pie run --mcp calc=...`), then
the operator's shared ones (`[[mcp_server]]` in config.toml). Every method
returns the JSON-RPC result as raw JSON text, as in Pie; a failed call raises
`McpError` with the JSON-RPC `code`, `message` and `data`.

Superset of Pie: arguments may be a dict as well as JSON text, and the
session is also an async context manager.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

from inferlet._host import HostError, get_host


class McpError(HostError):
    """An MCP call failed: the server's JSON-RPC error, or the relay's (timeout, no such server)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"MCP error {code}: {message}")
        self.code, self.message, self.data = code, message, data


def available_servers() -> list[str]:
    """Names of the MCP servers this inferlet may connect to."""
    return list(get_host().mcp_servers())


def connect(server_name: str) -> McpSession:
    """A session on one server (no I/O until the first call; the server is already running)."""
    if server_name not in available_servers():
        raise McpError(-32603, f"no MCP server {server_name!r} is available; available: "
                               f"{', '.join(available_servers()) or 'none'}")
    return McpSession(server_name)


class McpSession:
    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        self._closed = False

    async def list_tools(self) -> str:
        return await self._call("tools/list", {})

    async def call_tool(self, name: str, args: str | dict[str, Any] | None = None) -> str:
        return await self._call("tools/call", {"name": name, "arguments": _arguments(args)})

    async def list_resources(self) -> str:
        return await self._call("resources/list", {})

    async def read_resource(self, uri: str) -> str:
        return await self._call("resources/read", {"uri": uri})

    async def list_prompts(self) -> str:
        return await self._call("prompts/list", {})

    async def get_prompt(self, name: str, args: str | dict[str, Any] | None = None) -> str:
        return await self._call("prompts/get", {"name": name, "arguments": _arguments(args)})

    async def _call(self, method: str, params: dict[str, Any]) -> str:
        if self._closed:
            raise McpError(-32603, f"the session on MCP server {self.server_name!r} is closed")
        ok, text = await get_host().mcp_call(self.server_name, method, json.dumps(params))
        if not ok:
            raise _error(text)
        return str(text)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> McpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> McpSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


def _arguments(args: str | dict[str, Any] | None) -> dict[str, Any]:
    """Pie passes arguments as JSON text; a dict is accepted too."""
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as error:
            raise McpError(-32602, f"tool arguments are not JSON: {error}") from None
    if not isinstance(args, dict):
        raise McpError(-32602, f"tool arguments must be a JSON object, got {type(args).__name__}")
    return args


def _error(text: str) -> McpError:
    try:
        d = json.loads(text)
        return McpError(int(d["code"]), str(d["message"]), d.get("data"))
    except (ValueError, KeyError, TypeError):
        return McpError(-32603, str(text))
