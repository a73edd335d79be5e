"""Generated text -> what the APIs return: reasoning (a `<think>` block), content, and tool calls.

`OutputSplitter` works incrementally, so a stream shows reasoning and content as they come and holds
back only text that may be a tool call (or a partial `</think>`); the calls themselves are parsed
when the choice ends. The whole-text path is the same splitter fed once. Harmony models (GPT-OSS)
are split by their tokens instead (`harmony.ChannelParser`): channels are special tokens, not text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pie.server.api.harmony import ChannelParser
from pie.server.api.served import THINK_CLOSE, THINK_OPEN, ServedModel
from pie.server.api.tool_parsers import ToolCall, ToolFormat

Kind = Literal["reasoning", "content"]
Piece = tuple[Kind, str]


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class OutputSplitter:
    def __init__(self, model: ServedModel, *, parse_tools: bool) -> None:
        self._channels = ChannelParser(parse_tools=parse_tools) if model.harmony else None
        self._format: ToolFormat | None = model.tool_format if parse_tools else None
        self._reasoning = model.reasoning
        self._thinking: bool | None = True if model.thinks_from_start else (None if self._reasoning else False)
        self._think = ""  # text while the reasoning phase is open or undecided
        self._content = ""
        self._sent = 0  # content characters handed out
        self._after_think = False

    def push(self, text: str, tokens: list[int] | tuple[int, ...] = ()) -> list[Piece]:
        """The pieces ready after one more delta (`tokens`: its token ids, which harmony reads)."""
        if self._channels is not None:
            return self._channels.push(list(tokens))
        out: list[Piece] = []
        if self._thinking is not False:
            self._think += text
            text = ""
            out += self._advance_think()
            if self._thinking is not False:
                return out
            text, self._think = self._think, ""
        if self._after_think:  # the blank line after `</think>` is no part of the content
            text = text.lstrip()
            self._after_think = not text
        self._content += text
        hold = self._format.hold_from(self._content) if self._format is not None else None
        end = len(self._content) if hold is None else max(hold, self._sent)
        if end > self._sent:
            out.append(("content", self._content[self._sent:end]))
            self._sent = end
        return out

    def finish(self) -> tuple[list[Piece], list[ToolCall]]:
        if self._channels is not None:
            return self._channels.finish()
        out: list[Piece] = []
        if self._thinking is not False:
            # Generation ended inside the reasoning (or before deciding): it is all reasoning, or all content.
            rest, self._think = self._think, ""
            if self._thinking:
                return ([("reasoning", rest)] if rest else []), []
            self._content += rest
        tail = self._content[self._sent:]
        self._sent = len(self._content)
        calls: list[ToolCall] = []
        if self._format is not None and tail:
            tail, calls = self._format.parse(tail)
        if tail:
            out.append(("content", tail))
        return out, calls

    def whole(self, text: str, tokens: list[int] | tuple[int, ...] = ()) -> Split:
        split = Split()
        pieces = self.push(text, tokens)
        more, split.calls = self.finish()
        for kind, piece in [*pieces, *more]:
            if kind == "reasoning":
                split.reasoning += piece
            else:
                split.content += piece
        return split

    def _advance_think(self) -> list[Piece]:
        """Decide whether the output opens with `<think>`, then emit reasoning up to `</think>`."""
        if self._thinking is None:
            stripped = self._think.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._think, self._thinking = stripped[len(THINK_OPEN):], True
            elif THINK_OPEN.startswith(stripped):
                return []  # still could be "<think>"
            else:
                self._thinking = False
                return []
        head, found, tail = self._think.partition(THINK_CLOSE)
        if found:
            self._think, self._thinking, self._after_think = tail, False, True
            return [("reasoning", head)] if head else []
        keep = next((n for n in range(min(len(THINK_CLOSE) - 1, len(head)), 0, -1)
                     if head.endswith(THINK_CLOSE[:n])), 0)
        ready, self._think = head[:len(head) - keep], head[len(head) - keep:]
        return [("reasoning", ready)] if ready else []
