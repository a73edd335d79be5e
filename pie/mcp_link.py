"""One connection to one MCP server, through the official `mcp` SDK.

    link = McpLink(McpServerSpec("files", command="python", args=["server.py"]))
    text = await link.call("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}})
    await link.close()

Both ends of pie use it: the client answers the calls the server relays from
an inferlet to the servers registered on its session (`pie.client.mcp`), and
`pie serve` reaches the servers its config declares (`[[mcp_server]]`,
`pie.runtime.mcp`). A call names a JSON-RPC method of MCP and its params; the
answer is the JSON-RPC result as JSON text, as Pie's inferlet API returns it.

The SDK's client is an async context manager whose task group must be entered
and left by the same task, so one supervisor task per link owns it; calls from
any task go through the connected client and are bounded by a timeout, so a
hung server fails its callers instead of stalling them. A server that died is
started again on the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

Transport = Literal["stdio", "http"]
# JSON-RPC error codes (the JSON-RPC 2.0 spec): what a relay answers when no server produced the error.
INVALID_PARAMS, INTERNAL_ERROR, METHOD_NOT_FOUND, TIMEOUT = -32602, -32603, -32601, -32001


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    """How to reach an MCP server: a command to start (stdio) or a URL (streamable HTTP)."""

    name: str
    transport: Transport = "stdio"
    command: str = ""
    args: tuple[str, ...] = ()
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an MCP server needs a name")
        if self.transport not in ("stdio", "http"):
            raise ValueError(f"MCP server {self.name!r}: transport {self.transport!r} is not one of stdio, http")
        if self.transport == "stdio" and not self.command:
            raise ValueError(f"MCP server {self.name!r}: a stdio server needs a `command`")
        if self.transport == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {self.name!r}: an http server needs an http(s) `url`, got {self.url!r}")


class McpCallError(Exception):
    """A JSON-RPC error from (or about) an MCP call: `code`, `message`, `data`."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"MCP error {code}: {message}")
        self.code, self.message, self.data = code, message, data

    def to_json(self) -> str:
        return json.dumps({"code": self.code, "message": self.message, "data": self.data})

    @classmethod
    def from_json(cls, text: str) -> McpCallError:
        try:
            d = json.loads(text)
            return cls(int(d["code"]), str(d["message"]), d.get("data"))
        except (ValueError, KeyError, TypeError):
            return cls(INTERNAL_ERROR, text)


# The MCP methods an inferlet may call: JSON-RPC method -> how to call the SDK's client with its params.
_METHODS: dict[str, Callable[[Any, dict[str, Any]], Awaitable[Any]]] = {
    "tools/list": lambda c, p: c.list_tools(),
    "tools/call": lambda c, p: c.call_tool(_str(p, "name"), _dict(p, "arguments")),
    "resources/list": lambda c, p: c.list_resources(),
    "resources/read": lambda c, p: c.read_resource(_str(p, "uri")),
    "prompts/list": lambda c, p: c.list_prompts(),
    "prompts/get": lambda c, p: c.get_prompt(_str(p, "name"), {k: str(v) for k, v in _dict(p, "arguments").items()}),
}
METHODS = frozenset(_METHODS)


def _str(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise McpCallError(INVALID_PARAMS, f"params.{key} must be a non-empty string, got {value!r}")
    return value


def _dict(params: dict[str, Any], key: str) -> dict[str, Any]:
    value = params.get(key) or {}
    if not isinstance(value, dict):
        raise McpCallError(INVALID_PARAMS, f"params.{key} must be an object, got {type(value).__name__}")
    return value


def parse_params(text: str) -> dict[str, Any]:
    """A call's params from their JSON text (empty = none)."""
    if not text:
        return {}
    try:
        params = json.loads(text)
    except ValueError as error:
        raise McpCallError(INVALID_PARAMS, f"params are not JSON: {error}") from None
    if not isinstance(params, dict):
        raise McpCallError(INVALID_PARAMS, f"params must be a JSON object, got {type(params).__name__}")
    return params


class McpLink:
    def __init__(self, spec: McpServerSpec, *, call_timeout_s: float = 30.0, start_timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self._client: Any = None  # the SDK's connected `mcp.Client`, while the supervisor holds it open
        self._supervisor: asyncio.Task[None] | None = None
        self._ready: asyncio.Event = asyncio.Event()
        self._stop: asyncio.Event = asyncio.Event()
        self._start_error: BaseException | None = None
        self._connecting = asyncio.Lock()

    async def call(self, method: str, params: dict[str, Any]) -> str:
        """Run one MCP request; the JSON-RPC result as JSON text. Raises `McpCallError`."""
        invoke = _METHODS.get(method)
        if invoke is None:
            raise McpCallError(METHOD_NOT_FOUND, f"method {method!r} is not relayed; known: {', '.join(sorted(METHODS))}")
        client = await self._connected()
        try:
            result = await asyncio.wait_for(invoke(client, params), timeout=self.call_timeout_s)
        except TimeoutError:
            raise McpCallError(TIMEOUT, f"MCP server {self.spec.name!r} did not answer {method} within "
                                        f"{self.call_timeout_s:g} s") from None
        except McpCallError:
            raise
        except Exception as error:
            raise _as_call_error(error, self.spec.name) from None
        return str(result.model_dump_json(by_alias=True, exclude_none=True))

    async def _connected(self) -> Any:
        async with self._connecting:
            if self._supervisor is None or self._supervisor.done():
                self._start()
            ready = asyncio.ensure_future(self._ready.wait())
            assert self._supervisor is not None
            done, _ = await asyncio.wait({ready, self._supervisor}, timeout=self.start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if self._client is None:
                why = repr(self._start_error) if self._start_error else f"no handshake within {self.start_timeout_s:g} s"
                if not done:
                    await self._halt()
                raise McpCallError(INTERNAL_ERROR, f"cannot start MCP server {self.spec.name!r}: {why}")
            return self._client

    def _start(self) -> None:
        self._ready, self._stop, self._start_error, self._client = asyncio.Event(), asyncio.Event(), None, None
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name=f"mcp-{self.spec.name}")

    async def _supervise(self) -> None:
        """Hold the SDK client open (the `initialize` handshake happens on entry) until `close()`."""
        from mcp import Client, StdioServerParameters

        spec = self.spec
        target: Any = spec.url if spec.transport == "http" else StdioServerParameters(
            command=spec.command, args=list(spec.args), env=dict(spec.env) or None)
        try:
            async with Client(target) as client:
                self._client = client
                self._ready.set()
                await self._stop.wait()
        except Exception as error:  # the server failed to start or died: the next call starts it again
            self._start_error = error
            log.warning("MCP server %r stopped: %r", spec.name, error)
        finally:
            self._client = None

    async def _halt(self) -> None:
        if self._supervisor is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._supervisor), timeout=5.0)
        except (TimeoutError, Exception):
            self._supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._supervisor
        self._supervisor = None

    async def close(self) -> None:
        await self._halt()


def _as_call_error(error: Exception, server: str) -> McpCallError:
    """The SDK's protocol errors keep their JSON-RPC code; anything else is an internal error."""
    data = getattr(error, "error", None)  # mcp's McpError carries ErrorData(code, message, data)
    if data is not None and hasattr(data, "code"):
        return McpCallError(int(data.code), str(data.message), getattr(data, "data", None))
    return McpCallError(INTERNAL_ERROR, f"MCP server {server!r} failed: {error!r}")
