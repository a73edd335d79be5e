"""A real stdio MCP server (the official `mcp` SDK) for the MCP tests: tools, a resource, a prompt.

`hang` never answers, to test timeouts. Run as `python tests/mcp_demo_server.py [NAME]`.
"""

from __future__ import annotations

import sys
import time

from mcp.server.mcpserver import MCPServer

server = MCPServer(sys.argv[1] if len(sys.argv) > 1 else "demo")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


@server.tool()
def hang(seconds: float = 3600.0) -> str:
    """Block far longer than any caller waits."""
    time.sleep(seconds)
    return "woke up"


@server.resource("note://motd")
def motd() -> str:
    return "pie serves programs"


@server.prompt()
def greet(name: str) -> str:
    return f"Say hello to {name}"


if __name__ == "__main__":
    server.run()
