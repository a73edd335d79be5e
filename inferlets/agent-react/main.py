"""A ReAct agent whose tools run inside the inferlet, next to the KV cache: no client round trip.

Each step the model writes one JSON action {"thought", "action", "input"} constrained by a JSON schema
(so it always parses); a tool action is run here and its result appended as the tool's answer turn;
"finish" ends with the answer. On the last step the schema only allows "finish".
"""

import ast
import operator

from inferlet import Context, Model, Sampler, tools

FACTS = {
    "pie": "Pie is a programmable LLM serving system; inferlets drive generation.",
    "paris": "Paris is the capital of France.",
    "water": "Water boils at 100 degrees Celsius at sea level.",
}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Mod: operator.mod}


def calculator(expression: str) -> str:
    """Arithmetic only: numbers, + - * / % ** and parentheses (no names, no calls)."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")
    try:
        return str(value(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"


def lookup(topic: str) -> str:
    return FACTS.get(topic.strip().lower(), f"no entry for {topic!r}; known: {', '.join(sorted(FACTS))}")


TOOLS = {"calculator": calculator, "lookup": lookup}
TOOL_SCHEMAS = [
    {"name": "calculator", "description": "evaluate arithmetic, e.g. 2*(3+4)",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}},
    {"name": "lookup", "description": "look up a short fact about a topic",
     "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}}},
]


def action_schema(actions: list[str]) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["thought", "action", "input"],
            "properties": {"thought": {"type": "string", "maxLength": 48},
                           "action": {"enum": actions},
                           "input": {"type": "string", "maxLength": 32}}}


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    max_steps = int(input.get("max_steps", 4))
    temperature = float(input.get("temperature", 0.0))
    sampler = Sampler.top_p(temperature, 0.95) if temperature > 0 else Sampler.argmax()

    ctx = Context(model)
    ctx.append(tools.equip_prefix(model, TOOL_SCHEMAS, system=(
        "Solve the task step by step. Each reply is one JSON object with a thought, an action "
        "(a tool name, or finish) and its input (for finish: the answer).")))
    ctx.user(str(input.get("question", "")))
    trace = []
    for step in range(max_steps + 1):
        actions = ["finish"] if step == max_steps else [*TOOLS, "finish"]
        act = await ctx.generate(sampler, max_tokens=256).collect_json(schema=action_schema(actions))
        ctx.seal()
        if act["action"] == "finish":
            trace.append({"thought": act["thought"], "answer": act["input"]})
            return {"answer": act["input"], "steps": trace}
        observation = TOOLS[act["action"]](act["input"])
        trace.append({"thought": act["thought"], "action": act["action"], "input": act["input"],
                      "observation": observation})
        ctx.append(tools.answer_prefix(model, act["action"], observation))
    raise AssertionError("unreachable: the last step can only finish")
