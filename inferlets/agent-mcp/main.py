"""An agent whose tools are MCP servers: the client's (`pie run --mcp`) or the operator's ([[mcp_server]]).

It lists the tools of the chosen servers, shows them to the model through its chat template, and then
each step the model writes one JSON action, constrained so that it is either a call of one of those tools
with arguments that satisfy that tool's own input schema, or "finish" with the answer. A call is sent to
its server over MCP and the result appended as the tool's answer turn. On the last step only "finish" is
allowed, so the loop always ends with an answer.
"""

import json

from inferlet import Context, Model, Sampler, mcp, tools


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


async def discover(servers: list[str], wanted: list[str]) -> dict:
    """tool name -> (session, MCP tool description); the first server offering a name wins."""
    found = {}
    for server in servers:
        session = mcp.connect(server)
        for tool in json.loads(await session.list_tools())["tools"]:
            if tool["name"] not in found and (not wanted or tool["name"] in wanted):
                found[tool["name"]] = (session, tool)
    return found


def bounded(schema, max_len: int = 64):
    """The tool's schema with every unbounded string, number and object capped, so a call always fits in one step's tokens
    (a tighter schema: whatever it allows, the tool's own schema accepts)."""
    if isinstance(schema, list):
        return [bounded(item, max_len) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded(value, max_len) for key, value in schema.items()}
    if out.get("type") == "string" and "maxLength" not in out and "enum" not in out and "const" not in out:
        out["maxLength"] = max_len
    if out.get("type") == "object":  # and so could extra keys
        out.setdefault("additionalProperties", False)
    if out.get("type") in ("integer", "number"):  # digits, too, could run on forever
        out.setdefault("minimum", -10**9)
        out.setdefault("maximum", 10**9)
    return out


def action_schema(offered: dict, last: bool) -> dict:
    finish = {"type": "object", "additionalProperties": False, "required": ["action", "answer"],
              "properties": {"action": {"const": "finish"}, "answer": {"type": "string", "maxLength": 200}}}
    if last:
        return finish
    calls = [{"type": "object", "additionalProperties": False, "required": ["action", "arguments"],
              "properties": {"action": {"const": name},
                             "arguments": bounded(tool.get("inputSchema") or {"type": "object"})}}
             for name, (_, tool) in offered.items()]
    return {"anyOf": [*calls, finish]}


def observation(result: dict) -> str:
    """The text a tool call returned (its text content items), marked when the call failed."""
    text = "\n".join(item.get("text", "") for item in result.get("content", []) if item.get("type") == "text")
    return f"error: {text}" if result.get("isError") else text


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    max_steps = int(input.get("max_steps", 4))
    temperature = float(input.get("temperature", 0.0))
    sampler = Sampler.top_p(temperature, 0.95) if temperature > 0 else Sampler.argmax()
    servers = _names(input.get("servers")) or mcp.available_servers()
    offered = await discover(servers, _names(input.get("tools")))
    if not offered:
        raise ValueError(f"no MCP tools to use: servers {servers or 'none available'}; register one "
                         "(pie run --mcp NAME=COMMAND) or ask the operator for an [[mcp_server]]")

    ctx = Context(model)
    schemas = [{"name": name, "description": tool.get("description", ""),
                "parameters": tool.get("inputSchema") or {"type": "object"}} for name, (_, tool) in offered.items()]
    ctx.append(tools.equip_prefix(model, schemas, system=(
        "Solve the task. Each reply is one JSON object: a tool call {\"action\": tool, \"arguments\": {...}}, "
        "or {\"action\": \"finish\", \"answer\": ...} when you know the answer.")))
    ctx.user(str(input.get("question", "")))
    trace = []
    for step in range(max_steps + 1):
        act = await ctx.generate(sampler, max_tokens=512).collect_json(
            schema=action_schema(offered, last=step == max_steps))
        ctx.seal()
        if act["action"] == "finish":
            return {"answer": act["answer"], "steps": trace}
        session, _ = offered[act["action"]]
        try:
            seen = observation(json.loads(await session.call_tool(act["action"], act["arguments"])))
        except mcp.McpError as error:
            seen = f"error: {error.message}"
        trace.append({"action": act["action"], "arguments": act["arguments"], "observation": seen})
        ctx.append(tools.answer_prefix(model, act["action"], seen))
    raise AssertionError("unreachable: the last step can only finish")
