"""`InstanceHost`: the `inferlet._host.Host` of one instance, in the server process.

It owns the instance's context handles and translates each call onto the
model's contexts, snapshots, scheduler and tokenizer. A forward pass
(`PassDict`) is checked here in full (the engine would reject a bad request
for the whole batch), recorded on the context and handed to the scheduler as
a `Job` whose outputs come back one value per slot:

- sampler slot: the engine's value for its index (an int, or a list of ints
  for `draws > 1`); with several indices, the list of all their tokens;
- probe slot: the engine's value (distribution -> (ids, probs), logprob ->
  float, logprobs -> list, entropy -> float, logits/embedding -> bytes).

Snapshot names and messaging topics are scoped by the instance's username.
Every user-caused failure raises `HostError` with the numbers and the fix.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pie
from inferlet._host import HostError, PassDict, SlotDict
from pie.engine.batch import PROBE_KINDS, SAMPLER_KINDS, OutputSpec, Probe, Sampler
from pie.errors import PieError
from pie.runtime.context import Context
from pie.runtime.scheduler import Job

if TYPE_CHECKING:
    from pie.runtime.instance import Instance
    from pie.runtime.messaging import Mailbox
    from pie.runtime.runtime import ModelRuntime

@contextmanager
def user_errors() -> Iterator[None]:
    """Runtime errors a user caused (`PieError`) reach the inferlet as `HostError`."""
    try:
        yield
    except PieError as error:
        raise HostError(str(error)) from None


class InstanceHost:
    def __init__(self, instance: Instance, models: Mapping[str, ModelRuntime], default_model: str,
                 mailbox: Mailbox) -> None:
        self.instance = instance
        self._models = models
        self._default = default_model
        self._mailbox = mailbox
        self._contexts: dict[int, tuple[ModelRuntime, Context]] = {}
        self._handles = itertools.count(1)
        self.tokens_sampled = 0
        self.closed = False
        self._samplers: dict[tuple[Any, ...], Sampler] = {}  # decode loops send the same sampler each step

    def close(self) -> None:
        """Free every context (and so every page) and subscription of the instance."""
        self.closed = True
        for model, ctx in self._contexts.values():
            model.scheduler.withdraw(ctx, None)
            ctx.destroy()
        self._contexts.clear()
        self._mailbox.close()

    # -- runtime --------------------------------------------------------------------------------

    def version(self) -> str:
        return pie.__version__

    def instance_id(self) -> str:
        return self.instance.id

    def username(self) -> str:
        return self.instance.username

    def models(self) -> list[str]:
        return list(self._models)

    # -- model and tokenizer --------------------------------------------------------------------

    def model_info(self, model: str) -> dict[str, Any]:
        with user_errors():
            return self._model(model).describe()

    def tokenize(self, model: str, text: str) -> list[int]:
        with user_errors():
            return self._model(model).tokenizer.encode(text)

    def detokenize(self, model: str, tokens: list[int]) -> str:
        with user_errors():
            return self._model(model).tokenizer.decode(list(tokens))

    def vocabs(self, model: str) -> tuple[list[int], list[bytes]]:
        with user_errors():
            return self._model(model).tokenizer.vocabs()

    def special_tokens(self, model: str) -> tuple[list[int], list[bytes]]:
        with user_errors():
            return self._model(model).tokenizer.special_tokens()

    def chat_tokens(self, model: str, role: str, text: str) -> list[int]:
        with user_errors():
            return self._model(model).tokenizer.chat_tokens(role, text)

    def stop_tokens(self, model: str) -> list[int]:
        with user_errors():
            return list(self._model(model).tokenizer.stop_tokens)

    # -- contexts -------------------------------------------------------------------------------

    def ctx_create(self, model: str) -> int:
        m = self._model(model)
        return self._adopt(m, m.space.create(self.instance.id))

    def ctx_open(self, model: str, name: str) -> int:
        m = self._model(model)
        ctx = m.snapshots.open(self.instance.username, name, self.instance.id)
        return self._adopt(m, ctx, check_pages=True)

    def ctx_take(self, model: str, name: str) -> int:
        m = self._model(model)
        ctx = m.snapshots.take(self.instance.username, name, self.instance.id)
        return self._adopt(m, ctx, check_pages=True)

    def ctx_delete(self, model: str, name: str) -> None:
        self._model(model).snapshots.delete(self.instance.username, name)

    def ctx_fork(self, ctx: int) -> int:
        m, c = self._ctx(ctx)
        return self._adopt(m, c.fork(self.instance.id), check_pages=True)

    def ctx_save(self, ctx: int, name: str) -> None:
        m, c = self._ctx(ctx)
        m.snapshots.save(self.instance.username, name, c)

    def ctx_snapshot(self, ctx: int) -> str:
        m, c = self._ctx(ctx)
        return m.snapshots.save_anonymous(self.instance.username, c)

    def ctx_destroy(self, ctx: int) -> None:
        m, c = self._ctx(ctx)
        del self._contexts[ctx]
        m.scheduler.withdraw(c, HostError("the context was destroyed while this pass was pending"))
        c.destroy()

    def ctx_state(self, ctx: int) -> tuple[int, int, int]:
        return self._ctx(ctx)[1].state()

    def ctx_page_size(self, ctx: int) -> int:
        return self._ctx(ctx)[0].page_size

    def ctx_reserve(self, ctx: int, num_pages: int) -> None:
        _, c = self._ctx(ctx)
        _check_count("num_pages", num_pages)
        self._check_page_limit(num_pages)
        with user_errors():
            c.reserve(num_pages)

    def ctx_release(self, ctx: int, num_pages: int) -> None:
        _check_count("num_pages", num_pages)
        self._ctx(ctx)[1].release(num_pages)

    def ctx_commit(self, ctx: int, num_pages: int) -> None:
        _check_count("num_pages", num_pages)
        self._ctx(ctx)[1].commit(num_pages)

    def ctx_truncate(self, ctx: int, num_tokens: int) -> None:
        _check_count("num_tokens", num_tokens)
        self._ctx(ctx)[1].truncate(num_tokens)

    def ctx_set_priority(self, ctx: int, priority: float) -> None:
        self._ctx(ctx)[1].priority = float(priority)

    async def ctx_forward(self, ctx: int, spec: PassDict) -> list[Any]:
        m, c = self._ctx(ctx)
        if c.pending:
            raise HostError("this context already has a forward pass pending; await it before the next one "
                            "(or fork the context to run passes side by side)")
        job, slot_rows = self._job(m, c, spec)
        m.scheduler.submit(job)
        try:
            values = await job.future
        except asyncio.CancelledError:
            m.scheduler.withdraw(c, None)
            raise
        return [_slot_value(values, first, count) for first, count in slot_rows]

    # -- session --------------------------------------------------------------------------------

    def send(self, message: str) -> None:
        self.instance.emit("message", message)

    def send_file(self, data: bytes) -> None:
        self.instance.emit("file", bytes(data))

    async def receive(self) -> str:
        return await self.instance.messages.get()

    async def receive_file(self) -> bytes:
        return await self.instance.files.get()

    # -- messaging ------------------------------------------------------------------------------

    def push(self, topic: str, message: str) -> None:
        with user_errors():
            self._mailbox.push(topic, message)

    async def pull(self, topic: str) -> str:
        return await self._mailbox.pull(topic)

    def broadcast(self, topic: str, message: str) -> None:
        self._mailbox.broadcast(topic, message)

    def subscribe(self, topic: str) -> int:
        return self._mailbox.subscribe(topic)

    async def sub_next(self, sub: int) -> str | None:
        with user_errors():
            return await self._mailbox.sub_next(sub)

    def unsubscribe(self, sub: int) -> None:
        with user_errors():
            self._mailbox.unsubscribe(sub)

    # -- adapters -------------------------------------------------------------------------------

    def adapter_create(self, model: str, name: str) -> int:
        raise HostError("LoRA adapters are not available in this runtime yet; run without `adapter`")

    def adapter_open(self, model: str, name: str) -> int | None:
        return None

    def adapter_fork(self, adapter: int, new_name: str) -> int:
        raise HostError(f"no adapter {adapter}: LoRA adapters are not available in this runtime yet")

    def adapter_load(self, adapter: int, path: str) -> None:
        raise HostError(f"no adapter {adapter}: LoRA adapters are not available in this runtime yet")

    def adapter_save(self, adapter: int, path: str) -> None:
        raise HostError(f"no adapter {adapter}: LoRA adapters are not available in this runtime yet")

    # -- helpers --------------------------------------------------------------------------------

    def _model(self, name: str) -> ModelRuntime:
        model = self._models.get(name or self._default)
        if model is None:
            raise HostError(f"no model {name!r} on this server; it serves {list(self._models)}")
        return model

    def _ctx(self, handle: int) -> tuple[ModelRuntime, Context]:
        if self.closed:
            raise HostError("the instance has ended; its contexts are gone")
        entry = self._contexts.get(handle)
        if entry is None:
            raise HostError(f"no context {handle} in this instance (destroyed already?)")
        return entry

    def _adopt(self, model: ModelRuntime, ctx: Context, *, check_pages: bool = False) -> int:
        if check_pages:
            try:
                self._check_page_limit(ctx.num_pages)
            except HostError:
                ctx.destroy()
                raise
        handle = next(self._handles)
        self._contexts[handle] = (model, ctx)
        return handle

    def _check_page_limit(self, more: int) -> None:
        limit = self.instance.limits.max_pages
        if not limit or not more:
            return
        held = sum(c.num_pages for _, c in self._contexts.values())
        if held + more > limit:
            raise HostError(f"this instance would hold {held + more} KV pages, over its limit of {limit}; "
                            "release or destroy contexts (or raise [runtime] max_pages_per_instance)")

    def _outputs(self, slots: list[SlotDict], n: int, m: ModelRuntime) -> tuple[list[OutputSpec],
                                                                               list[tuple[int, int]], int]:
        """Slots -> engine outputs, each slot's (first output, count), and the number of sampled tokens."""
        outputs: list[OutputSpec] = []
        slot_rows: list[tuple[int, int]] = []
        sampled = embeds = 0
        for k, slot in enumerate(slots):
            first = len(outputs)
            if "sampler" in slot:
                sampler = self._sampler(k, slot["sampler"])
                indices = slot.get("indices") or []
                if not indices:
                    raise HostError(f"slot {k}: a sampler slot needs at least one row in `indices`")
                outputs += [OutputSpec(_row(k, i, n), sampler=sampler) for i in indices]
                sampled += len(indices) * sampler.draws
            elif "probe" in slot:
                probe = _probe(k, slot["probe"], m)
                embeds += probe.kind == "embedding"
                outputs.append(OutputSpec(_row(k, slot.get("index", 0), n), probe=probe))
            else:
                raise HostError(f"slot {k} has neither `sampler` nor `probe`")
            slot_rows.append((first, len(outputs) - first))
        if embeds > m.max_num_embeds:
            raise HostError(f"the pass asks for {embeds} embeddings, over max_num_embeds = {m.max_num_embeds}")
        return outputs, slot_rows, sampled

    def _sampler(self, k: int, d: Mapping[str, Any]) -> Sampler:
        key = tuple(d.items())
        sampler = self._samplers.get(key)
        if sampler is None:
            if len(self._samplers) >= 64:
                self._samplers.clear()
            sampler = self._samplers[key] = _sampler(k, d)
        return sampler

    def _job(self, m: ModelRuntime, c: Context, spec: PassDict) -> tuple[Job, list[tuple[int, int]]]:
        """Check a pass against the context and the engine limits; record its inputs; build its job."""
        tokens, positions = list(spec.get("tokens") or ()), list(spec.get("positions") or ())
        n = len(tokens)
        if n == 0:
            raise HostError("empty forward pass: give at least one input token")
        if len(positions) != n:
            raise HostError(f"the pass has {n} tokens but {len(positions)} positions; give one position per token")
        vocab = m.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            bad = next(t for t in tokens if not 0 <= t < vocab)
            raise HostError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")
        if min(positions) < 0:
            raise HostError("positions must be >= 0")
        kv_len, capacity = c.kv_len, c.num_pages * m.page_size
        if kv_len + n > capacity:
            raise HostError(f"KV capacity exceeded: kv_len {kv_len} + {n} input tokens > {c.num_pages} pages x "
                            f"page size {m.page_size} = {capacity}; reserve "
                            f"{-(-(kv_len + n - capacity) // m.page_size)} more working pages first")
        mask = spec.get("attention_mask")
        if mask is not None:
            _check_attention_mask(mask, n, kv_len + n, m.max_batch_tokens)
        logit_mask = spec.get("logit_mask") or None
        if logit_mask is not None:
            _check_logit_mask(logit_mask, vocab)
        if spec.get("adapter") is not None:
            raise HostError("LoRA adapters are not available in this runtime yet; run without `adapter`")
        outputs, slot_rows, sampled = self._outputs(spec.get("slots") or [], n, m)
        budget = self.instance.limits.max_tokens
        if budget and self.tokens_sampled + sampled > budget:
            raise HostError(f"token budget used up: this instance sampled {self.tokens_sampled} of its "
                            f"{budget} tokens and this pass asks for {sampled} more")
        self.tokens_sampled += sampled
        seed = spec.get("seed")
        c.append(tokens, positions, custom_kv=mask is not None)
        job = Job(c, kv_len, kv_len + n, outputs, attention_mask=mask, logit_mask=logit_mask,
                  seed=None if seed is None else int(seed))
        return job, slot_rows


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise HostError(f"{name} must be a non-negative integer, got {value!r}")


