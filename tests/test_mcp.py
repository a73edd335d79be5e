"""MCP tools for inferlets, end to end with real MCP servers written with the official `mcp` SDK:

- session servers: a client registers a stdio server on its connection (`PieClient.register_mcp_server`,
  `pie run --mcp`), the server relays the inferlet's calls to it;
- shared servers: `[[mcp_server]]` started by `pie serve`, in trusted and isolated mode;
- scoping (one session's servers are invisible to another's inferlets) and timeouts (a hung server fails
  its caller while a neighbour generates on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from server_support import running_server, tiny_runtime_config

from pie.client.client import PieClient
from pie.mcp_link import McpServerSpec
from pie.runtime.runtime import RuntimeConfig
from pie.runtime.sandbox import SandboxPolicy

pytest.importorskip("mcp")

SERVER = str(Path(__file__).with_name("mcp_demo_server.py"))
MANIFEST = '[package]\nname = "mcp-probe"\nversion = "0.1.0"\n'
PROGRAM = textwrap.dedent('''
    import json
    from inferlet import mcp

    async def main(input):
        mode = input.get("mode", "use")
        if mode == "list":
            return json.dumps(mcp.available_servers())
        if mode == "hang":
            try:
                with mcp.connect(input["server"]) as s:
                    await s.call_tool("hang", {})
                return "answered"
            except mcp.McpError as e:
                return json.dumps({"code": e.code, "message": e.message})
        if mode == "missing":
            try:
                mcp.connect(input["server"])
                return "connected"
            except mcp.McpError as e:
                return json.dumps({"code": e.code, "message": e.message})
        with mcp.connect(input.get("server", "demo")) as s:
            tools = sorted(t["name"] for t in json.loads(await s.list_tools())["tools"])
            added = json.loads(await s.call_tool("add", json.dumps({"a": 2, "b": 3})))
            motd = json.loads(await s.read_resource("note://motd"))
            prompt = json.loads(await s.get_prompt("greet", {"name": "bob"}))
            resources = json.loads(await s.list_resources())
            prompts = json.loads(await s.list_prompts())
            try:
                await s.call_tool("add", {"a": "x"})
                bad = "accepted"
            except mcp.McpError as e:
                bad = "error"
            bad_result = json.loads(await s.call_tool("nope", {}))
        return json.dumps({
            "tools": tools, "sum": added["structuredContent"]["result"],
            "motd": motd["contents"][0]["text"],
            "prompt": prompt["messages"][0]["content"]["text"],
            "resources": [r["uri"] for r in resources["resources"]],
            "prompts": [p["name"] for p in prompts["prompts"]],
            "unknown_tool_is_error": bad_result.get("isError", False) or bad == "error",
        })
''')
USED = {"tools": ["add", "hang", "shout"], "sum": 5, "motd": "pie serves programs",
        "prompt": "Say hello to bob", "resources": ["note://motd"], "prompts": ["greet"],
        "unknown_tool_is_error": True}


async def run_probe(client: PieClient, **input: Any) -> Any:
    await client.install_program(PROGRAM.encode(), MANIFEST, force=True)
    process = await client.launch("mcp-probe", input)
    return json.loads(await process.result())


def shared_config(isolated: bool = False, timeout_s: float = 30.0) -> RuntimeConfig:
    base = tiny_runtime_config()
    return dataclasses.replace(base, mcp_servers=(McpServerSpec("shared", command=sys.executable, args=(SERVER, "shared")),),
                               mcp_call_timeout_s=timeout_s, sandbox=SandboxPolicy() if isolated else None)


async def test_a_session_server_is_listed_and_called_through_the_client() -> None:
    async with running_server() as server, PieClient(server.url) as client:
        await client.authenticate("alice")
        await client.register_mcp_server("demo", sys.executable, [SERVER])
        assert await run_probe(client, mode="list") == ["demo"]
        assert await run_probe(client) == USED


async def test_another_sessions_servers_are_invisible() -> None:
    async with running_server() as server, PieClient(server.url) as alice, PieClient(server.url) as bob:
        await alice.authenticate("alice")
        await bob.authenticate("bob")
        await alice.register_mcp_server("secret", sys.executable, [SERVER])
        assert await run_probe(bob, mode="list") == []
        refused = await run_probe(bob, mode="missing", server="secret")
        assert "no MCP server 'secret'" in refused["message"]
        assert await run_probe(alice, mode="list") == ["secret"]


@pytest.mark.parametrize("isolated", [False, True], ids=["trusted", "isolated"])
async def test_a_shared_server_from_the_config_serves_every_inferlet(isolated: bool) -> None:
    async with running_server(shared_config(isolated)) as server, PieClient(server.url) as client:
        await client.authenticate("carol")
        assert await run_probe(client, mode="list") == ["shared"]
        assert await run_probe(client, server="shared") == USED


async def test_a_hung_server_times_out_while_a_neighbour_generates() -> None:
    async with running_server(shared_config(timeout_s=3.0)) as server, PieClient(server.url) as client:
        await client.authenticate("dave")
        await client.install_program(PROGRAM.encode(), MANIFEST, force=True)
        hung = await client.launch("mcp-probe", {"mode": "hang", "server": "shared"})
        neighbour = await client.launch("text-completion", {"prompt": "Hello", "max_tokens": 8})
        text = await asyncio.wait_for(neighbour.result(), timeout=120)
        assert isinstance(text, str)
        outcome = json.loads(await asyncio.wait_for(hung.result(), timeout=120))
        assert outcome["code"] == -32001 and "did not answer tools/call" in outcome["message"]


def test_pie_run_mcp_starts_the_server_and_offers_it(tmp_path: Path) -> None:
    program = tmp_path / "probe"
    program.mkdir()
    (program / "main.py").write_text(PROGRAM)
    (program / "Pie.toml").write_text(MANIFEST)
    config = tmp_path / "config.toml"
    config.write_text('[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cpu"]\n')
    env = {**os.environ, "PIE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pie.cli", "run", "-c", str(config), "--path", str(program),
                           "--mcp", f"calc={sys.executable} {SERVER}", "--", "--server", "calc"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == USED


async def test_agent_mcp_calls_the_servers_tools_with_arguments_that_fit_their_schemas() -> None:
    async with running_server() as server, PieClient(server.url) as client:
        await client.authenticate("erin")
        await client.register_mcp_server("demo", sys.executable, [SERVER])
        process = await client.launch("agent-mcp", {"question": "What is 2 plus 3?", "tools": "add,shout",
                                                    "max_steps": 2})
        out = json.loads(await process.result())
    assert isinstance(out["answer"], str) and len(out["steps"]) <= 2
    for step in out["steps"]:  # the tiny random model picks arbitrarily, but always a valid call
        args = step["arguments"]
        if step["action"] == "add":
            assert step["observation"] == str(args["a"] + args["b"])
        else:
            assert step["action"] == "shout" and step["observation"] == args["text"].upper()
