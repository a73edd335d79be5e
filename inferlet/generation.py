"""Generator: the multi-step decoding loop over a context (spec 1.7).

    g = ctx.generate(Sampler.top_p(0.6, 0.95), max_tokens=256, constrain=JsonSchema(schema))
    async for step in g:
        out = await step.execute()      # out.tokens: what this step kept

or one of the collectors: `collect_text()`, `collect_tokens()`, `collect_json()`.

Each step runs the context's buffer (the prompt on the first step, then the
last sampled token) plus any drafts through one pass, samples at the last
buffered row and at every draft row, keeps the drafts the model agrees with
plus one more token, and rolls the rest of the KV back. Stop tokens are
excluded from the output and end generation; `max_tokens` caps it. The last
kept token stays in the context's buffer: it enters the KV cache on the next
pass (so `seal()` or a new turn appends after it).

Manual sampling: `step.clear_sampler()`, read a probe from the output, then
`g.accept([token])`.

Run-ahead: a step that needs no Python between steps (a sampler with one
draw, stop tokens and `max_tokens`, at most a fixed logit mask, seed and
adapter; no constraint that changes per step, no speculator or system
speculation, no `probe_each_step`, no `zo_seed`, and the step left as `__anext__` made it:
no `probe`, no `clear_sampler`, no new `mask`, the buffer holding only the
last kept token) is served from a runtime stream (`Host.ctx_generate_start`):
the runtime samples and feeds the next pass by itself, at most `RUNAHEAD_DEPTH`
steps ahead, and this loop reads the tokens in order. Anything else, and any
call on the context between steps (`seq_len`, `fork`, `forward`, ...), first
stops the stream (`Host.stream_stop`), which leaves the context exactly as
this step-by-step loop would have; the next plain step starts a new stream.
Observable results are the same either way; only the number of host calls
and where the loop waits differ.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from inferlet import brle, chat
from inferlet.forward import ZO_SEED_MOD, Output, ProbeHandle, SampleHandle
from inferlet.grammar import AnyJson, Constraint, JsonSchema, Schema, StaticMask
from inferlet.sample import probe_kind
from inferlet.spec import NgramSpeculator, Speculator

if TYPE_CHECKING:
    from inferlet.adapter import Adapter
    from inferlet.context import Context
    from inferlet.sample import Sampler

RUNAHEAD = True  # serve eligible steps from a runtime stream (benchmarks switch it off to compare)
RUNAHEAD_DEPTH = 8  # steps the runtime may run ahead of what this loop has read
COLLECT_BATCH = 8  # the collectors take a stream's tokens this many at a time (fewer wake-ups)
# A collector's stream runs further ahead: twice its batch, so the next batch is computed while it reads
# one. It wastes nothing at a stop token or the limit (the runtime stops there by itself); only a
# collector that ends early (`collect_text` at the end of a chat turn) drops up to this many steps.
COLLECT_DEPTH = 2 * COLLECT_BATCH
# `collect_tokens` reads nothing until the end and never ends early (the runtime applies stop tokens and
# the limit itself), so its stream may run this far ahead and deliver this many at once: nothing is
# wasted, and the inferlet wakes once per this many tokens instead of once per COLLECT_BATCH.
COLLECT_ALL_DEPTH = 256
UNLIMITED = 1 << 30  # max_tokens of a stream without a limit (the depth bounds the waste)
AUTO_SAMPLER = SampleHandle(0, 1)


class _Stream:
    """The SDK's side of a runtime stream: tokens received, and how many steps were consumed."""

    __slots__ = ("consumed", "fed", "handle", "next", "tokens")

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.tokens: list[int] = []  # the last batch received; tokens[next:] are not consumed yet
        self.next = 0
        self.consumed = 0
        self.fed: int | None = None  # the last consumed token, which the runtime ran as the next input