def _check_attention_mask(mask: list[list[int]], n: int, kv_len: int, max_rows: int) -> None:
    if len(mask) != n:
        raise HostError(f"attention_mask has {len(mask)} rows for {n} input tokens; give one BRLE per token")
    if n > max_rows:
        raise HostError(f"a masked pass of {n} tokens is over max_batch_tokens = {max_rows} (masked passes are "
                        "not split into chunks); send it in smaller passes")
    for i, row in enumerate(mask):
        if any(r < 0 for r in row):
            raise HostError(f"attention_mask row {i} has a negative run length")
        if sum(row) != kv_len:
            raise HostError(f"attention_mask row {i} covers {sum(row)} slots; it must cover the kv length after "
                            f"the pass, {kv_len}")
        if not any(row[1::2]):
            raise HostError(f"attention_mask row {i} attends to nothing; every token must see at least itself")


def _check_logit_mask(mask: list[int], vocab: int) -> None:
    if any(r < 0 for r in mask):
        raise HostError("logit_mask has a negative run length")
    if sum(mask) > vocab:
        raise HostError(f"logit_mask covers {sum(mask)} tokens, more than the vocabulary of {vocab}")
    if not any(mask[1::2]):
        raise HostError("logit_mask allows no token; at least one must be allowed")


def _row(k: int, index: int, n: int) -> int:
    if not isinstance(index, int) or not 0 <= index < n:
        raise HostError(f"slot {k} reads row {index!r}, but the pass has {n} input rows [0, {n})")
    return index


