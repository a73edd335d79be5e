"""`InstanceHost`: the `inferlet._host.Host` of one instance, in the server process.

It owns the instance's context handles and translates each call onto the
model's contexts, snapshots, scheduler and tokenizer. A handle remembers the
data-parallel group holding its context's pages: a new context is placed by
the model (`ModelRuntime.place`); forks and contexts opened from snapshots are
on their source's group, and every pass on a context goes to that group's
scheduler. A forward pass is
checked and turned into a scheduler job by `pie.runtime.forward_pass` (which
also defines the value returned per output slot), with the instance's token
budget applied here.

A run-ahead stream (`ctx_generate_start`, `pie.runtime.runahead`) owns its
context until `stream_stop`: every other call on that context but
`ctx_destroy`, `ctx_page_size` and `ctx_set_priority` is refused meanwhile
(the SDK stops the stream before touching its context).

Before any work a pass is checked against the model's context length
(`max_position_embeddings` of the checkpoint's config.json).

Snapshot names and messaging topics are scoped by the instance's username.
Every user-caused failure raises `HostError` with the numbers and the fix.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pie
from inferlet._host import HostError, PassDict, StreamDict
from pie.engine.vision.info import MediaKind
from pie.errors import PieError
from pie.mcp_link import INTERNAL_ERROR, McpCallError
from pie.runtime.context import Context
from pie.runtime.forward_pass import PassReader, slot_values
from pie.runtime.images import InstanceImages, pass_images
from pie.runtime.jobs import Job
from pie.runtime.quotas import TokenBucket, page_share
from pie.runtime.runahead import DEFAULT_DEPTH, TokenStream

MAX_STREAM_DEPTH = 1024

if TYPE_CHECKING:
    from pie.runtime.adapters import NamedAdapter
    from pie.runtime.instance import Instance
    from pie.runtime.mcp import McpRouter
    from pie.runtime.messaging import Mailbox
    from pie.runtime.model_runtime import EngineGroup, ModelRuntime


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
        self._contexts: dict[int, tuple[ModelRuntime, Context, EngineGroup]] = {}
        self._adapters: dict[int, tuple[ModelRuntime, NamedAdapter]] = {}  # handles share the context counter
        self._handles = itertools.count(1)
        self.tokens_sampled = 0
        self.closed = False
        self._passes = PassReader()
        self.mcp: McpRouter | None = None  # the MCP servers this instance may use (set at launch)
        limits = instance.limits
        self._forks = TokenBucket(limits.forks_per_s, limits.fork_burst)
        self._streams: dict[int, tuple[int, TokenStream]] = {}  # stream handle -> (context handle, stream)
        self._streaming: dict[int, int] = {}  # context handle -> its stream's handle
        self._images = InstanceImages(limits.max_images, limits.max_image_pixels, limits.max_audio_seconds)

    def close(self) -> None:
        """Free every context (and so every page) and subscription of the instance."""
        self.closed = True
        for _, stream in self._streams.values():
            stream.close()
        self._streams.clear()
        self._streaming.clear()
        for _, ctx, group in self._contexts.values():
            group.scheduler.withdraw(ctx, None)
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

    def chat_tokens(self, model: str, role: str, text: str, parse_special: bool = False) -> list[int]:
        with user_errors():
            return self._model(model).tokenizer.chat_tokens(role, text, bool(parse_special))

    def stop_tokens(self, model: str) -> list[int]:
        with user_errors():
            return list(self._model(model).tokenizer.stop_tokens)

    # -- images (pie.runtime.images) --------------------------------------------------------------

    def chat_parts(self, model: str, role: str, parts: list[Any], parse_special: bool = False) -> dict[str, Any]:
        m = self._model(model)
        if not isinstance(parts, list):
            raise HostError("chat_parts takes a list of parts: strings, {'image': key} and {'audio': key}")
        keys: list[str] = []
        plain: list[str | list[int]] = []
        for part in parts:
            if isinstance(part, str):
                plain.append(part)
            elif isinstance(part, dict) and ("image" in part or "audio" in part):
                info = self._images.get(part.get("image", part.get("audio")))
                keys.append(info.key)
                before, after = info.text_around  # joins the text beside it, as the family's processor writes
                if before:
                    plain.append(before)
                plain.append(list(info.tokens))
                if after:
                    plain.append(after)
            else:
                raise HostError(f"a chat part is a string, {{'image': key}} or {{'audio': key}}, got {part!r}")
        with user_errors():
            tokens, starts = m.tokenizer.chat_parts(role, plain, bool(parse_special))
        return {"tokens": tokens, "images": [[k, row] for k, row in zip(keys, starts, strict=True)]}

    def image_prepare(self, model: str, data: bytes) -> dict[str, Any]:
        m = self._model(model)
        info = self._images.add(m, data)
        return {"key": info.key, "tokens": list(info.tokens), "embed_rows": list(info.embed_rows),
                "grid": list(info.grid), "positions": info.positions, "position_span": info.position_span,
                "position_offsets": info.position_offsets,
                "width": info.width, "height": info.height}

    def audio_prepare(self, model: str, data: bytes) -> dict[str, Any]:
        info = self._images.add(self._model(model), data, MediaKind.AUDIO)
        return {"key": info.key, "tokens": list(info.tokens), "embed_rows": list(info.embed_rows),
                "position_span": info.position_span, "position_offsets": info.position_offsets,
                "seconds": info.seconds}

    # -- contexts -------------------------------------------------------------------------------

    def ctx_create(self, model: str) -> int:
        m = self._model(model)
        self._check_context_limit()
        group = m.place()
        return self._adopt(m, group, group.space.create(self.instance.id))

    def ctx_open(self, model: str, name: str) -> int:
        m = self._model(model)
        self._check_context_limit()
        ctx = m.snapshots.open(self.instance.username, name, self.instance.id)
        return self._adopt(m, m.group_of(ctx), ctx, new_pages=ctx.num_pages)

    def ctx_take(self, model: str, name: str) -> int:
        m = self._model(model)
        self._check_context_limit()
        ctx = m.snapshots.take(self.instance.username, name, self.instance.id)
        return self._adopt(m, m.group_of(ctx), ctx, new_pages=ctx.num_pages)

    def ctx_delete(self, model: str, name: str) -> None:
        self._model(model).snapshots.delete(self.instance.username, name)

    def ctx_fork(self, ctx: int) -> int:
        m, c, g = self._idle(ctx)
        self._check_context_limit()
        if not self._forks.try_take():
            limits = self.instance.limits
            raise HostError(f"this instance forks faster than its limit of {limits.forks_per_s:g} forks per "
                            f"second (bursts of {limits.fork_burst}); slow down, or raise [runtime] "
                            "max_forks_per_s / max_fork_burst")
        child = c.fork(self.instance.id)
        # Its committed pages are its parent's (held already); its working pages are its own.
        return self._adopt(m, g, child, new_pages=child.num_pages - len(child.pages[:child.num_committed]))

    def ctx_save(self, ctx: int, name: str) -> None:
        m, c, _ = self._idle(ctx)
        m.snapshots.save(self.instance.username, name, c)

    def ctx_snapshot(self, ctx: int) -> str:
        m, c, _ = self._idle(ctx)
        return m.snapshots.save_anonymous(self.instance.username, c)

    def ctx_destroy(self, ctx: int) -> None:
        _, c, g = self._ctx(ctx)
        stream = self._streaming.pop(ctx, None)
        if stream is not None:
            self._streams.pop(stream)[1].close()
        del self._contexts[ctx]
        g.scheduler.withdraw(c, HostError("the context was destroyed while this pass was pending"))
        c.destroy()

    def ctx_state(self, ctx: int) -> tuple[int, int, int]:
        return self._idle(ctx)[1].state()

    def ctx_next_position(self, ctx: int) -> int:
        return self._idle(ctx)[1].next_position

    def ctx_page_size(self, ctx: int) -> int:
        return self._ctx(ctx)[0].page_size

    def ctx_reserve(self, ctx: int, num_pages: int) -> None:
        _, c, g = self._idle(ctx)
        _check_count("num_pages", num_pages)
        self._check_page_limit(num_pages, g)
        with user_errors():
            c.reserve(num_pages)

    def ctx_release(self, ctx: int, num_pages: int) -> None:
        _check_count("num_pages", num_pages)
        self._idle(ctx)[1].release(num_pages)

    def ctx_commit(self, ctx: int, num_pages: int) -> None:
        _check_count("num_pages", num_pages)
        self._idle(ctx)[1].commit(num_pages)

    def ctx_truncate(self, ctx: int, num_tokens: int) -> None:
        _check_count("num_tokens", num_tokens)
        self._idle(ctx)[1].truncate(num_tokens)

    def ctx_set_priority(self, ctx: int, priority: float) -> None:
        if type(priority) not in (int, float) or not math.isfinite(priority):
            # NaN compares false with everything: the priority queues and victim order would be undefined
            raise HostError(f"a priority (bid) must be a finite number, got {priority!r}")
        self._ctx(ctx)[1].priority = float(priority)

    async def ctx_forward(self, ctx: int, spec: PassDict) -> list[Any]:
        m, c, g = self._idle(ctx)
        if c.pending:
            raise HostError("this context already has a forward pass pending; await it before the next one "
                            "(or fork the context to run passes side by side)")
        job, slot_rows = self._job(m, c, spec)
        g.scheduler.submit(job)
        assert job.future is not None, "a pass without an owner has a future"
        try:
            values = await job.future
        except asyncio.CancelledError:
            g.scheduler.withdraw(c, None)
            raise
        return slot_values(values, slot_rows)

    # -- run-ahead token streams (pie.runtime.runahead) -----------------------------------------

    def ctx_generate_start(self, ctx: int, spec: StreamDict) -> int:
        m, c, g = self._idle(ctx)
        if c.pending:
            raise HostError("this context already has a forward pass pending; await it before generating")
        if c.state_slot is not None:
            raise HostError("run-ahead streams are off for hybrid models (model_info run_ahead = False): stopping "
                            "one cuts the context back, which its recurrent state cannot undo; generate step by "
                            "step (ctx_forward)")
        tokens = spec.get("tokens") or []
        if not isinstance(tokens, list) or not tokens:
            raise HostError("ctx_generate_start needs the buffered tokens to start from (at least one)")
        max_tokens, depth, batch = spec.get("max_tokens"), spec.get("depth") or DEFAULT_DEPTH, spec.get("batch") or 1
        if type(max_tokens) is not int or max_tokens < 1:
            raise HostError(f"ctx_generate_start: max_tokens must be an integer >= 1, got {max_tokens!r}")
        if type(depth) is not int or not 1 <= depth <= MAX_STREAM_DEPTH:
            raise HostError(f"ctx_generate_start: depth must be an integer in [1, {MAX_STREAM_DEPTH}], got {depth!r}")
        if type(batch) is not int or not 1 <= batch <= depth:
            raise HostError(f"ctx_generate_start: batch must be an integer in [1, depth = {depth}], got {batch!r}")
        if spec.get("zo_seed") is not None:
            raise HostError("ctx_generate_start: a run-ahead stream does not perturb adapters; run zo passes "
                            "with ctx_forward")
        stop = spec.get("stop") or []
        if not isinstance(stop, list) or not all(type(t) is int for t in stop):
            raise HostError("ctx_generate_start: stop must be a list of token ids")
        base_len, base_pages = c.kv_len, c.num_pages
        self._grow(c, len(tokens), g)
        start, first = c.kv_len, c.next_position
        pass_spec: PassDict = {"tokens": tokens, "positions": list(range(first, first + len(tokens))),
                               "slots": [{"indices": [len(tokens) - 1], "sampler": spec.get("sampler") or {}}],
                               "logit_mask": spec.get("logit_mask"), "adapter": spec.get("adapter"),
                               "seed": spec.get("seed")}
        job, _ = self._job(m, c, pass_spec)
        sampler = job.outputs[0].sampler
        assert sampler is not None
        if sampler.draws != 1:
            c.rollback(start)
            self.tokens_sampled -= sampler.draws
            raise HostError("a run-ahead stream samples one token per step; use draws = 1 (or ctx_forward)")
        job.future = None  # the stream owns it
        handle = next(self._handles)
        stream = TokenStream(c, g.scheduler, job, sampler, stop=frozenset(stop), max_tokens=max_tokens,
                             depth=depth, base_len=base_len, base_pages=base_pages, batch=batch,
                             grow=functools.partial(self._grow, group=g),  # the group: no walk per page
                             charge=self._charge if self.instance.limits.max_tokens else None)
        self._streams[handle] = (ctx, stream)
        self._streaming[ctx] = handle
        return handle

    async def stream_next(self, stream: int) -> list[int]:
        try:  # `user_errors()` without a context manager per delivery
            return await self._stream(stream).next()
        except PieError as error:
            raise HostError(str(error)) from None

    def stream_stop(self, stream: int, consumed: int) -> None:
        _check_count("consumed", consumed)
        s = self._stream(stream)
        s.stop(consumed)
        ctx, _ = self._streams.pop(stream)
        del self._streaming[ctx]

    # -- session --------------------------------------------------------------------------------

    def send(self, message: str) -> None:
        self.instance.emit("message", message)

    def send_file(self, data: bytes) -> None:
        self.instance.emit("file", bytes(data))

    async def receive(self) -> str:
        return await self.instance.receive_message()

    async def receive_file(self) -> bytes:
        return await self.instance.receive_file()

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
        m = self._model(model)
        with user_errors():
            return self._adopt_adapter(m, m.adapters.create(self.instance.username, name))

    def adapter_open(self, model: str, name: str) -> int | None:
        m = self._model(model)
        adapter = m.adapters.open(self.instance.username, name)
        return None if adapter is None else self._adopt_adapter(m, adapter)

    def adapter_fork(self, adapter: int, new_name: str) -> int:
        m, a = self._adapter(adapter)
        with user_errors():
            return self._adopt_adapter(m, m.adapters.fork(a, new_name))

    def adapter_load(self, adapter: int, path: str) -> None:
        m, a = self._adapter(adapter)
        with user_errors():
            m.adapters.load(a, path)

    def adapter_save(self, adapter: int, path: str) -> None:
        m, a = self._adapter(adapter)
        with user_errors():
            m.adapters.save(a, path)

    def adapter_zo_initialize(self, adapter: int, rank: int, alpha: float, population_size: int,
                              mu_fraction: float, initial_sigma: float) -> None:
        m, a = self._adapter(adapter)
        if type(rank) is not int or type(population_size) is not int:
            raise HostError(f"zo.initialize: rank and population_size must be integers, got {rank!r} and "
                            f"{population_size!r}")
        _check_numbers("zo.initialize", [alpha, mu_fraction, initial_sigma])
        with user_errors():
            m.adapters.zo_initialize(a, rank, float(alpha), population_size, float(mu_fraction),
                                     float(initial_sigma))

    def adapter_zo_update(self, adapter: int, scores: list[float], seeds: list[int], max_sigma: float) -> None:
        m, a = self._adapter(adapter)
        if not isinstance(scores, list) or not isinstance(seeds, list) or not all(type(s) is int for s in seeds):
            raise HostError("zo.update: scores must be a list of numbers and seeds a list of integers")
        _check_numbers("zo.update", [*scores, max_sigma])
        with user_errors():
            m.adapters.zo_update(a, [float(s) for s in scores], seeds, float(max_sigma))

    # -- scheduling -----------------------------------------------------------------------------

    def scheduling(self, model: str, ctx: int) -> dict[str, float]:
        """Plain numbers for `inferlet.scheduling`: this instance's pages on the model against its limit,
        the context's pages and the latency of the last batch on its scheduler."""
        if ctx:
            m, c, group = self._ctx(ctx)
            groups, ctx_pages = [group], c.num_pages
        else:
            m, ctx_pages = self._model(model), 0
            groups = list(m.groups)
        held = sum(c.num_pages for cm, c, _ in self._contexts.values() if cm is m)
        pool = sum(g.pool.num_pages for g in groups)
        return {"pages_held": float(held), "page_limit": float(self.instance.limits.max_pages or pool),
                "ctx_pages": float(ctx_pages), "pool_pages": float(pool),
                "latency_s": max(g.scheduler.stats.last_batch_ms for g in groups) / 1e3}

    # -- MCP ------------------------------------------------------------------------------------

    def mcp_servers(self) -> list[str]:
        return self.mcp.servers() if self.mcp is not None else []

    async def mcp_call(self, server: str, method: str, params: str) -> list[Any]:
        if self.mcp is None:
            return [False, McpCallError(INTERNAL_ERROR, "no MCP servers are available to this inferlet").to_json()]
        if not isinstance(server, str) or not isinstance(method, str) or not isinstance(params, str):
            raise HostError("mcp_call takes (server: str, method: str, params: JSON text)")
        try:
            return [True, await self.mcp.call(server, method, params)]
        except McpCallError as error:
            return [False, error.to_json()]

    # -- helpers --------------------------------------------------------------------------------

    def _model(self, name: str) -> ModelRuntime:
        model = self._models.get(name or self._default)
        if model is None:
            raise HostError(f"no model {name!r} on this server; it serves {list(self._models)}")
        return model

    def _ctx(self, handle: int) -> tuple[ModelRuntime, Context, EngineGroup]:
        if self.closed:
            raise HostError("the instance has ended; its contexts are gone")
        entry = self._contexts.get(handle)
        if entry is None:
            raise HostError(f"no context {handle} in this instance (destroyed already?)")
        return entry

    def _idle(self, handle: int) -> tuple[ModelRuntime, Context, EngineGroup]:
        """`_ctx`, for calls that read or change the context: refused while a stream runs on it."""
        entry = self._ctx(handle)
        if handle in self._streaming:
            raise HostError(f"context {handle} is generating in a run-ahead stream; call stream_stop first")
        return entry

    def _stream(self, handle: int) -> TokenStream:
        entry = self._streams.get(handle)
        if entry is None or self.closed:
            raise HostError(f"no stream {handle} in this instance (stopped already?)")
        return entry[1]

    def _grow(self, c: Context, n: int, group: EngineGroup | None = None) -> None:
        """Reserve the pages `n` more slots need, as the SDK's `_reserve_for` does (for streams)."""
        need = -(-(c.kv_len + n) // c.space.page_size) - c.num_pages
        if need > 0:
            if group is None:
                group = next(g for _, held, g in self._contexts.values() if held is c)
            self._check_page_limit(need, group)
            try:  # `user_errors()`, without a context manager per page of every stream
                c.reserve(need, for_stream=True)  # a chained step grows it while the step before is in flight
            except PieError as error:
                raise HostError(str(error)) from None

    def _charge(self, n: int) -> None:
        """Count `n` sampled tokens against the token budget (negative: refund discarded steps)."""
        budget = self.instance.limits.max_tokens
        if n > 0 and budget and self.tokens_sampled + n > budget:
            raise HostError(f"token budget used up: this instance sampled {self.tokens_sampled} of its "
                            f"{budget} tokens and this pass asks for {n} more")
        self.tokens_sampled += n

    def _adopt_adapter(self, model: ModelRuntime, adapter: NamedAdapter) -> int:
        handle = next(self._handles)
        self._adapters[handle] = (model, adapter)
        return handle

    def _adapter(self, handle: int) -> tuple[ModelRuntime, NamedAdapter]:
        entry = self._adapters.get(handle)
        if entry is None:
            raise HostError(f"no adapter {handle} in this instance; make one with Adapter.create or Adapter.open")
        return entry

    def _adapter_slot(self, m: ModelRuntime, handle: int | None, zo: bool = False) -> int | None:
        """The engine slot of a pass's adapter handle (None: the base model); `zo`: the pass perturbs it."""
        if handle is None:
            return None
        model, adapter = self._adapter(handle)
        if model is not m:
            raise HostError(f"adapter {adapter.name!r} belongs to model {model.name!r}; this context runs "
                            f"{m.name!r}")
        with user_errors():
            return m.adapters.zo_slot_of(adapter) if zo else m.adapters.slot_of(adapter)

    def _adopt(self, model: ModelRuntime, group: EngineGroup, ctx: Context, *, new_pages: int | None = None) -> int:
        """A handle for `ctx`; with `new_pages`, first check the page limits for that many more pages."""
        if new_pages is not None:
            try:
                self._check_page_limit(new_pages, group)
            except HostError:
                ctx.destroy()
                raise
        handle = next(self._handles)
        self._contexts[handle] = (model, ctx, group)
        return handle

    def _check_context_limit(self) -> None:
        limit = self.instance.limits.max_contexts
        if limit and len(self._contexts) >= limit:
            raise HostError(f"this instance holds {len(self._contexts)} contexts, its limit "
                            "([runtime] max_contexts_per_instance); destroy contexts it no longer needs, or "
                            "raise the limit")

    def _check_page_limit(self, more: int, group: EngineGroup) -> None:
        """`more` pages on top of what the instance holds: within max_pages_per_instance (over all its
        contexts) and max_page_share_per_instance (of `group`'s pool)? Committed pages the instance's
        contexts share (forks) count once."""
        limits = self.instance.limits
        if more <= 0 or not (limits.max_pages or limits.max_page_share):
            return
        share = page_share(group.space.pool.num_pages, limits.max_page_share) if limits.max_page_share else 0
        # Within both limits even with shared pages counted once per context (the common case: one walk).
        upper = sum(c.num_pages for _, c, _ in self._contexts.values()) + more
        if (not limits.max_pages or upper <= limits.max_pages) and (not share or upper <= share):
            return
        if limits.max_pages:
            held = _pages_held((c for _, c, _ in self._contexts.values()), limits.max_pages - more)
            if held + more > limits.max_pages:
                raise HostError(f"this instance would hold {held + more} KV pages, over its limit of "
                                f"{limits.max_pages}; release or destroy contexts (or raise [runtime] "
                                "max_pages_per_instance)")
        if limits.max_page_share:
            total = group.space.pool.num_pages
            held = _pages_held((c for _, c, g in self._contexts.values() if g is group), share - more)
            if held + more > share:
                raise HostError(f"this instance would hold {held + more} of the KV pool's {total} pages, over "
                                f"its share of {limits.max_page_share:g} ({share} pages); release or destroy "
                                "contexts (or raise [runtime] max_page_share_per_instance)")

    def _job(self, m: ModelRuntime, c: Context, spec: PassDict) -> tuple[Job, list[tuple[int, int]]]:
        outputs = self._passes.outputs(spec, m)
        limit = _context_length(str(getattr(m.info, "model_dir", "") or ""))
        end = c.kv_len + len(spec["tokens"])
        if limit and end > limit:
            raise HostError(f"the context would hold {end} tokens (kv_len {c.kv_len} + {len(spec['tokens'])} "
                            f"input tokens), over the model's context length of {limit} "
                            "(max_position_embeddings); shorten the prompt or start a new context")
        budget = self.instance.limits.max_tokens
        if budget and self.tokens_sampled + outputs.sampled > budget:
            raise HostError(f"token budget used up: this instance sampled {self.tokens_sampled} of its "
                            f"{budget} tokens and this pass asks for {outputs.sampled} more")
        images = pass_images(spec.get("images"), spec["tokens"], c.kv_len, self._images, m.max_num_embeds)
        job = self._passes.job(m, c, spec, outputs,
                               self._adapter_slot(m, spec.get("adapter"), spec.get("zo_seed") is not None), images)
        self.tokens_sampled += outputs.sampled
        return job, outputs.slot_rows

def _pages_held(contexts: Iterable[Context], within: int) -> int:
    """The pages `contexts` hold together: reserved capacity, with committed pages shared between them
    (forks of one another) counted once. When their plain sum is at most `within`, that sum (the
    common case; it saves the walk over every page)."""
    contexts = list(contexts)
    upper = sum(ctx.num_pages for ctx in contexts)
    if upper <= within:
        return upper
    committed: set[int] = set()
    held = 0
    for ctx in contexts:
        resident = ctx.pages[:ctx.num_committed]
        committed.update(resident)
        held += ctx.num_pages - len(resident)
    return held + len(committed)


@functools.lru_cache(maxsize=64)
def _context_length(model_dir: str) -> int:
    """The checkpoint's `max_position_embeddings` (0: unknown, no limit but the pool's)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text()) if model_dir else {}
    except (OSError, ValueError):
        return 0
    if not isinstance(config, dict):
        return 0
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings", 0)
    return value if type(value) is int and value > 0 else 0


def _check_numbers(call: str, values: list[Any]) -> None:
    bad = next((v for v in values if type(v) not in (int, float)), None)
    if bad is not None:
        raise HostError(f"{call}: expected numbers, got {bad!r}")


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise HostError(f"{name} must be a non-negative integer, got {value!r}")
