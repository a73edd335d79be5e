"""One forward pass on a context: inputs, output slots, masks; `execute()` runs it.

    fwd = ctx.forward()
    fwd.input(prompt_tokens)
    h = fwd.sample([len(prompt_tokens) - 1], Sampler.argmax())
    out = await fwd.execute()
    token = out.token(h)

`execute()` follows spec 1.4: reserve the pages the inputs need, run the
pass, then commit every full working page. Unlike Pie's Python SDK it also
reserves for `input_at` tokens (the host writes their KV too, and Python has
no raw page calls to do it by hand), so `input_at` past the end works.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inferlet._host import PassDict, SlotDict
from inferlet.image import row_positions
from inferlet.sample import Sampler, probe_kind

if TYPE_CHECKING:
    from inferlet.adapter import Adapter
    from inferlet.audio import Audio
    from inferlet.context import Context
    from inferlet.image import Media

ZO_SEED_MOD = 1 << 64  # zo seeds are taken mod 2**64 (the engine's generator seed; msgpack carries them)


@dataclass(frozen=True, slots=True)
class SampleHandle:
    """A sampler's output slots: `arity` consecutive slots from `slot`, one per sampled row."""

    slot: int
    arity: int = 1


@dataclass(frozen=True, slots=True)
class ProbeHandle:
    """A probe's output slot; `kind` names the `Output` accessor that reads it."""

    slot: int
    kind: str


class Forward:
    __slots__ = ("_adapter", "_attention", "_auto", "_ctx", "_explicit", "_explicit_images", "_images",
                 "_logit_mask", "_seed", "_slots", "_zo_seed")

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._auto: list[int] = []
        self._explicit: list[tuple[list[int], list[int]]] = []
        self._slots: list[SlotDict] = []
        self._logit_mask: list[int] | None = None
        self._attention: list[list[int]] | None = None
        self._adapter: Adapter | None = None
        self._seed: int | None = None
        self._zo_seed: int | None = None
        self._images: list[tuple[int, Media]] = []  # (row among the `input` tokens, image)
        self._explicit_images: list[tuple[int, Media]] = []  # (index into _explicit, image)

    def start_position(self) -> int:
        """The position of the first `input` token: the context's next position (its seq_len, less what
        M-RoPE images saved)."""
        return self._ctx.next_position

    def page_size(self) -> int:
        return self._ctx.page_size

    # -- inputs (rows are numbered: `input` tokens first, then `input_at` tokens, in call order) --
    def input(self, tokens: list[int]) -> Forward:
        self._auto.extend(int(t) for t in tokens)
        return self

    def input_at(self, tokens: list[int], positions: list[int]) -> Forward:
        if len(tokens) != len(positions):
            raise ValueError(f"input_at got {len(tokens)} tokens but {len(positions)} positions")
        self._explicit.append(([int(t) for t in tokens], [int(p) for p in positions]))
        return self

    def input_image(self, image: Media, anchor: int | None = None) -> Forward:
        """The image's placeholder tokens as inputs, its embeddings in their rows. `anchor`: the position
        of its first token (default: after the `input` tokens so far, like `input`); its tokens sit at
        anchor + `image.position_offsets`."""
        if anchor is None:
            self._images.append((len(self._auto), image))
            self._auto.extend(image.token_ids)
        else:
            self._explicit_images.append((len(self._explicit), image))
            self._explicit.append((list(image.token_ids), [int(anchor) + o for o in image.position_offsets]))
        return self

    def input_audio(self, audio: Audio, anchor: int | None = None) -> Forward:
        """The clip's placeholder tokens as inputs, the audio tower's embeddings in their rows (as
        `input_image`)."""
        return self.input_image(audio, anchor)

    @property
    def num_inputs(self) -> int:
        return len(self._auto) + sum(len(t) for t, _ in self._explicit)

    # -- outputs --
    def sample(self, indices: list[int], sampler: Sampler) -> SampleHandle:
        """Sample one token at each row in `indices` (draws > 1 gives that many per row)."""
        handle = SampleHandle(len(self._slots), len(indices))
        self._slots += [{"indices": [int(i)], "sampler": sampler.to_dict()} for i in indices]  # type: ignore[typeddict-item]
        return handle

    def probe(self, index: int, probe: Any) -> ProbeHandle:
        handle = ProbeHandle(len(self._slots), probe_kind(probe))
        self._slots.append({"index": int(index), "probe": probe.to_dict()})
        return handle

    # -- decoration --
    def mask(self, brle: list[int]) -> Forward:
        """A logit mask (BRLE over the vocabulary, true = allowed) for every sampler of this pass."""
        self._logit_mask = list(brle)
        return self

    def attention_mask(self, masks: list[list[int]]) -> Forward:
        """One BRLE per input row over the kv length after the pass (true = attend); default causal."""
        self._attention = [list(m) for m in masks]
        return self

    def adapter(self, adapter: Adapter) -> Forward:
        self._adapter = adapter
        return self

    def zo_seed(self, seed: int) -> Forward:
        """Run this pass's adapter perturbed by `seed`: theta + sigma * eps(seed), for zeroth-order training
        (`inferlet.zo`). The adapter must be zo-initialised; any integer, taken mod 2**64."""
        self._zo_seed = int(seed) % ZO_SEED_MOD
        return self

    def seed(self, seed: int) -> Forward:
        """Make this pass's random draws reproducible."""
        self._seed = int(seed)
        return self

    async def execute(self) -> Output:
        out = await self._run()
        self._ctx._commit_full_pages()
        return out

    async def _run(self) -> Output:
        """Reserve and run; the caller commits (a Generator first rolls back rejected drafts)."""
        ctx = self._ctx
        n = self.num_inputs
        if n == 0:
            raise ValueError("Forward.execute() with no inputs: add tokens with input(...) or input_at(...)")
        self._check_rows(n)
        ctx._reserve_for(n)
        positions = row_positions(ctx.next_position, len(self._auto),
                                  ((row, image.position_offsets, image.position_span) for row, image in self._images))
        tokens = list(self._auto)
        images = [[image.key, row] for row, image in self._images]
        first_rows = []
        for t, p in self._explicit:
            first_rows.append(len(tokens))
            tokens += t
            positions += p
        images += [[image.key, first_rows[i]] for i, image in self._explicit_images]
        spec: PassDict = {"tokens": tokens, "positions": positions, "slots": self._slots,
                          "attention_mask": self._attention, "logit_mask": self._logit_mask,
                          "adapter": self._adapter._handle if self._adapter is not None else None,
                          "seed": self._seed, "zo_seed": self._zo_seed}
        if images:
            spec["images"] = sorted(images, key=lambda kr: kr[1])
        return Output(await ctx._host.ctx_forward(ctx._handle, spec))

    def _check_rows(self, n: int) -> None:
        for slot in self._slots:
            rows = slot.get("indices") or [slot.get("index", 0)]
            bad = [r for r in rows if not 0 <= r < n]
            if bad:
                raise ValueError(f"output row {bad[0]} is outside this pass's {n} input rows [0, {n})")
        if self._attention is not None and len(self._attention) != n:
            raise ValueError(f"attention_mask has {len(self._attention)} rows for {n} input tokens; "
                             "give one BRLE per input token")


