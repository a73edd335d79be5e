"""Context: a KV sequence held by the runtime, plus the SDK's buffer of tokens not yet in it.

    ctx = Context(model)
    ctx.system("You are helpful.").user("Tell me a joke.")
    text = await ctx.generate(Sampler.top_p(0.6, 0.95), max_tokens=256).collect_text()

Chat fillers (`system`, `user`, `assistant`, `cue`, `seal`, `append`) only
add tokens to the buffer; a pass (`flush`, `forward`, `generate`) moves them
into the KV cache. `seq_len` counts the tokens in the KV cache (committed
pages plus working tokens), never the buffer. After a generation the last
sampled token stays in the buffer (spec 6.7).

`open` / `take` raise `HostError` when the snapshot does not exist, as Pie's
SDK does in practice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from inferlet import chat
from inferlet._host import Host, HostError, get_host
from inferlet.forward import Forward
from inferlet.model import Model

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from inferlet.adapter import Adapter
    from inferlet.audio import Audio
    from inferlet.generation import Generator
    from inferlet.grammar import Constraint, Schema
    from inferlet.image import Image, Media
    from inferlet.sample import Sampler
    from inferlet.spec import Speculator


class Context:
    __slots__ = ("__weakref__", "_bid", "_fresh", "_handle", "_host", "_images", "_model", "_page_size",
                 "_pending", "_released", "_stream")

    def __init__(self, model: Model) -> None:
        host = get_host()
        self._setup(host, model, host.ctx_create(model.name), [], fresh=True)

    def _setup(self, host: Host, model: Model, handle: int, pending: list[int], *, fresh: bool) -> None:
        self._host = host
        self._model = model
        self._handle = handle
        self._pending = pending
        self._page_size = host.ctx_page_size(handle)
        self._fresh = fresh  # nothing filled yet: a first user turn gets the template's preamble
        self._released = False
        self._bid = 0.0
        self._stream: Generator | None = None  # a generator whose runtime stream owns this context
        self._images: list[tuple[int, Media]] = []  # images in the buffer: (index of the first token, image)

    def _settle(self) -> None:
        """Stop a run-ahead stream on this context before anything reads or changes it: the context is
        then exactly what the step-by-step generation loop leaves."""
        if self._stream is not None:
            self._stream.end_stream()

    @classmethod
    def _wrap(cls, model: Model, handle: int, pending: list[int] | None = None,
              images: list[tuple[int, Media]] | None = None) -> Context:
        obj = cls.__new__(cls)
        obj._setup(get_host(), model, handle, list(pending or []), fresh=False)
        obj._images = list(images or [])
        return obj

    # -- snapshots --
    @classmethod
    def open(cls, model: Model, name: str) -> Context:
        """A new context forked from snapshot `name` (the snapshot stays). Raises if it does not exist."""
        return cls._wrap(model, get_host().ctx_open(model.name, name))

    @classmethod
    def take(cls, model: Model, name: str) -> Context:
        """The snapshot's pages as a new context; the snapshot is deleted. Raises if it does not exist."""
        return cls._wrap(model, get_host().ctx_take(model.name, name))

    @staticmethod
    def delete(model: Model, name: str) -> None:
        get_host().ctx_delete(model.name, name)

    def save(self, name: str) -> None:
        """Save the KV sequence under `name` (fails if the name exists). The buffer is not saved."""
        self._settle()
        self._host.ctx_save(self._handle, name)

    def snapshot(self) -> str:
        """Save under a runtime-chosen name and return it."""
        self._settle()
        return self._host.ctx_snapshot(self._handle)

    def fork(self) -> Context:
        """A copy sharing every committed page (O(1)); the buffer is copied too."""
        self._settle()
        return Context._wrap(self._model, self._host.ctx_fork(self._handle), self._pending, self._images)

    # -- lifecycle --
    def release(self) -> None:
        """Free this context's pages now (idempotent). The instance's end frees the rest."""
        if not self._released:
            self._released = True
            self._stream = None  # destroying the context ends its stream
            self._host.ctx_destroy(self._handle)

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # Dropped without release(): free the pages soon, outside the garbage collector.
        if getattr(self, "_released", True):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the instance is over and the runtime freed everything
        loop.call_soon(_destroy_quietly, self._host, self._handle)

    def __repr__(self) -> str:
        return f"Context({self._handle}, seq_len={self.seq_len}, buffered={len(self._pending)})"

    # -- inspection --
    @property
    def model(self) -> Model:
        return self._model

    @property
    def handle(self) -> int:
        return self._handle

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def seq_len(self) -> int:
        self._settle()
        committed, _, working_tokens = self._host.ctx_state(self._handle)
        return committed * self._page_size + working_tokens

    @property
    def next_position(self) -> int:
        """The position of the next token placed in the KV cache: `seq_len`, less the positions images
        with M-RoPE took fewer than their tokens (Qwen3-VL, Qwen 3.5; `Image.position_span`)."""
        self._settle()
        return self._host.ctx_next_position(self._handle)

    def buffer(self) -> list[int]:
        return list(self._pending)

    def page_counts(self) -> tuple[int, int, int]:
        """(committed pages, working pages, tokens in working pages)."""
        self._settle()
        committed, working, tokens = self._host.ctx_state(self._handle)
        return int(committed), int(working), int(tokens)

    # -- fillers --
    # Special-token text in `message` is encoded as text (a user cannot forge turns) unless parse_special.
    def system(self, message: str, *, parse_special: bool = False) -> Context:
        self._fresh = False
        return self._extend(chat.system(self._model, message, parse_special=parse_special))

    def user(self, message: str | list[str | Media], *, parse_special: bool = False) -> Context:
        """A user turn; a list of text parts, `Image`s and `Audio` clips places them in the turn."""
        return self._turn(chat.user(self._model, message, parse_special=parse_special))

    def assistant(self, message: str, *, parse_special: bool = False) -> Context:
        return self._turn(chat.assistant(self._model, message, parse_special=parse_special))

    def cue(self) -> Context:
        return self._turn(chat.cue(self._model))

    def seal(self) -> Context:
        return self._extend(chat.seal(self._model))

    def append(self, tokens: Iterable[int]) -> Context:
        self._fresh = False
        return self._extend([int(t) for t in tokens])

    async def append_image(self, image: Image) -> None:
        """The image into the KV cache (Pie's `append_image`): the buffer and the image's tokens (its
        delimiters included) run in one pass, the image's embeddings in their rows."""
        await self.append_images([image])

    async def append_audio(self, audio: Audio) -> None:
        """The clip into the KV cache, as `append_image` puts an image: the buffer and the clip's tokens
        (`<boa>`, its audio tokens, `<eoa>`) in one pass, the audio tower's embeddings in their rows."""
        await self.append_images([audio])

    async def append_images(self, images: Iterable[Media]) -> None:
        self.buffer_images(images)
        await self.flush()

    def buffer_images(self, images: Iterable[Media]) -> Context:
        """The images' (or audio clips') tokens into the buffer only, like `append` (they run with the next
        pass)."""
        self._fresh = False
        for image in images:
            self._images.append((len(self._pending), image))
            self._pending.extend(image.token_ids)
        return self

    def _turn(self, tokens: list[int]) -> Context:
        if self._fresh:
            self._fresh = False
            self._extend(chat.begin(self._model))
        return self._extend(tokens)

    def _extend(self, tokens: list[int]) -> Context:
        for row, image in getattr(tokens, "images", ()):  # chat.Tokens: a turn with images
            self._images.append((len(self._pending) + row, image))
        self._pending.extend(tokens)
        return self

    # -- execution --
    async def flush(self) -> None:
        """Run the buffered tokens through a pass (no outputs) so they are in the KV cache."""
        self._settle()
        if not self._pending:
            return
        tokens, self._pending = self._pending, []
        images, self._images = self._images, []
        fwd = self.forward().input(tokens)
        fwd._images = [(row, image) for row, image in images]
        try:
            await fwd.execute()
        except BaseException:
            self._pending = tokens + self._pending
            self._images = images + self._images
            raise

    async def _flush_images(self) -> None:
        """Run the buffer up to its last image through a pass, leaving the rest (at least the last token)
        buffered: a generation then starts from plain tokens (its steps and streams carry no images)."""
        if not self._images:
            return
        end = max(row + image.token_count for row, image in self._images)
        if end >= len(self._pending):
            raise ValueError("an image is the last thing in the buffer; append text after it (the chat "
                             "template's cue: generate() with auto_flush) before generating")
        tokens, rest = self._pending[:end], self._pending[end:]
        images, self._images = self._images, []
        self._pending = rest
        fwd = self.forward().input(tokens)
        fwd._images = images
        try:
            await fwd.execute()
        except BaseException:
            self._pending = tokens + self._pending
            self._images = images
            raise

    def truncate(self, n: int) -> None:
        """Drop the last `n` tokens of the working pages (committed pages cannot be truncated)."""
        if n > 0:
            self._settle()
            self._host.ctx_truncate(self._handle, int(n))

    def forward(self) -> Forward:
        self._settle()
        return Forward(self)

    def generate(self, sampler: Sampler, *, max_tokens: int | None = None, stop: Iterable[int] | None = None,
                 constrain: Schema | Constraint | list[Any] | None = None, logit_mask: list[int] | None = None,
                 speculator: Speculator | None = None, system_speculation: bool | None = None,
                 adapter: Adapter | None = None, seed: int | None = None, horizon: int | None = None,
                 zo_seed: int | None = None, auto_flush: bool = True) -> Generator:
        """A token generator. With `auto_flush` (the default) the generation cue is appended first and
        `stop` defaults to the model's end-of-turn tokens. `zo_seed` runs `adapter` perturbed by that seed
        (`inferlet.zo`). Pie's `rebid_each_step` is not taken: pie has no bid market (docs/inferlets.md)."""
        from inferlet.generation import Generator

        self._settle()
        if auto_flush:
            self.cue()
            if stop is None:
                stop = chat.stop_tokens(self._model)
        return Generator(self, sampler, max_tokens=max_tokens, stop=stop, constrain=constrain,
                         logit_mask=logit_mask, speculator=speculator, system_speculation=system_speculation,
                         adapter=adapter, seed=seed, horizon=horizon, zo_seed=zo_seed)

    # -- scheduling --
    def set_bid(self, value: float) -> None:
        """Scheduling priority (Pie's bid): higher runs first and is suspended last."""
        self._bid = float(value)
        self._host.ctx_set_priority(self._handle, self._bid)

    @contextmanager
    def idle(self) -> Iterator[None]:
        """Bid 0 while waiting on I/O, so busy contexts go first; the bid is restored on exit."""
        saved = self._bid
        self.set_bid(0.0)
        try:
            yield
        finally:
            self.set_bid(saved)

    # -- page bookkeeping (spec 1.4 steps 1 and 5) --
    def _reserve_for(self, num_tokens: int) -> None:
        self._settle()
        _, working_pages, working_tokens = self._host.ctx_state(self._handle)
        needed = -(-(working_tokens + num_tokens) // self._page_size) - working_pages
        if needed > 0:
            self._host.ctx_reserve(self._handle, needed)

    def _commit_full_pages(self) -> None:
        _, _, working_tokens = self._host.ctx_state(self._handle)
        full = working_tokens // self._page_size
        if full > 0:
            self._host.ctx_commit(self._handle, full)


def _destroy_quietly(host: Host, handle: int) -> None:
    try:
        host.ctx_destroy(handle)
    except HostError as e:  # already gone with its instance: nothing left to free
        log.debug("dropped context %d was already released: %s", handle, e)