class Generator:
    def __init__(self, ctx: Context, sampler: Sampler, *, max_tokens: int | None = None,
                 stop: Iterable[int] | None = None, constrain: Any = None, logit_mask: list[int] | None = None,
                 speculator: Speculator | None = None, system_speculation: bool | None = None,
                 adapter: Adapter | None = None, seed: int | None = None, horizon: int | None = None,
                 zo_seed: int | None = None) -> None:
        if speculator is not None and system_speculation:
            raise ValueError("speculator and system_speculation=True are mutually exclusive; pick one")
        self._ctx = ctx
        self._sampler = sampler
        self._stream: _Stream | None = None  # the runtime stream serving the steps, if any
        # A collector drives the loop: no one reads the steps as they come ("tokens": `collect_tokens`,
        # which never ends before the stream does; "text": the others).
        self._collecting: str | None = None
        self._stop = set(stop or ())
        self._max_tokens = max_tokens
        self._constraints: list[Constraint] = []
        self._constraint_pending: list[int] = []  # accepted since the constraints last stepped
        for c in constrain if isinstance(constrain, list) else [constrain] if constrain is not None else []:
            self.constrain(c)
        if logit_mask is not None:
            self._constraints.append(StaticMask(logit_mask))
        self._speculator = speculator
        if system_speculation is None:
            system_speculation = speculator is None and sampler.is_argmax and ctx.model.default_system_speculation()
        self._system_drafter = NgramSpeculator() if system_speculation else None
        self._last_buffered = False  # the buffer starts with the token the last step kept
        self._adapter = adapter
        self._seed = seed
        self._zo_seed: int | None = None
        if zo_seed is not None:
            self.zo_seed(zo_seed)
        self._horizon = horizon
        self._step_probes: list[tuple[int, Any]] = []
        self._tokens_generated = 0
        # The tokens this generator kept, for penalties (presence/frequency/repetition count them).
        self._history: list[int] | None = [] if getattr(sampler, "penalizes", False) else None
        self._done = False
        self._open_step: GenStep | None = None  # handed out by __anext__, not executed yet

    # -- chain configuration (each ends a running stream: its rules change) --
    def max_tokens(self, n: int) -> Generator:
        self.end_stream()
        self._max_tokens = n
        return self

    def stop(self, tokens: Iterable[int]) -> Generator:
        self.end_stream()
        self._stop = set(tokens)
        return self

    def add_stop(self, tokens: Iterable[int]) -> Generator:
        self.end_stream()
        self._stop |= set(tokens)
        return self

    def constrain(self, c: Schema | Constraint) -> Generator:
        """Add a constraint (or a schema that builds one); several are AND-ed."""
        self.end_stream()
        if isinstance(c, Schema):
            self._constraints.append(c.build_constraint(self._ctx.model))
        elif isinstance(c, Constraint):
            self._constraints.append(c)
        else:
            raise TypeError(f"constrain takes a Schema (build_constraint) or a Constraint (step), "
                            f"got {type(c).__name__}")
        return self

    def disable_system_speculation(self) -> Generator:
        self._system_drafter = None
        return self

    def adapter(self, a: Adapter) -> Generator:
        self.end_stream()
        self._adapter = a
        return self

    def zo_seed(self, seed: int) -> Generator:
        """Run every step with the adapter perturbed by `seed` (`Forward.zo_seed`): one ES rollout."""
        self.end_stream()
        self._zo_seed = int(seed) % ZO_SEED_MOD
        return self

    def horizon(self, n: int) -> Generator:
        self._horizon = n
        return self

    def probe_each_step(self, index: int, probe: Any) -> ProbeHandle:
        """A probe on every step at row `index` of the step's inputs (-1: the row the sampler reads).
        Per-generator probes take the first output slots, so the handle is valid on every step."""
        self.end_stream()
        self._step_probes.append((index, probe))
        return ProbeHandle(len(self._step_probes) - 1, probe_kind(probe))

    @property
    def tokens_generated(self) -> int:
        """Tokens kept so far (read-only, as in Pie)."""
        return self._tokens_generated

    def _count(self, kept: list[int]) -> None:
        self._tokens_generated += len(kept)
        if self._history is not None:
            self._history.extend(kept)

    def _step_sampler(self) -> Sampler:
        """The sampler of the next step: a penalizing one counts what was generated so far."""
        if self._history is None:
            return self._sampler
        return self._sampler.with_history(self._history)

    @property
    def is_done(self) -> bool:
        return self._done or (self._max_tokens is not None and self.tokens_generated >= self._max_tokens)

    # -- iteration --
    def __aiter__(self) -> AsyncIterator[GenStep]:
        return self

    async def __anext__(self) -> GenStep:
        if self._open_step is not None:
            # The step took the buffered tokens with it: a new one would generate from nothing and never
            # finish (an `async for` that forgets `execute()` would loop until memory runs out).
            raise RuntimeError("call `await step.execute()` on each step before asking for the next one")
        if self.is_done:
            self.end_stream()
            raise StopAsyncIteration
        if self._ctx._images:  # buffered images run in a pass of their own first
            await self._ctx._flush_images()
        pending, self._ctx._pending = self._ctx._pending, []
        drafts, positions = self._drafts(pending)
        mask: list[int] | None = None
        if self._constraints:
            advance, self._constraint_pending = self._constraint_pending, []
            mask = brle.and_(*(c.step(advance) for c in self._constraints)) or None
            drafts, positions = [], []  # a mask only holds for the first sampled row
        self._open_step = GenStep(self, pending, drafts, positions, mask)
        return self._open_step

    def _drafts(self, pending: list[int]) -> tuple[list[int], list[int]]:
        seen, self._last_buffered = self._last_buffered, False
        if self._system_drafter is not None:
            self._system_drafter.observe(pending[1:] if seen else pending)
            drafts, positions = self._system_drafter.draft()
        elif self._speculator is not None:
            drafts, positions = self._speculator.draft()
        else:
            return [], []
        remaining = None if self._max_tokens is None else self._max_tokens - self.tokens_generated - 1
        if remaining is not None:
            drafts = drafts[:max(remaining, 0)]
        return list(drafts), list(positions)[:len(drafts)]

    # -- run-ahead streams --
    def _can_stream(self) -> bool:
        """No per-step Python hook: the runtime can run the loop (see the module docstring)."""
        return (RUNAHEAD and self._speculator is None and self._system_drafter is None and not self._step_probes
                and self._zo_seed is None  # streams run the adapter unperturbed: zo steps go pass by pass
                and self._sampler.draws == 1 and all(isinstance(c, StaticMask) for c in self._constraints)
                and self._history is None  # penalties count each step's history: the SDK sends it
                and hasattr(self._ctx._host, "ctx_generate_start")
                and self._ctx.model.run_ahead())  # off for hybrid (recurrent-state) models

    def _start_stream(self, pending: list[int], mask: list[int] | None) -> _Stream:
        ctx = self._ctx
        remaining = UNLIMITED if self._max_tokens is None else self._max_tokens - self.tokens_generated
        if self._collecting == "tokens":
            depth = batch = min(max(remaining, 1), COLLECT_ALL_DEPTH)
        else:
            depth, batch = (COLLECT_DEPTH, COLLECT_BATCH) if self._collecting else (RUNAHEAD_DEPTH, 1)
        spec = {"tokens": pending, "sampler": self._sampler.to_dict(), "stop": sorted(self._stop),
                "max_tokens": max(remaining, 1), "logit_mask": mask,
                "adapter": self._adapter._handle if self._adapter is not None else None,
                "seed": self._seed, "depth": depth, "batch": batch}
        stream = self._stream = _Stream(ctx._host.ctx_generate_start(ctx._handle, spec))  # type: ignore[arg-type]
        ctx._stream = self
        return stream

    def end_stream(self) -> None:
        """Stop the runtime stream, if one runs: the context becomes exactly what the step-by-step loop
        leaves after the steps consumed so far (full pages committed). Idempotent."""
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        ctx = self._ctx
        if ctx._stream is self:
            ctx._stream = None
        if ctx._released:
            return
        ctx._host.stream_stop(stream.handle, stream.consumed)
        ctx._commit_full_pages()

    # -- manual sampling --
    def accept(self, tokens: list[int]) -> list[int]:
        """Register tokens sampled by hand (after `clear_sampler`): stop/max rules apply, the kept tokens
        go to the buffer for the next step and to the constraints."""
        kept = self._truncate(list(tokens))
        self._ctx._pending.extend(kept)
        self._constraint_pending.extend(kept)
        self._count(kept)
        if self._speculator is not None:
            self._speculator.accept(kept)
        return kept

    def _truncate(self, tokens: list[int]) -> list[int]:
        """Cut at the first stop token (excluded) and at max_tokens; either ends generation."""
        for i, t in enumerate(tokens):
            if t in self._stop:
                tokens = tokens[:i]
                self._done = True
                break
        if self._max_tokens is not None:
            room = self._max_tokens - self.tokens_generated
            if len(tokens) >= room:
                tokens = tokens[:max(room, 0)]
                self._done = True
        return tokens

    def _take_streamed(self) -> list[int] | None:
        """Consume the next token the stream already delivered, exactly as a plain step would (buffer,
        stop/max, counters), without the step objects; its kept tokens, or None if there is none at hand."""
        stream, ctx = self._stream, self._ctx
        if (stream is None or stream.next == len(stream.tokens) or self._open_step is not None or self.is_done
                or ctx._pending != [stream.fed]):
            return None
        token = stream.tokens[stream.next]
        stream.next += 1
        stream.consumed += 1
        ctx._pending = []
        self._last_buffered = False
        self._constraint_pending.append(token)
        kept = self._truncate([token])
        self._count(kept)
        if kept:
            ctx._pending.append(token)
            self._last_buffered = True
        stream.fed = kept[-1] if kept else None
        if self.is_done:
            self.end_stream()
        return kept

    def _take_all_streamed(self) -> list[int]:
        """`_take_streamed` for every delivered token at once (up to a stop token or the limit): the kept
        tokens, in order. The same steps and the same state, with list operations instead of a loop."""
        stream, ctx = self._stream, self._ctx
        if (stream is None or stream.next == len(stream.tokens) or self._open_step is not None or self.is_done
                or ctx._pending != [stream.fed]):
            return []
        tokens = stream.tokens[stream.next:]
        n = len(tokens)
        if self._stop and not self._stop.isdisjoint(tokens):
            n = next(i for i, t in enumerate(tokens) if t in self._stop) + 1  # the stop token's step
        if self._max_tokens is not None:
            n = min(n, self._max_tokens - self.tokens_generated)
        steps = tokens[:n]
        stream.next += n
        stream.consumed += n
        self._constraint_pending.extend(steps)
        kept = steps[:-1] if steps[-1] in self._stop else steps
        if len(kept) < len(steps) or (self._max_tokens is not None
                                      and self.tokens_generated + len(kept) >= self._max_tokens):
            self._done = True
        self._count(kept)
        last_kept = len(kept) == n  # a stop token's step keeps nothing: the buffer ends empty
        ctx._pending = kept[-1:] if last_kept else []
        self._last_buffered = last_kept
        stream.fed = kept[-1] if last_kept else None
        if self.is_done:
            self.end_stream()
        return kept

    async def _receive_streamed(self) -> bool:
        """Wait for the stream's next delivery when every token it delivered was consumed and the loop
        stands where a plain step would start from it (what `GenStep._from_stream` waits for, without
        the step objects); False, at once, when it does not (the caller takes a step)."""
        stream, ctx = self._stream, self._ctx
        if (stream is None or stream.next != len(stream.tokens) or self._open_step is not None or self.is_done
                or ctx._pending != [stream.fed]):
            return False
        try:
            tokens = await ctx._host.stream_next(stream.handle)
            if not tokens:
                raise RuntimeError("the runtime stream ended before the generator did")  # a runtime bug
        except BaseException:
            self.end_stream()  # the context as after the steps consumed; the buffer still holds `fed`
            raise
        stream.tokens, stream.next = tokens, 0
        return True

    # -- collectors (they read a stream's delivered tokens in bulk: the same steps, fewer objects) --
    async def collect_tokens(self) -> list[int]:
        out: list[int] = []
        self._collecting = "tokens"
        async for step in self:
            out += (await step.execute()).tokens
            out += self._take_all_streamed()
            while await self._receive_streamed():
                out += self._take_all_streamed()
        return out

    async def collect_text(self) -> str:
        decoder = chat.Decoder(self._ctx.model)
        parts: list[str] = []
        self._collecting = "text"
        async for step in self:
            tokens: list[int] | None = (await step.execute()).tokens
            while tokens is not None:
                event = decoder.feed(tokens)
                if isinstance(event, chat.Done):
                    return event.text
                if isinstance(event, chat.Delta):
                    parts.append(event.text)
                tokens = self._take_streamed()
                if tokens is None and await self._receive_streamed():
                    tokens = self._take_streamed()
        parts.append(decoder.finish())
        return "".join(parts)

    async def collect_json(self, *, schema: str | dict[str, Any] | None = None,
                           parse: Callable[[str], Any] | None = None) -> Any:
        """Generate under `JsonSchema(schema)` (or any JSON), then `json.loads` (or `parse`) the text."""
        self.constrain(JsonSchema(schema) if schema is not None else AnyJson())
        text = await self.collect_text()
        return parse(text) if parse is not None else json.loads(text)


