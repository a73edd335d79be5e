"""Chat formatting (token lists from the model's chat template) and the streaming text decoder.

`system/user/assistant(model, text)`, `cue(model)` (the generation prompt),
`seal(model)` (end of an assistant turn) and `stop_tokens(model)` return token
ids; `Context`'s fillers append them. `Decoder` turns generated tokens into
text events:

    decoder = chat.Decoder(model)
    event = decoder.feed(out.tokens)
    if isinstance(event, chat.Event.Delta): print(event.text, end="")
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inferlet._host import get_host
from inferlet._instance import instance_state
from inferlet.model import Model

if TYPE_CHECKING:
    from inferlet.image import Media


def system(model: Model, message: str, *, parse_special: bool = False) -> list[int]:
    return get_host().chat_tokens(model.name, "system", message, parse_special)


class Tokens(list[int]):
    """A turn's tokens with the images placed in it: (index of the image's first token, image)."""

    images: list[tuple[int, Media]]

    def __init__(self, tokens: list[int], images: list[tuple[int, Media]]) -> None:
        super().__init__(tokens)
        self.images = images


def user(model: Model, message: str | list[str | Media], *, parse_special: bool = False) -> list[int]:
    """A user turn; `message` may be a list of text parts, `Image`s and `Audio` clips, which take their
    places in it (the result is then `Tokens`, carrying the images' places)."""
    if isinstance(message, str):
        return get_host().chat_tokens(model.name, "user", message, parse_special)
    return parts(model, "user", message, parse_special=parse_special)


def parts(model: Model, role: str, message: list[str | Media], *, parse_special: bool = False) -> Tokens:
    from inferlet.image import Media

    plain: list[Any] = []
    images: list[Media] = []
    for part in message:
        if isinstance(part, Media):
            images.append(part)
            plain.append({part.part_name: part.key})
        elif isinstance(part, str):
            plain.append(part)
        else:
            raise TypeError(f"a message part is a str, an Image or an Audio, got {type(part).__name__}")
    out = get_host().chat_parts(model.name, role, plain, parse_special)
    rows = [int(row) for _, row in out["images"]]
    return Tokens(list(out["tokens"]), list(zip(rows, images, strict=True)))


def assistant(model: Model, message: str, *, parse_special: bool = False) -> list[int]:
    return get_host().chat_tokens(model.name, "assistant", message, parse_special)


def cue(model: Model) -> list[int]:
    return _fixed(model, "cue")


def seal(model: Model) -> list[int]:
    return _fixed(model, "seal")


def begin(model: Model) -> list[int]:
    """What the template puts before a conversation that opens without a system message (BOS, ...)."""
    return _fixed(model, "begin")


def stop_tokens(model: Model) -> list[int]:
    cache = instance_state().chat_tokens
    key = (model.name, "stop")
    if key not in cache:
        cache[key] = list(get_host().stop_tokens(model.name))
    return list(cache[key])


def _fixed(model: Model, role: str) -> list[int]:
    cache = instance_state().chat_tokens
    key = (model.name, role)
    if key not in cache:
        cache[key] = list(get_host().chat_tokens(model.name, role, ""))
    return list(cache[key])


def vocab_bytes(model: Model) -> list[bytes]:
    """The bytes of every token (fetched once per instance)."""
    cache = instance_state().vocab_bytes
    if model.name not in cache:
        cache[model.name] = [bytes(b) for b in get_host().vocabs(model.name)[1]]
    return cache[model.name]


def special_ids(model: Model) -> frozenset[int]:
    cache = instance_state().special_ids
    if model.name not in cache:
        cache[model.name] = frozenset(get_host().special_tokens(model.name)[0])
    return cache[model.name]


class TextStream:
    """Tokens -> text, incrementally: a UTF-8 character split across tokens is held back until complete.
    Special tokens are left out unless `render_special` (tag scanners need `<think>` even when special)."""

    def __init__(self, model: Model, *, render_special: bool = False) -> None:
        self._bytes = vocab_bytes(model)
        self.special = special_ids(model)
        self._hidden = frozenset() if render_special else self.special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tokens: list[int]) -> str:
        n = len(self._bytes)
        data = b"".join(self._bytes[t] for t in tokens if t not in self._hidden and 0 <= t < n)
        return self._utf8.decode(data)

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing to show yet (e.g. half of a multi-byte character)."""


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """The model ended its turn; `text` is the whole reply."""

    text: str


@dataclass(frozen=True, slots=True)
class Interrupt:
    """A special token that is not an end of turn (a tool or image marker, ...)."""

    token: int


class Event:
    Idle = Idle
    Delta = Delta
    Done = Done
    Interrupt = Interrupt


# What a Decoder's `feed` returns (Pie's name for the union).
AnyEvent = Idle | Delta | Done | Interrupt


class Decoder:
    def __init__(self, model: Model) -> None:
        self._model = model
        self._stop = frozenset(stop_tokens(model))
        self.reset()

    def reset(self) -> None:
        self._stream = TextStream(self._model)
        self._text: list[str] = []
        self._held = ""  # text that came with an Interrupt, still to be reported in a Delta
        self._done = False

    @property
    def text(self) -> str:
        return "".join(self._text)

    def feed(self, tokens: list[int]) -> Idle | Delta | Done | Interrupt:
        """Done (at an end-of-turn token) > Interrupt (another special token) > Delta > Idle.
        Text that arrives with an Interrupt is not lost: it comes with the next Delta or Done."""
        if self._done:
            return Done(self.text)
        interrupt: int | None = None
        for i, t in enumerate(tokens):
            if t in self._stop:
                self._text.append(self._stream.push(list(tokens[:i])) + self._stream.finish())
                self._done = True
                return Done(self.text)
            if interrupt is None and t in self._stream.special:
                interrupt = t
        piece = self._stream.push(list(tokens))
        self._text.append(piece)
        if interrupt is not None:
            self._held += piece
            return Interrupt(interrupt)
        piece, self._held = self._held + piece, ""
        return Delta(piece) if piece else Idle()

    def finish(self) -> str:
        """Text not yet reported at the end of a stream (an incomplete character comes as U+FFFD)."""
        tail = self._stream.finish()
        self._text.append(tail)
        out, self._held = self._held + tail, ""
        return out
