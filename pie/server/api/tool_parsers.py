"""Tool calls in a model's own text format: parse them out of generated text, write them into a
history the template cannot render natively, and build the grammar that forces a call.

One `ToolFormat` per family of chat templates:

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Hermes, Qwen 2.5/3, and
  pie's own convention for templates without tools, `pie.runtime.tokenizer.TOOL_CONVENTION`);
- `llama3_json`: a bare `{"name": ..., "parameters": {...}}` object, several joined by `;`
  (Llama 3.1/3.2 JSON tool calling), optionally after `<|python_tag|>`;
- `mistral`: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}` objects.

A forced call (`tool_choice` required or a named function) is generated under the format's Lark
grammar, whose argument part is each function's JSON schema, so the arguments always parse and
validate. Property order follows the schema, so `name` comes first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Compact JSON inside the grammar: with flexible whitespace a small model can pad forever.
_COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass(frozen=True)
class Function:
    """One declared tool: `parameters` is its JSON schema (an object schema)."""

    name: str
    description: str
    parameters: dict[str, Any]


TokenId = Callable[[str], int | None]  # the id of a special token's text, if it is one token


class ToolFormat:
    name = "hermes"
    open_tag, close_tag = "<tool_call>", "</tool_call>"
    arguments_key = "arguments"

    def call_text(self, call: ToolCall) -> str:
        """How one call appears in the model's own output (for histories the template cannot render)."""
        body = json.dumps({"name": call.name, "arguments": _loads_or_text(call.arguments)}, ensure_ascii=False)
        return f"{self.open_tag}\n{body}\n{self.close_tag}"

    def hold_from(self, text: str) -> int | None:
        """Where text that may be a tool call starts (streaming holds it back), or None."""
        return _marker_start(text, self.open_tag)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the text outside calls, the calls). Text that does not parse as a call stays text."""
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        pattern = re.compile(re.escape(self.open_tag) + r"(.*?)(?:" + re.escape(self.close_tag) + r"|\Z)", re.S)
        for match in pattern.finditer(text):
            call = _call_object(match.group(1), self.arguments_key)
            if call is None:
                continue
            kept.append(text[pos:match.start()])
            pos = match.end()
            calls.append(call)
        kept.append(text[pos:])
        return "".join(kept).strip() if calls else text, calls

    def grammar(self, functions: list[Function], parallel: bool, token_id: TokenId) -> str:
        call = f'"{_lark_escape(self.open_tag)}\\n" fn "\\n{_lark_escape(self.close_tag)}"'
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return "\n".join([start, f"call: {call}", _function_rules(functions, self.arguments_key)])


class Llama3Json(ToolFormat):
    name = "llama3_json"
    arguments_key = "parameters"
    python_tag = "<|python_tag|>"

    def call_text(self, call: ToolCall) -> str:
        return json.dumps({"name": call.name, "parameters": _loads_or_text(call.arguments)}, ensure_ascii=False)

    def hold_from(self, text: str) -> int | None:
        stripped = text.lstrip()
        if not stripped:
            return None
        start = len(text) - len(stripped)
        tag = self.python_tag
        if stripped.startswith("{") or stripped.startswith(tag) or tag.startswith(stripped):
            return start
        return None

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix(self.python_tag).strip()
        if not body.startswith("{"):
            return text, []
        calls = [_call_object(part, self.arguments_key) for part in _split_json_objects(body)]
        if not calls or any(c is None for c in calls):
            return text, []
        return "", [c for c in calls if c is not None]

    def grammar(self, functions: list[Function], parallel: bool, token_id: TokenId) -> str:
        start = 'start: fn (";" fn)*' if parallel else "start: fn"
        return "\n".join([start, _function_rules(functions, self.arguments_key)])


class Mistral(ToolFormat):
    name = "mistral"
    marker = "[TOOL_CALLS]"

    def call_text(self, call: ToolCall) -> str:
        body = [{"name": call.name, "arguments": _loads_or_text(call.arguments)}]
        return self.marker + json.dumps(body, ensure_ascii=False)

    def hold_from(self, text: str) -> int | None:
        return _marker_start(text, self.marker)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        head, found, tail = text.partition(self.marker)
        if not found:
            return text, []
        try:
            value = json.loads(tail.strip())
        except json.JSONDecodeError:
            return text, []
        items = value if isinstance(value, list) else [value]
        calls = [_call_value(item, "arguments") for item in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return head.strip(), [c for c in calls if c is not None]

    def grammar(self, functions: list[Function], parallel: bool, token_id: TokenId) -> str:
        marker_id = token_id(self.marker)
        opener = f"<[{marker_id}]>" if marker_id is not None else f'"{_lark_escape(self.marker)}"'
        item = {"anyOf": [_call_schema(f, "arguments") for f in functions]}
        array: dict[str, Any] = {"type": "array", "items": item, "minItems": 1, "x-guidance": _COMPACT}
        if not parallel:
            array["maxItems"] = 1
        return f"start: {opener} calls\ncalls: %json{json.dumps(array)}"


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (ToolFormat(), Llama3Json(), Mistral())}


def detect_format(template_source: str | None) -> ToolFormat:
    """The tool-call format a chat template teaches (hermes for templates without tools: pie's
    convention uses the same tags)."""
    source = template_source or ""
    if "[TOOL_CALLS]" in source:
        return FORMATS["mistral"]
    if "<tool_call>" in source:
        return FORMATS["hermes"]
    if "<|python_tag|>" in source or "ipython" in source:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def _function_rules(functions: list[Function], arguments_key: str) -> str:
    names = [f"fn_{i}" for i in range(len(functions))]
    rules = [f"fn: {' | '.join(names)}"]
    for name, function in zip(names, functions, strict=True):
        rules.append(f"{name}: %json{json.dumps(_call_schema(function, arguments_key))}")
    return "\n".join(rules)


def _call_schema(function: Function, arguments_key: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": function.name},
                                             arguments_key: function.parameters or {"type": "object"}},
            "required": ["name", arguments_key], "additionalProperties": False, "x-guidance": _COMPACT}


def _call_object(text: str, arguments_key: str) -> ToolCall | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    return _call_value(value, arguments_key)


def _call_value(value: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(args, str):
        return ToolCall(value["name"], args)
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def _split_json_objects(text: str) -> list[str]:
    """`{...}; {...}` -> the object texts (a decoder walks them, so `;` inside strings is safe)."""
    decoder, parts, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return [text]  # not a list of objects: one part, which then fails to parse as a call
        parts.append(text[pos:end])
        pos = end
        while pos < len(text) and text[pos] in " \n\t;":
            pos += 1
    return parts


def _marker_start(text: str, marker: str) -> int | None:
    """Where `marker` starts in `text`, or where a prefix of it ends the text."""
    found = text.find(marker)
    if found >= 0:
        return found
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return len(text) - n
    return None


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _lark_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
