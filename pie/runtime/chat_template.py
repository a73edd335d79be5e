"""A model's Jinja chat template, rendered the way Hugging Face's `apply_chat_template` renders it.

The environment mirrors transformers' `_compile_jinja_template`: an immutable
sandbox with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a
`tojson` filter that does not HTML-escape, and the globals `raise_exception`
and `strftime_now`. Templates come from model repositories and are untrusted
code, hence the sandbox.

`ChatTemplate` also answers the question the inferlet API asks: which *text*
does one message add to a conversation? (`ChatFragments`). A template renders
whole conversations, so a message's text is the difference between rendering
an anchor conversation with and without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pie.errors import ChatTemplateError

Message = dict[str, Any]

# A probe text that no template rewrites: used to split a rendered message into the
# template's own text before and after the content.
_MARKER = "\u2063PIE-CONTENT\u2063"
# Two more texts to check that a role's rendering really is `before + text + after`.
_CHECKS = ("Hello world.", " two  spaces\nand a newline ")


class Fragment(NamedTuple):
    """How a template renders one role: `before + content + after` (when `exact`)."""

    before: str
    after: str
    exact: bool  # False: the template rewrites the content; render each message instead
    as_role: str  # the role the message is rendered as (a system message is a user turn for Gemma)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja's API is a class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e} (line {e.lineno})") from None


@dataclass(frozen=True)
class ChatFragments:
    """The text each chat call of the inferlet API adds, derived once from the template.

    - system: rendered as the first message (so it carries the template's
      preamble, e.g. the BOS token).
    - user / assistant / tool: the difference a message makes after an anchor
      conversation (`[user, assistant]` before a user turn, `[user]` before an
      assistant turn), so templates that enforce alternation still render.
    - begin: what the template puts before a conversation that does not open with a system
      message (a BOS token, a default system prompt); the SDK adds it before a first user turn.
    - cue: the generation prompt (`add_generation_prompt=True`) after a user turn.
    - seal: what closes an assistant turn after its content (e.g. `<|im_end|>\\n`).
    """

    system: Fragment
    user: Fragment
    assistant: Fragment
    tool: Fragment | None
    begin: str
    cue: str
    seal: str


class ChatTemplate:
    """One compiled template plus the special-token variables it may read (`bos_token`, ...)."""

    def __init__(self, source: str, variables: dict[str, str]) -> None:
        self.source = source
        self._template = compile_template(source)
        self._variables = variables
        self.supports_tools = "tools" in source

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template refused {_roles(messages)}: {e}") from None

    def delta(self, anchor: list[Message], message: Message, **kwargs: Any) -> str:
        """The text `message` adds after `anchor` (the rendering of `anchor` must be a prefix)."""
        base = self.render(anchor) if anchor else ""
        full = self.render([*anchor, message], **kwargs)
        return full[_common_prefix_len(base, full):]

    def fragments(self) -> ChatFragments:
        user_anchor: list[Message] = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
        assistant_anchor: list[Message] = [{"role": "user", "content": "A"}]
        cue = self.render(assistant_anchor, add_generation_prompt=True)[len(self.render(assistant_anchor)):]
        assistant = self._fragment("assistant", assistant_anchor)
        user = self._fragment("user", user_anchor)
        return ChatFragments(
            system=self._system_fragment(),
            user=user,
            assistant=assistant,
            tool=self._optional_fragment("tool", [*assistant_anchor, {"role": "assistant", "content": "B"}]),
            begin=self._begin(user),
            cue=cue,
            seal=assistant.after,
        )

    def _fragment(self, role: str, anchor: list[Message]) -> Fragment:
        marked = self.delta(anchor, {"role": role, "content": _MARKER})
        before, found, after = marked.partition(_MARKER)
        if not found:
            return Fragment("", "", exact=False, as_role=role)
        exact = all(self.delta(anchor, {"role": role, "content": text}) == before + text + after
                    for text in _CHECKS)
        return Fragment(before, after, exact, as_role=role)

    def _begin(self, user: Fragment) -> str:
        first = self.render([{"role": "user", "content": _MARKER}])
        head, found, _ = first.partition(_MARKER)
        return head[: -len(user.before)] if found and user.before and head.endswith(user.before) else ""

    def _system_fragment(self) -> Fragment:
        """A system message starts the conversation. Templates without a system role (Gemma) get the
        text as a first user turn instead, which such models are trained to read."""
        try:
            return self._fragment("system", [])
        except ChatTemplateError:
            return self._fragment("user", [])

    def _optional_fragment(self, role: str, anchor: list[Message]) -> Fragment | None:
        try:
            fragment = self._fragment(role, anchor)
        except ChatTemplateError:
            return None
        return fragment if fragment.exact else None


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _roles(messages: list[Message]) -> str:
    return "[" + ", ".join(str(m.get("role")) for m in messages) + "]"
