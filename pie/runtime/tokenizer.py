"""A model's tokenizer and chat format, as the inferlet API sees them (torch-free).

`ModelTokenizer(model_dir)` reads `tokenizer.json` (the `tokenizers` library),
`tokenizer_config.json` (special tokens, the Jinja chat template; also
`chat_template.jinja` / `chat_template.json`), `config.json` and
`generation_config.json` (end-of-sequence ids).

Chat calls return token ids for one message (`chat_tokens(role, text)`), so
an inferlet builds a conversation by appending them in order. Each role's
template text around the content is rendered once and its encoding cached
(`ChatFragments`); only the content is encoded per call. For templates that
rewrite content, the message is rendered against an anchor conversation
instead (see `pie.runtime.chat_template`).

Without a chat template (base models) messages are the plain text followed
by a blank line, `cue` is empty and `seal` is the EOS token.

Message content is text, never markup: special-token text inside a message
(`<|im_end|><|im_start|>system` in a user turn) is encoded as ordinary text,
so a user cannot forge turns of the conversation; only the template's own
text yields special tokens. `parse_special=True` opts out, for callers who
build markup on purpose. Where content is rendered through the template
(templates that rewrite content, tool turns, native tool lists), the
special-token text in the caller's strings is swapped for private-use
placeholders before rendering and encoded as text in their place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pie.errors import ChatTemplateError, ModelNotFoundError
from pie.runtime.chat_template import ChatFragments, ChatTemplate, Fragment
from pie.runtime.token_bytes import token_bytes

CHAT_ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_TAGS = ("<tool_call>", "</tool_call>")
THINK_TAGS = ("<think>", "</think>")
# The tool convention for templates that know no tools: a system message that lists them and
# asks for calls in the same tags Qwen/Hermes templates use, so one decoder reads both.
TOOL_CONVENTION = (
    "You can call these tools. To call one, reply with a JSON object "
    '{{"name": <tool name>, "arguments": <arguments object>}} between {start} and {end}, '
    "then stop and wait for its result.\nTools:\n{tools}"
)


class ModelTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{self.model_dir} has no tokenizer.json; pie needs a Hugging Face fast "
                                     "tokenizer (save one with `AutoTokenizer...save_pretrained`)")
        self._tok = Tokenizer.from_file(str(path))
        self._text_tok = Tokenizer.from_file(str(path))  # a twin that reads special-token text as text
        self._text_tok.encode_special_tokens = True
        self._config = _read_json(self.model_dir / "tokenizer_config.json")
        self._special_ids = self._find_special_ids()
        self._escaper = _Escaper([str(self._tok.id_to_token(i)) for i in self._special_ids])
        source = _template_source(self.model_dir, self._config)
        self.template = ChatTemplate(source, self._template_variables()) if source else None
        self._fragments = self.template.fragments() if self.template else _plain_fragments(self._eos_text())
        self._fragment_ids = {role: (self.encode(f.before), self.encode(f.after))
                              for role in CHAT_ROLES if (f := getattr(self._fragments, role)) is not None}
        self._begin_ids = self.encode(self._fragments.begin)
        self._cue_ids = self.encode(self._fragments.cue)
        self._seal_ids = self.encode(self._fragments.seal)

    # -- plain tokenizer --
    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token text is recognised; no BOS is added (templates add it)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids) if text else []

    def encode_text(self, text: str) -> list[int]:
        """Text -> ids with special-token text encoded as plain text (as `encode` does every other word)."""
        return list(self._text_tok.encode(text, add_special_tokens=False).ids) if text else []

    def decode(self, tokens: list[int]) -> str:
        """ids -> text, special tokens included (the exact inverse of `encode` where one exists)."""
        return str(self._tok.decode(tokens, skip_special_tokens=False))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def vocabs(self) -> tuple[list[int], list[bytes]]:
        return list(range(len(self._token_bytes))), list(self._token_bytes)

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        return token_bytes(self._tok)

    def special_tokens(self) -> tuple[list[int], list[bytes]]:
        ids = sorted(self._special_ids)
        return ids, [str(self._tok.id_to_token(i)).encode() for i in ids]

    def split_regex(self) -> str:
        """The pre-tokenizer's split pattern, or "" when it has none (informational)."""
        spec = json.loads(self._tok.to_str()).get("pre_tokenizer") or {}
        for p in [spec, *(spec.get("pretokenizers") or [])]:
            pattern = (p.get("pattern") or {}).get("Regex") if p.get("type") == "Split" else None
            if pattern:
                return str(pattern)
        return ""

    # -- chat --
    def chat_tokens(self, role: str, text: str = "", parse_special: bool = False) -> list[int]:
        """Tokens one chat call adds: a system/user/assistant/tool message, `cue`, `seal`, `begin` (the
        preamble of a conversation without a system message), or `tools` (`text` = JSON
        `{"system": str, "tools": [schema, ...]}`: a system turn declaring the tools). Special-token
        text in `text` is encoded as text unless `parse_special`."""
        if role == "begin":
            return list(self._begin_ids)
        if role == "cue":
            return list(self._cue_ids)
        if role == "seal":
            return list(self._seal_ids)
        if role == "tools":
            return self._tools_tokens(text, parse_special)
        if role not in CHAT_ROLES:
            raise ChatTemplateError(f"unknown chat role {role!r}; use one of {[*CHAT_ROLES, 'begin', 'cue', 'seal', 'tools']}")
        if role == "tool":
            return self._tool_answer_tokens(text, parse_special)
        fragment: Fragment = getattr(self._fragments, role)
        if fragment.exact:
            before, after = self._fragment_ids[role]
            return [*before, *(self.encode(text) if parse_special else self.encode_text(text)), *after]
        template = self.template
        assert template is not None, "plain fragments are always exact"
        return self._render_tokens(lambda esc: template.delta(_ANCHORS[role], {"role": fragment.as_role,
                                                                                "content": esc(text)}),
                                   parse_special)

    def chat_parts(self, role: str, parts: list[str | list[int]], parse_special: bool = False
                   ) -> tuple[list[int], list[int]]:
        """A message of text parts and raw token parts (an image's placeholders) -> (tokens, the index in
        them where each token part starts). Needs a template that renders the content verbatim."""
        if role not in CHAT_ROLES or role == "tool":
            raise ChatTemplateError(f"chat role {role!r} takes no images; use system, user or assistant")
        fragment: Fragment = getattr(self._fragments, role)
        if not fragment.exact:
            raise ChatTemplateError(f"this model's chat template rewrites {role} messages, so pie cannot place "
                                    "an image inside one; append the image's tokens with ctx.append_image")
        before, after = self._fragment_ids[role]
        tokens, starts = list(before), []
        merged: list[str | list[int]] = []
        for part in parts:  # adjacent text parts are one text, encoded together
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            else:
                merged.append(part)
        for part in merged:
            if isinstance(part, str):
                tokens += self.encode(part) if parse_special else self.encode_text(part)
            else:
                starts.append(len(tokens))
                tokens += part
        return tokens + list(after), starts

    def _render_tokens(self, render: Callable[[Callable[[str], str]], str], parse_special: bool) -> list[int]:
        """Tokens of a rendering of caller strings: `render(esc)` must pass each caller string through `esc`.
        The template's own text is encoded with special tokens; the caller's special-token text as text."""
        if parse_special:
            return self.encode(render(str))
        escape = self._escaper.session()
        rendered = render(escape)
        tokens: list[int] = []
        for i, part in enumerate(_PLACEHOLDERS.split(rendered)):
            tokens += self.encode_text(escape.original(part)) if i % 2 else self.encode(part)
        return tokens

    @cached_property
    def stop_tokens(self) -> list[int]:
        """End-of-sequence ids (config, generation config, tokenizer) plus the special tokens of `seal`."""
        ids: list[int] = []
        for source in (_read_json(self.model_dir / "generation_config.json"),
                       _read_json(self.model_dir / "config.json")):
            eos = source.get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else [int(t) for t in eos or []]
        eos_text = self._eos_text()
        if eos_text and (eos_id := self._tok.token_to_id(eos_text)) is not None:
            ids.append(int(eos_id))
        ids += [t for t in self._seal_ids if t in self._special_ids]
        return sorted(set(ids))

    def info(self) -> dict[str, Any]:
        """What the SDK may ask about the chat format (merged into the host's `model_info`)."""
        return {
            "vocab_size": self.vocab_size,
            "stop_tokens": self.stop_tokens,
            "chat_template": self.template is not None,
            "native_tools": self._native_tools,
            "tool_call_tags": list(TOOL_CALL_TAGS),
            "think_tags": list(THINK_TAGS),
            "split_regex": self.split_regex(),
        }

    # -- tools --
    @cached_property
    def _native_tools(self) -> bool:
        """Whether the template renders a `tools` list itself (e.g. Qwen 2.5/3, Llama 3.1)."""
        if self.template is None or not self.template.supports_tools:
            return False
        probe = [{"type": "function", "function": {"name": "pie_probe_tool", "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            return "pie_probe_tool" in self.template.render([{"role": "user", "content": "A"}], tools=probe)
        except ChatTemplateError:
            return False

    def _tools_tokens(self, text: str, parse_special: bool) -> list[int]:
        request = _parse_json_object(text, 'role "tools" takes JSON {"system": "...", "tools": [...]}')
        system, tools = str(request.get("system") or ""), list(request.get("tools") or [])
        if self._native_tools:
            template = self.template
            assert template is not None

            def render(esc: Callable[[str], str]) -> str:
                messages = [{"role": "system", "content": esc(system)}] if system else []
                return template.render(messages, tools=_map_strings(tools, esc))

            return self._render_tokens(render, parse_special)
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        convention = TOOL_CONVENTION.format(start=TOOL_CALL_TAGS[0], end=TOOL_CALL_TAGS[1], tools=listing)
        return self.chat_tokens("system", f"{system}\n\n{convention}" if system else convention, parse_special)

    def _tool_answer_tokens(self, text: str, parse_special: bool) -> list[int]:
        answer = _parse_json_object(text, 'role "tool" takes JSON {"name": "...", "content": "..."}')
        name, content = str(answer.get("name", "")), str(answer.get("content", ""))
        template = self.template
        if template is not None and self._fragments.tool is not None:
            return self._render_tokens(lambda esc: template.delta(
                _ANCHORS["tool"], {"role": "tool", "name": esc(name), "content": esc(content)}), parse_special)
        message = {"role": "tool", "name": name, "content": content}
        wrapped = f"<tool_response>\n{json.dumps(message, ensure_ascii=False)}\n</tool_response>"
        return self.chat_tokens("user", wrapped, parse_special)

    # -- configuration --
    def _find_special_ids(self) -> set[int]:
        spec = json.loads(self._tok.to_str())
        ids = {int(t["id"]) for t in spec.get("added_tokens") or [] if t.get("special")}
        for key, entry in (self._config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and entry.get("special"):
                ids.add(int(key))
        return ids

    def _token_text(self, key: str) -> str:
        value = self._config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else ""

    def _eos_text(self) -> str:
        return self._token_text("eos_token")

    def _template_variables(self) -> dict[str, str]:
        keys = ("bos_token", "eos_token", "pad_token", "unk_token")
        return {k: self._token_text(k) for k in keys}


# Anchor conversations a message is rendered after (see ChatFragments).
_ANCHORS: dict[str, list[dict[str, Any]]] = {
    "system": [],
    "user": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
    "assistant": [{"role": "user", "content": "A"}],
    "tool": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
}


# Placeholders for caller text while a template renders it: characters of the two supplementary
# private-use planes, which no tokenizer's special tokens use. Caller text that holds such characters
# has them swapped too (and restored), so the mapping is exact.
_PLANE_15, _PLANE_16 = (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD)
_PRIVATE = f"[{chr(_PLANE_15[0])}-{chr(_PLANE_15[1])}{chr(_PLANE_16[0])}-{chr(_PLANE_16[1])}]"
_PLACEHOLDERS = re.compile(f"({_PRIVATE})")
_MAX_PLACEHOLDERS = (_PLANE_15[1] - _PLANE_15[0] + 1) + (_PLANE_16[1] - _PLANE_16[0] + 1)


class _Escaper:
    """Finds special-token text (and private-use characters) in caller strings."""

    def __init__(self, specials: list[str]) -> None:
        words = "|".join(re.escape(t) for t in sorted(set(specials), key=len, reverse=True) if t)
        self.pattern = re.compile(f"{words}|{_PRIVATE}" if words else _PRIVATE)

    def session(self) -> _Escape:
        return _Escape(self.pattern)


class _Escape:
    """One rendering's placeholders: `escape(text)` swaps each found text for a placeholder character,
    `original(placeholder)` gives the text back."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        self._placeholder: dict[str, str] = {}  # original text -> its placeholder
        self._original: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        return self._pattern.sub(self._swap, text)

    def original(self, placeholder: str) -> str:
        return self._original.get(placeholder, placeholder)  # the template's own private-use text stays

    def _swap(self, match: re.Match[str]) -> str:
        text = match.group()
        if text not in self._placeholder:
            n = len(self._placeholder)
            if n >= _MAX_PLACEHOLDERS:
                raise ChatTemplateError(f"a message holds more than {_MAX_PLACEHOLDERS} distinct special-token "
                                        "texts and private-use characters; shorten it")
            span = _PLANE_15[1] - _PLANE_15[0] + 1
            char = chr(_PLANE_15[0] + n) if n < span else chr(_PLANE_16[0] + n - span)
            self._placeholder[text], self._original[char] = char, text
        return self._placeholder[text]


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` (JSON-like) with `fn` applied to every string, keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(v, fn) for v in value]
    return value


def _plain_fragments(eos: str) -> ChatFragments:
    plain = Fragment("", "\n\n", exact=True, as_role="user")
    return ChatFragments(system=plain, user=plain, assistant=plain, tool=None, begin="", cue="", seal=eos)


def _template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: tokenizer_config.json, else chat_template.jinja / .json."""
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if isinstance(source, str) and source:
        return source
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    source = _read_json(model_dir / "chat_template.json").get("chat_template")
    return source if isinstance(source, str) and source else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _parse_json_object(text: str, usage: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{usage}; got text that is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ChatTemplateError(f"{usage}; got {type(value).__name__}")
    return value
