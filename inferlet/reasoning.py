"""Separating a model's reasoning (`<think>...</think>`) from its answer while streaming.

    decoder = reasoning.Decoder(model)
    event = decoder.feed(out.tokens)   # Idle | Start | Delta(text) | End(text)

`Delta` carries reasoning text; `End.text` is the whole reasoning. Text
outside the tags yields Idle (feed the same tokens to a `chat.Decoder` for
the answer). Pass `started=True` when the prompt itself opened the reasoning
block (templates that put `<think>` in the generation prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

from inferlet._tags import TagScanner
from inferlet.chat import TextStream
from inferlet.model import Model


@dataclass(frozen=True, slots=True)
class Idle:
    pass


@dataclass(frozen=True, slots=True)
class Start:
    pass


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class End:
    text: str


class Event:
    Idle = Idle
    Start = Start
    Delta = Delta
    End = End


# What a Decoder's `feed` returns (Pie's name for the union).
AnyEvent = Idle | Start | Delta | End


class Decoder:
    def __init__(self, model: Model, *, started: bool = False) -> None:
        tags = model.info.get("think_tags") or ["<think>", "</think>"]
        self._model = model
        self._tags = (str(tags[0]), str(tags[1]))
        self._started = started
        self.reset()

    def reset(self) -> None:
        self._stream = TextStream(self._model, render_special=True)
        self._scan = TagScanner(*self._tags, inside=self._started)
        self._reasoning: list[str] = []
        self._started_reported = False

    def feed(self, tokens: list[int]) -> Idle | Start | Delta | End:
        """End > Start > Delta > Idle for the events in this chunk (reasoning text is never lost:
        `End.text` holds all of it)."""
        opened, closed, inner = False, False, []
        for kind, value in self._scan.push(self._stream.push(list(tokens))):
            opened |= kind == "open"
            closed |= kind == "close"
            if kind == "inner":
                inner.append(value)
        self._reasoning += inner
        if closed:
            return End("".join(self._reasoning))
        if (opened or self._scan.inside) and not self._started_reported:
            self._started_reported = True
            return Start()
        return Delta("".join(inner)) if inner else Idle()

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)