def _sampler(k: int, d: Mapping[str, Any]) -> Sampler:
    kind = d.get("kind", "argmax")
    if kind not in SAMPLER_KINDS:
        raise HostError(f"slot {k}: unknown sampler {kind!r}; use one of {sorted(SAMPLER_KINDS)}")
    try:
        s = Sampler(kind, float(d.get("temperature", 1.0)), int(d.get("top_k", 0)), float(d.get("top_p", 1.0)),
                    float(d.get("min_p", 0.0)), int(d.get("draws", 1)))
    except (TypeError, ValueError) as error:
        raise HostError(f"slot {k}: sampler parameters must be numbers: {error}") from None
    if s.temperature < 0 or s.top_k < 0 or not 0.0 < s.top_p <= 1.0 or not 0.0 <= s.min_p <= 1.0 or s.draws < 1:
        raise HostError(f"slot {k}: sampler parameters out of range (temperature >= 0, top_k >= 0, "
                        f"0 < top_p <= 1, 0 <= min_p <= 1, draws >= 1): {dict(d)}")
    return s


def _probe(k: int, d: Mapping[str, Any], m: ModelRuntime) -> Probe:
    kind = d.get("kind")
    if kind not in PROBE_KINDS:
        raise HostError(f"slot {k}: unknown probe {kind!r}; use one of {sorted(PROBE_KINDS)}")
    tokens = tuple(int(t) for t in d.get("tokens") or ())
    probe = Probe(kind, float(d.get("temperature", 1.0)), int(d.get("k", 0)), tokens)
    if kind == "distribution" and not 0 <= probe.k <= m.max_dist_size:
        raise HostError(f"slot {k}: a distribution of {probe.k} entries is over max_dist_size = "
                        f"{m.max_dist_size}; ask for fewer (k = 0 gives the most allowed)")
    if kind == "distribution" and probe.temperature <= 0:
        raise HostError(f"slot {k}: distribution temperature must be > 0, got {probe.temperature}")
    if kind in ("logprob", "logprobs"):
        if not tokens:
            raise HostError(f"slot {k}: a {kind} probe needs the token ids to score in `tokens`")
        bad = [t for t in tokens if not 0 <= t < m.vocab_size]
        if bad:
            raise HostError(f"slot {k}: token {bad[0]} is outside the vocabulary [0, {m.vocab_size})")
    return probe


def _slot_value(values: list[Any], first: int, count: int) -> Any:
    if count == 1:
        return values[first]
    flat: list[Any] = []
    for v in values[first:first + count]:
        flat += v if isinstance(v, list) else [v]
    return flat

