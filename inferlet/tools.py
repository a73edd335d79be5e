"""Tool calling: declare tools, detect the model's calls, feed results back.

    ctx.append(tools.equip_prefix(model, [calculator_schema], system="Be exact."))
    ctx.user("What is 2+3?")
    decoder = tools.Decoder(model)
    async for step in ctx.generate(Sampler.argmax(), max_tokens=128):
        event = decoder.feed((await step.execute()).tokens)
        if isinstance(event, tools.Event.Call):
            result = run(event.name, event.arguments)
            ctx.seal().append(tools.answer_prefix(model, event.name, result))

Format. Where the model's chat template renders a `tools` list (Qwen 2.5/3,
Llama 3.1, ...) `equip_prefix` is the template's own system turn with the
tools. Otherwise it is a system turn stating pie's convention: a call is one
JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>` and
`</tool_call>`, which is also the Hermes/Qwen format, so one `Decoder` reads
both. Answers use the template's `tool` role, or a user turn wrapping the
result in `<tool_response>` tags where the template has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inferlet._host import get_host
from inferlet._tags import TagScanner
from inferlet.chat import TextStream
from inferlet.grammar import Grammar, Matcher
from inferlet.model import Model


def equip_prefix(model: Model, tools: list[str | dict[str, Any]], *, system: str = "") -> list[int]:
    """Tokens of a system turn (with `system` as its text) declaring `tools` (JSON schemas: OpenAI
    `{"type": "function", "function": {...}}` objects, bare `{"name", "parameters"}` ones, or JSON text)."""
    schemas = [_as_tool(t) for t in tools]
    return get_host().chat_tokens(model.name, "tools", json.dumps({"system": system, "tools": schemas}))


def answer_prefix(model: Model, name: str, value: str | dict[str, Any] | list[Any]) -> list[int]:
    """Tokens of the turn that hands tool `name`'s result back to the model."""
    content = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return get_host().chat_tokens(model.name, "tool", json.dumps({"name": name, "content": content}))


def native_matcher(model: Model, tools: list[str | dict[str, Any]]) -> Matcher | None:
    """A grammar matcher for one call of one of `tools` in the model's tool-call format: the call tags
    around `{"name": <one of the tools>, "arguments": <that tool's parameters schema>}`, so the call always
    parses and its arguments validate. None when `tools` is empty (nothing could be called)."""
    schemas = [_as_tool(t)["function"] for t in tools]
    if not schemas:
        return None
    start, end = model.info.get("tool_call_tags") or ["<tool_call>", "</tool_call>"]
    call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                       "properties": {"name": {"const": f["name"]},
                                      "arguments": f.get("parameters") or {"type": "object"}}}
                      for f in schemas],
            "x-guidance": {"whitespace_flexible": False}}
    lark = f"start: {json.dumps(start)} %json {json.dumps(call)} {json.dumps(end)}\n"
    return Matcher(Grammar.from_ebnf(lark), model)


def _as_tool(tool: str | dict[str, Any]) -> dict[str, Any]:
    value = json.loads(tool) if isinstance(tool, str) else dict(tool)
    if "function" in value or value.get("type") == "function":
        return value
    if "name" not in value:
        raise ValueError(f"a tool schema needs a `name`; got keys {sorted(value)}")
    return {"type": "function", "function": value}


@dataclass(frozen=True, slots=True)
class Idle:
    pass


@dataclass(frozen=True, slots=True)
class Start:
    """A tool call began (its arguments are still being generated)."""


@dataclass(frozen=True, slots=True)
class Call:
    """A complete call: `args` is the JSON text of the arguments (`arguments` parses it)."""

    name: str
    args: str

    @property
    def arguments(self) -> Any:
        return json.loads(self.args) if self.args else {}


class Event:
    Idle = Idle
    Start = Start
    Call = Call


# What a Decoder's `feed` returns (Pie's name for the union).
AnyEvent = Idle | Start | Call


class Decoder:
    def __init__(self, model: Model) -> None:
        tags = model.info.get("tool_call_tags") or ["<tool_call>", "</tool_call>"]
        self._model = model
        self._tags = (str(tags[0]), str(tags[1]))
        self.reset()

    def reset(self) -> None:
        self._stream = TextStream(self._model, render_special=True)
        self._scan = TagScanner(*self._tags)
        self._body: list[str] = []
        self.calls: list[Call] = []

    def feed(self, tokens: list[int]) -> Idle | Start | Call:
        """Call (when a closing tag completes one) > Start > Idle. Malformed call text raises ValueError
        naming it, so the inferlet can tell the model."""
        started, call = False, None
        for kind, value in self._scan.push(self._stream.push(list(tokens))):
            if kind == "open":
                started, self._body = True, []
            elif kind == "inner":
                self._body.append(value)
            elif kind == "close":
                call = _parse_call("".join(self._body))
                self.calls.append(call)
        if call is not None:
            return call
        return Start() if started else Idle()


def _parse_call(text: str) -> Call:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tool call is not JSON ({e}): {text.strip()[:200]!r}") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError(f"tool call needs {{\"name\": ..., \"arguments\": {{...}}}}, got {text.strip()[:200]!r}")
    args = value.get("arguments", value.get("parameters", {}))
    return Call(value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