class GenStep:
    """The next pass of a Generator, adjustable before `execute()`."""

    def __init__(self, gen: Generator, pending: list[int], drafts: list[int], draft_positions: list[int],
                 mask: list[int] | None) -> None:
        self._gen = gen
        self.pending = pending
        self.drafts = drafts
        self._draft_positions = draft_positions
        self.mask = mask
        self._probes: list[tuple[int, Any]] = []
        self._sampler_cleared = False
        self._made_mask = mask  # what __anext__ computed (a caller may replace `mask`)

    def clear_sampler(self) -> GenStep:
        """Sample by hand: no token is drawn this step; read a probe and call `Generator.accept`."""
        self._sampler_cleared = True
        return self

    def _plain(self) -> bool:
        """Left as __anext__ made it, with no drafts: a step a runtime stream can serve."""
        return (not self._sampler_cleared and not self._probes and not self.drafts and self.mask is self._made_mask
                and bool(self.pending))

    async def _from_stream(self) -> Output:
        """The next step of the generator's stream (started here if none runs)."""
        gen = self._gen
        stream = gen._stream
        if stream is None:
            stream = gen._start_stream(self.pending, self.mask)
        if stream.next == len(stream.tokens):
            try:
                stream.tokens = await gen._ctx._host.stream_next(stream.handle)
                stream.next = 0
                if not stream.tokens:
                    raise RuntimeError("the runtime stream ended before the generator did")  # a runtime bug
            except BaseException:
                gen.end_stream()  # the context as after the steps consumed; this step's tokens go back
                gen._ctx._pending = self.pending + gen._ctx._pending
                raise
        token = stream.tokens[stream.next]
        stream.next += 1
        stream.consumed += 1
        kept = self._settle([token], [])
        stream.fed = kept[-1] if kept else None
        if gen.is_done:
            gen.end_stream()
        return Output([token], tokens=kept, auto_sampler=AUTO_SAMPLER)

    def probe(self, index: int, probe: Any) -> ProbeHandle:
        """A probe at row `index` of this step's inputs (-1: the row the sampler reads)."""
        self._probes.append((index, probe))
        return ProbeHandle(len(self._gen._step_probes) + len(self._probes) - 1, probe_kind(probe))

    async def execute(self) -> Output:
        gen, ctx = self._gen, self._gen._ctx
        if gen._open_step is self:
            gen._open_step = None  # settled: on failure its tokens go back to the buffer below
        if not self.pending:
            raise ValueError("nothing to generate from: the context's buffer is empty. Fill it (user(), "
                             "append()) or keep the last token buffered instead of calling flush()")
        stream = gen._stream
        if stream is not None:
            # The stream fed back the last token it produced: the step must start from exactly that.
            if self._plain() and self.pending == [stream.fed]:
                return await self._from_stream()
            gen.end_stream()
        elif self._plain() and gen._can_stream():
            return await self._from_stream()
        drafts = [] if self._sampler_cleared else self.drafts
        if self._sampler_cleared and self.drafts and gen._speculator is not None:
            gen._speculator.rollback(len(self.drafts))
        fwd = ctx.forward().input(self.pending)
        if drafts:
            start = ctx.next_position + len(self.pending)
            positions = self._draft_positions or list(range(start, start + len(drafts)))
            fwd.input_at(drafts, positions)
        last = len(self.pending) - 1
        for index, probe in [*gen._step_probes, *self._probes]:
            fwd.probe(last if index < 0 else index, probe)
        handle = None
        if not self._sampler_cleared:
            handle = fwd.sample(list(range(last, last + len(drafts) + 1)), gen._step_sampler())
        if self.mask is not None:
            fwd.mask(self.mask)
        if gen._adapter is not None:
            fwd.adapter(gen._adapter)
        if gen._seed is not None:
            fwd.seed(gen._seed)  # draws hash (seed, position): each step still differs
        if gen._zo_seed is not None:
            fwd.zo_seed(gen._zo_seed)
        try:
            out = await fwd._run()
        except BaseException:
            ctx._pending = self.pending + ctx._pending  # a failed step loses no buffered tokens
            raise
        kept = self._settle(out.tokens_at(handle) if handle is not None else [], drafts)
        ctx._commit_full_pages()
        return Output(out.raw.slots, tokens=kept, auto_sampler=handle)

    def _settle(self, sampled: list[int], drafts: list[int]) -> list[int]:
        """Verify drafts, apply stop/max, roll back KV the context must not keep, buffer the last token."""
        gen, ctx = self._gen, self._gen._ctx
        if not sampled:
            return []
        accepted = [sampled[0]]
        for i, d in enumerate(drafts):
            if d != sampled[i]:
                break
            accepted.append(sampled[i + 1])
        if gen._speculator is not None:
            gen._speculator.accept(accepted)
            if len(drafts) > len(accepted) - 1:
                gen._speculator.rollback(len(drafts) - (len(accepted) - 1))
        gen._constraint_pending.extend(accepted)
        kept = gen._truncate(accepted)
        gen._count(kept)
        if gen._system_drafter is not None:
            gen._system_drafter.observe(kept)
        # The KV holds pending + all drafts; keep pending + kept[:-1] (kept[-1] goes to the buffer).
        ctx.truncate(len(drafts) - max(len(kept) - 1, 0))
        if kept:
            ctx._pending.append(kept[-1])
            gen._last_buffered = True
        return kept