@dataclass(frozen=True, slots=True)
class RawOutput:
    """A pass's raw result, as Pie's `Output.raw`: one value per slot, plus the drafts the runtime's own
    drafter proposes for the next pass (`spec_tokens` at `spec_positions`; pie's runtime has no drafter,
    so they are empty). Also indexes and iterates like the list of slot values (a superset)."""

    slots: list[Any]
    spec_tokens: list[int] = field(default_factory=list)
    spec_positions: list[int] = field(default_factory=list)

    def __getitem__(self, index: int) -> Any:
        return self.slots[index]

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.slots)


class Output:
    """What a pass produced, read through the handles `sample`/`probe` returned.

    `tokens` holds the tokens a Generator step kept (after stop / max_tokens
    truncation); it is empty for a raw `Forward`. A handle of the wrong kind
    reads as None.
    """

    __slots__ = ("_values", "auto_sampler", "tokens")

    def __init__(self, values: list[Any], tokens: list[int] | None = None,
                 auto_sampler: SampleHandle | None = None) -> None:
        self._values = values
        self.tokens: list[int] = tokens if tokens is not None else []
        self.auto_sampler = auto_sampler

    @property
    def raw(self) -> RawOutput:
        """The host's values, one per slot (`.slots`), and the runtime drafter's proposals (none here)."""
        return RawOutput(self._values)

    def token(self, h: SampleHandle) -> int | None:
        tokens = self.tokens_at(h) if isinstance(h, SampleHandle) else []
        return tokens[0] if tokens else None

    def tokens_at(self, h: SampleHandle) -> list[int]:
        if not isinstance(h, SampleHandle):
            return []
        out: list[int] = []
        for value in self._values[h.slot:h.slot + h.arity]:
            if isinstance(value, int):
                out.append(value)
            elif isinstance(value, list) and all(isinstance(v, int) for v in value):
                out += value
        return out

    def distribution(self, h: ProbeHandle) -> tuple[list[int], list[float]] | None:
        value = self._probe(h, "distribution")
        return (list(value[0]), list(value[1])) if value is not None else None

    def logits(self, h: ProbeHandle) -> bytes | None:
        value = self._probe(h, "logits")
        return bytes(value) if value is not None else None

    def embedding(self, h: ProbeHandle) -> bytes | None:
        value = self._probe(h, "embedding")
        return bytes(value) if value is not None else None

    def logprobs(self, h: ProbeHandle) -> list[float] | None:
        value = self._probe(h, "logprobs")
        if value is None:
            return None
        return [float(value)] if isinstance(value, float | int) else [float(v) for v in value]

    def entropy(self, h: ProbeHandle) -> float | None:
        value = self._probe(h, "entropy")
        return float(value) if value is not None else None

    def _probe(self, h: ProbeHandle, kind: str) -> Any:
        if not isinstance(h, ProbeHandle) or h.kind != kind or not 0 <= h.slot < len(self._values):
            return None
        return self._values[h.slot]
