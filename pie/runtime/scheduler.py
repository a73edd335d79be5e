"""One model's batcher: the pending passes of every instance -> one engine batch per step.

Each step takes the pending passes by priority, then queue order (one FIFO
queue per priority, so no sort per step; most of the time there is one), and
admits each one's next chunk of rows within `max_batch_tokens` /
`max_batch_size`:

- rows a context must (re)compute come first: after a suspension, the slots
  before the pass are re-prefilled from the context's record;
- leading full pages whose content is already in the prefix trie are attached
  instead of computed (`Context.attach_cached`), unless an output reads them;
- long prefills are chunked, leaving at least one token of budget for every
  pass behind them so decodes are never starved by a prefill; a served pass
  goes to the back of the queue (round robin); while other passes wait, the
  rows of multi-row chunks (prefills) in one batch are capped at
  `max_prefill_tokens` (default: half of `max_batch_tokens`), so a huge prompt
  holds decode rows back by at most that much compute per step;
- a pass resolves when its last chunk is back; outputs ride with the chunk
  that holds their rows.

Pages: a chunk's pages are allocated when it is admitted. When the pool is
short, victims are suspended until the chunk fits (`pie.runtime.suspension`:
which contexts, and swap to host vs drop and recompute); otherwise the pass
waits. A pass that waits while nothing at all can run for
`page_wait_timeout_s` fails with an error saying why.

Between batches the scheduler waits only for the instances whose passes just
resolved to submit their next ones (`_gather`): until as many passes as it
woke are back, or a round of the event loop brings none. Run-ahead streams
step in the lane (`pie.runtime.lane`): each build first takes one row per
ready stream as arrays (`ForwardBatch.steps`), so a batch of streams alone
waits for nothing. A batch the runtime built from checked
passes says so (`ForwardBatch.validated`). When the engine raises anything for
a batch, its requests are retried one by one, so only the culprit fails.

Pipelining: with an engine client that chains batches (`chains_tokens`),
while batch N is in flight the scheduler already builds and submits N+1
when N holds lane rows: each such stream's next step is a row whose input
token is "row j of the previous batch's steps" (`StepRows.token_from`,
resolved by the engine client right before N+1 runs), at the slot after its
row in N, with its page in place. When N lands the stream learns its token;
if it stopped there, the chained row is wasted and its slot given back.
Passes of other contexts join N+1 too (a context in flight is never
admitted twice). Without lane rows in flight nothing is built early, so
step-by-step inferlets batch as before.

At most two batches are in flight; the engine runs them in order, so nothing
changes page contents between
batches, so freeing, copying-on-write and suspending at build time is safe.
Within a batch the engine runs swap-outs, then swap-ins, then page copies,
then the forward; so a page freed by a swap-out may be reused at once, while
host slots read by a swap-in (`HostSlotPool` draining) and the sources of
page copies (pinned until the batch lands) are not reused in the same batch.
Each engine call is a telemetry span `engine.batch` (sizes and swaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from inferlet._host import HostError
from pie import telemetry
from pie.engine.batch import BatchResult, ForwardBatch, OutputSpec, OutputValue, Request, expanded, fold_steps
from pie.errors import BatchError, OutOfPagesError
from pie.runtime.api import EngineClient
from pie.runtime.context import Context
from pie.runtime.context_space import ContextSpace
from pie.runtime.jobs import Chunk, Job, PageOps, SchedulerStats
from pie.runtime.lane import StreamLane
from pie.runtime.pages import HostSlotPool
from pie.runtime.prefix_trie import PageKey
from pie.runtime.suspension import Suspender

log = logging.getLogger(__name__)


class Flight(NamedTuple):
    """A batch handed to the engine and not yet landed."""

    task: asyncio.Task[BatchResult]
    batch: ForwardBatch
    chunks: list[Chunk]
    id: int  # the `Context.in_batch` value of its contexts
    num_tokens: int  # `batch.num_tokens`, counted once
    lane: tuple[np.ndarray, np.ndarray] | None  # (members, gens) of `batch.steps` (pie.runtime.lane)

Built = tuple[ForwardBatch, list[Chunk], "tuple[np.ndarray, np.ndarray] | None"]  # `_build`: batch, chunks, lane rows

GATHER_DEADLINE_S = 0.002  # longest wait for woken instances to submit their next passes
MAX_STEPS_WITHOUT_TURN = 8  # batches in a row an engine that never yields (a fake) may run before a yield


class Scheduler:
    def __init__(self, engine: EngineClient, space: ContextSpace, *, max_batch_tokens: int, max_batch_size: int,
                 page_wait_timeout_s: float = 30.0, max_prefill_tokens: int = 0) -> None:
        self.engine = engine
        self.space = space
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        # 0: half the batch, so decode rows keep the other half whatever prompts are queued.
        self.max_prefill_tokens = max_prefill_tokens or max(1, max_batch_tokens // 2)
        self.page_wait_timeout_s = page_wait_timeout_s
        self.stats = SchedulerStats()
        self._suspender = Suspender(space, self.stats)
        self.lane = StreamLane(space, self.stats)  # every run-ahead stream's decode steps
        info = engine.info
        self._model_name = str(getattr(info, "model_name", ""))  # for telemetry
        num_slots = int(getattr(info, "num_swap_slots", 0))
        if num_slots > 0 and space.host is None:
            space.host = HostSlotPool(num_slots)
        self.on_batch: Callable[[ForwardBatch, BatchResult, float], None] | None = None  # benchmarks
        self._jobs: dict[int, Job] = {}  # context id -> its pending pass (waiting, or with a chunk in flight)
        self._queues: dict[float, dict[int, Job]] = {}  # priority -> the passes waiting for a batch, in order
        self._woken = 0  # instances whose passes the last batch resolved (they may submit again)
        self._turns = 0  # event-loop turns seen by `_tick` (did the engine call yield?)
        self._idle_steps = 0
        self.pipeline = bool(getattr(engine, "chains_tokens", False))  # build N+1 while N is in flight
        self._batch_ids = 0
        self._building = 0  # id of the batch being built
        self._flights: list[Flight] = []  # in flight, oldest first (at most two)
        self._computing: dict[PageKey, Job] = {}  # uncached page key -> the pass computing it
        self._submissions = 0
        self._wake = asyncio.Event()
        self._stalled_since: float | None = None
        self._previous_build = self._this_build = 0  # context-clock ticks at the start of the last two builds
        self._lead_job: Job | None = None  # see _lead(); looked up at most once per build
        self._lead_known = False
        space.pool.set_hooks(on_free=self._wake.set)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pie-scheduler")

    # -- the instances' side --------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        ctx = job.ctx
        assert ctx.id not in self._jobs, "one pending pass per context"
        ctx.pending = True
        ctx.last_used = self.space.tick()
        self._jobs[ctx.id] = job
        self._enqueue(job)
        self._submissions += 1
        self._wake.set()

    def notify(self) -> None:
        """Something to run arrived outside the queues (a stream entered the lane): wake the loop."""
        self._wake.set()

    def resubmit(self, job: Job) -> None:
        """`submit` for an owner's job it just got back (`JobOwner.completed`): the context was touched."""
        ctx = job.ctx
        ctx.pending = True
        self._jobs[ctx.id] = job
        priority = ctx.priority
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = {}
        queue[ctx.id] = job
        job.queued_at = priority
        self._wake.set()

    def adopt(self, job: Job) -> None:
        """Register an owner's job that is in flight already (a chained step): pending, not waiting."""
        job.ctx.pending = True
        self._jobs[job.ctx.id] = job

    def withdraw(self, ctx: Context, error: BaseException | None) -> None:
        """Give up `ctx`'s pending pass: its future is cancelled (error None) or fails with `error`; an
        owner's job is cancelled (the owner asked, or is told through `failed`).

        Queued, the pass is dropped (and its rows rolled back) now; in the batch in flight, when that batch
        lands (within one step), and its pages go with the context when the caller destroys it."""
        job = self._jobs.get(ctx.id)
        if job is None:
            return
        future = job.future
        if future is None:
            job.cancelled = True
            if error is not None and job.owner is not None:
                job.owner.failed(job, error)
        elif not future.done():
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)
        if not ctx.in_batch:
            self._drop(job)

    def forget(self, job: Job) -> None:
        """An owner gives up its job and undoes the context itself: the job is gone now, even in flight
        (its landing then changes nothing), so the context may take a new pass at once."""
        job.cancelled = True
        if self._jobs.get(job.ctx.id) is job:
            self._release_key(job)
            self._unqueue(job)
            job.ctx.pending = False

    @property
    def num_pending(self) -> int:
        return len(self._jobs) + self.lane.size

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for flight in self._flights:  # let the engine finish what it has; nobody reads the results
            with contextlib.suppress(BaseException):
                await flight.task
        self._flights.clear()
        self.lane.fail_all(HostError("the runtime is shutting down"))
        for job in list(self._jobs.values()):
            self._fail(job, HostError("the runtime is shutting down"))

    def _enqueue(self, job: Job) -> None:
        """To the back of the queue of its context's priority."""
        priority = job.ctx.priority
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = {}
        queue[job.ctx.id] = job
        job.queued_at = priority

    def _unqueue(self, job: Job) -> None:
        """Out of `_jobs` and, if it waits, its queue."""
        del self._jobs[job.ctx.id]
        self._dequeue(job)

    def _dequeue(self, job: Job) -> None:
        """Out of its queue, if it is in one (admitted into a batch: it comes back when the chunk lands)."""
        queue = self._queues.get(job.queued_at)
        if queue is not None and queue.pop(job.ctx.id, None) is not None and not queue:
            del self._queues[job.queued_at]

    def _order(self) -> list[Job]:
        """Every waiting pass: higher priority first, queue order within one."""
        queues = self._queues
        if len(queues) == 1:
            return list(next(iter(queues.values())).values())
        return [job for p in sorted(queues, reverse=True) for job in queues[p].values()]

    # -- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        flights = self._flights
        while True:
            if not flights:
                if not self._jobs and not self.lane.size:
                    self._wake.clear()
                    await self._wake.wait()
                await self._gather()
                self._wake.clear()
                built = self._safe_build(None)
                if built is None:
                    await self._wait_for_pages()
                    continue
                flights.append(self._launch(*built))
            turned = self._turns
            if self.pipeline and flights[0].lane is not None:
                if self._woken:  # instances the last landing woke join this batch, not the one after
                    await self._gather()
                built = self._safe_build(flights[0])  # N+1 while N runs: its streams' next steps, chained
                if built is not None:
                    flights.append(self._launch(*built, source=flights[0]))
            await self._land(flights[0], flights[1] if len(flights) > 1 else None)
            del flights[0]
            if self._turns == turned:  # the engine answered without the event loop turning once
                self._idle_steps += 1
                if self._idle_steps >= MAX_STEPS_WITHOUT_TURN:  # let instances, timers and cancels run
                    self._idle_steps = 0
                    await asyncio.sleep(0)
            else:
                self._idle_steps = 0

    def _safe_build(self, chain: Flight | None) -> Built | None:
        try:
            return self._build(chain)
        except Exception:  # a runtime bug: fail what is queued rather than hang every instance
            log.exception("building a batch failed")
            self.lane.fail_all(HostError("internal runtime error while scheduling; see the server log"))
            for job in list(self._jobs.values()):
                if not job.ctx.in_batch:
                    self._fail(job, HostError("internal runtime error while scheduling; see the server log"))
            return None

    async def _gather(self) -> None:
        """Let instances woken by the last batch submit their next passes, so they share the next batch.

        Waits until as many passes arrived as the last batch resolved for instances (streams resubmit
        synchronously and are not counted), or a turn of the event loop brings none, or a short
        deadline: an instance that is done, or busy with other work, must not hold everyone back."""
        woken, self._woken = self._woken, 0
        if not woken:
            return
        start = self._submissions
        deadline = time.perf_counter() + GATHER_DEADLINE_S
        while True:
            before = self._submissions
            await asyncio.sleep(0)
            if (self._submissions - start >= woken or self._submissions == before
                    or time.perf_counter() >= deadline):
                return

    async def _wait_for_pages(self) -> None:
        """Nothing could run: wait for freed pages or new passes; fail the blocked passes on a long stall."""
        if not self._jobs:  # the last passes were served from the prefix cache or cancelled
            return
        self._wake.clear()  # anything that set it happened inside the build that just failed
        now = time.monotonic()
        self._stalled_since = self._stalled_since or now
        left = self._stalled_since + self.page_wait_timeout_s - now
        if left <= 0:
            self._stalled_since = None
            for job in list(self._jobs.values()):
                need = job.ctx.pages_needed(job.ctx.computed_len, job.end)
                self._fail(job, OutOfPagesError(
                    f"a forward pass waited {self.page_wait_timeout_s:.0f} s for {need} KV pages while nothing "
                    f"else could run ({self.space.pool.num_allocatable} of {self.space.pool.num_pages} are "
                    "allocatable; the rest are held by contexts that cannot be suspended: written with custom "
                    "attention masks, or pending at a higher priority); release contexts, or raise the KV budget"))
            return
        with contextlib.suppress(TimeoutError):  # the stall timer is checked on the next round
            await asyncio.wait_for(self._wake.wait(), timeout=left)

    # -- building a batch -----------------------------------------------------------------------

    def _build(self, chain: Flight | None = None) -> Built | None:
        """The next batch; with `chain` (the batch in flight), its streams' next steps come first."""
        self._previous_build, self._this_build = self._this_build, self.space.tick()
        self._lead_known = False
        self._batch_ids += 1
        self._building = self._batch_ids
        if self.space.host is not None:
            # The batch before has landed, or runs before this one: the slots it swapped in may be reused.
            self.space.host.settle()
        tokens_left, reqs_left = self.max_batch_tokens, self.max_batch_size
        # The streams' steps first: as arrays, one row each (a stream that cannot step here is queued
        # below as an ordinary pass, `TokenStream.long_way`).
        lane = self.lane.build(chain.id if chain is not None else 0, min(tokens_left, reqs_left), self._building)
        steps = lane[0] if lane is not None else None
        if steps is not None:
            tokens_left -= len(steps)
            reqs_left -= len(steps)
        order = self._order()
        n = len(order)
        prefill_left = self.max_prefill_tokens if n > 1 or steps is not None else tokens_left  # a prompt alone gets the whole batch
        requests: list[Request] = []
        ops = PageOps()
        chunks: list[Chunk] = []
        for i, job in enumerate(order):
            if tokens_left <= 0 or reqs_left <= 0:
                break
            ctx = job.ctx
            if ctx.in_batch:  # in the batch in flight: its next rows are admitted once it lands
                continue
            if job.settled or ctx.closed:  # cancelled while queued
                self._drop(job)
                continue
            reserve = min(n - i - 1, reqs_left - 1)  # a token for each pass behind this one
            budget = max(1, tokens_left - reserve)
            if job.end - job.ctx.computed_len > 1:  # a prefill (or a re-prefill): within the prefill budget
                if prefill_left <= 0:
                    continue
                budget = min(budget, prefill_left)
            admitted = self._admit(job, budget, tokens_left, ops)
            if admitted is None:
                continue
            chunk = admitted
            requests.append(self._request(chunk))
            chunks.append(chunk)
            rows = chunk.end - chunk.start
            tokens_left -= rows
            if rows > 1:
                prefill_left -= rows
            reqs_left -= 1
        if requests or steps is not None:
            self._stalled_since = None
        elif not ops.swap_out:  # victims swapped out for a chunk that still did not fit: copy them now
            return None
        batch = ForwardBatch(requests, ops.copies, ops.swap_out, ops.swap_in, steps=steps)
        if self.space.states is not None:  # hybrid models: forks' state copies, before this batch's forward
            batch.state_copies = self.space.states.drain()
        batch.validated = True  # every pass was checked on the host (pie.runtime.forward_pass)
        return batch, chunks, lane[1:] if lane is not None else None

    def _admit(self, job: Job, budget: int, tokens_left: int, ops: PageOps) -> Chunk | None:
        """The job's next chunk of at most `budget` rows, with its pages in place; None if it must wait.

        A masked pass is not chunked: it needs all its rows in `tokens_left` (it
        keeps its place in the queue, so it is first in line next step). A
        swapped-out context computes up to its swapped pages, then gets them
        back by swap-in with the chunk after them."""
        ctx = job.ctx
        # A prefix lookup can only attach full pages below the first output row: skip it when none fits
        # (every decode step).
        if job.next_output_slot() - ctx.computed_len >= self.space.page_size and not self._lookup_prefix(job):
            return None
        restore = ctx.restorable
        start = ctx.swapped_len if restore else ctx.computed_len
        if start == job.end:  # every row was in the prefix cache (a pass without outputs)
            self._complete(job)
            return None
        if job.attention_mask is not None and start >= job.start:
            if job.end - start > tokens_left:
                return None
            end = job.end
        else:  # restore rows before a masked or adapter pass are computed on their own (base model, causal)
            custom = job.attention_mask is not None or job.adapter is not None
            limit = job.start if custom and start < job.start else job.end
            if not restore:  # a swapped-out context stops before its swapped pages
                limit = min(limit, ctx.restore_limit())
            end = min(limit, start + budget)
            if ctx.images:  # no chunk ends inside an image whose rows attend both ways
                end = ctx.chunk_end(start, end)
                if end - start > tokens_left:
                    return None
            if self.space.states is not None and end - start > 1:
                # A hybrid's prefill chunk ends on a page boundary when one is inside it (the rest goes next),
                # so the state there exists and becomes a prefix checkpoint (`Context.mark_computed`).
                boundary = end - end % self.space.page_size
                if start < boundary < end:
                    end = boundary
        need = self._make_room(job, start, end, ops)  # with a restore: its pages plus the chunk's
        if need is None:
            return None
        pool = self.space.pool
        fresh = pool.allocate(need)
        if restore:
            swap_in = ctx.restore(fresh)
            ops.swap_in += swap_in
            self.stats.swapped_in_pages += len(swap_in)
        copies = ctx.prepare_write(start, end, fresh)
        if copies and self.space.host is not None:
            # Until the batch lands, a copy source must not be handed out again as a swap-in target:
            # swap-ins run before copies. Without a host pool nothing writes before the copies.
            pool.incref(src for src, _ in copies)
        ops.copies += copies
        ctx.in_batch = self._building
        job.admitted_build = self._this_build
        ids = []
        while job._next < len(job._order) and job.start + job.outputs[job._order[job._next]].index < end:
            ids.append(job._order[job._next])
            job._next += 1
        self._dequeue(job)  # back of the queue when the chunk lands, if rows are left (round robin)
        return Chunk(job, start, end, ids)

    def _lookup_prefix(self, job: Job) -> bool:
        """Attach the job's cached leading pages; False if another pass is computing its next page.

        Identical prompts submitted together are computed once: the first
        computes, the others wait and attach its pages once they are committed.
        They wait only while that pass makes progress (a chunk admitted in this
        build or the previous one), so waiting never blocks anyone for long."""
        ctx = job.ctx
        if 0 <= job.missed_at <= ctx.computed_len:  # past a miss, the chain cannot be cached
            return True
        attached = ctx.attach_cached(job.next_output_slot())
        self.stats.cached_tokens += attached.skipped
        if attached.missed is None:
            return True
        owner = self._computing.get(attached.missed)
        if owner is not None and owner is not job and owner.admitted_build >= self._previous_build:
            return False
        job.missed_at = ctx.computed_len
        if owner is None or owner.admitted_build < self._previous_build:
            if owner is not None:
                self._release_key(owner)
            self._computing[attached.missed] = job
            job.computing = attached.missed
        return True

    def _make_room(self, job: Job, start: int, end: int, ops: PageOps) -> int | None:
        """Pages the chunk needs, after suspending victims if the pool is short; None if it cannot fit now."""
        need = job.ctx.pages_needed(start, end)
        if self.space.pool.can_allocate(need):
            return need
        return self._suspender.make_room(job.ctx, start, end, ops, lead=job is self._lead(),
                                         cutoff=self._previous_build)

    def _lead(self) -> Job | None:
        """The pending pass of the oldest context of the top priority (found once per build)."""
        if not self._lead_known:
            self._lead_job = min(self._jobs.values(), key=lambda j: (-j.ctx.priority, j.ctx.id), default=None)
            self._lead_known = True
        return self._lead_job

    def _request(self, chunk: Chunk) -> Request:
        job, ctx = chunk.job, chunk.job.ctx
        a, b = chunk.start, chunk.end
        page_ids, last_len = ctx.request_pages(b)
        outputs = [job.outputs[i] for i in chunk.output_ids]
        if a != job.start:  # rows are counted from the chunk's first slot
            outputs = [OutputSpec(o.index + job.start - a, o.sampler, o.probe) for o in outputs]
        masked = job.attention_mask is not None and a >= job.start
        return Request(tokens=ctx.tokens[a:b], positions=ctx.positions[a:b], page_ids=page_ids,
                       last_page_len=last_len, outputs=outputs,
                       attention_mask=job.attention_mask if masked else None,
                       logit_mask=job.logit_mask if outputs else None,
                       adapter=job.adapter if a >= job.start else None, seed=job.seed,
                       zo_seed=job.zo_seed if a >= job.start else None,
                       images=ctx.images_in(a, b) if ctx.images else None,
                       state_slot=ctx.state_slot)

    # -- running it and handing results back ----------------------------------------------------

    def _tick(self) -> None:
        self._turns += 1

    def _launch(self, batch: ForwardBatch, chunks: list[Chunk], lane: tuple[np.ndarray, np.ndarray] | None,
                source: Flight | None = None) -> Flight:
        """Hand a batch to the engine; `source`: the batch in flight its chained rows read."""
        num_tokens = batch.num_tokens
        task = asyncio.get_running_loop().create_task(
            self._run_engine(batch, len(chunks), num_tokens, source.batch if source is not None else None))
        return Flight(task, batch, chunks, self._building, num_tokens, lane)

    async def _run_engine(self, batch: ForwardBatch, num_requests: int, num_tokens: int,
                          source: ForwardBatch | None) -> BatchResult:
        with telemetry.span("engine.batch", model=self._model_name, num_requests=num_requests,
                            num_tokens=num_tokens, num_swap_out=len(batch.swap_out),
                            num_swap_in=len(batch.swap_in), num_page_copies=len(batch.page_copies)):
            if source is not None:
                return await self.engine.forward_chained(batch, source)  # type: ignore[attr-defined]
            # The chaining engine clients (in-process, fake) take `ForwardBatch.steps`; the others (TP
            # workers) get them as requests.
            if batch.steps is None or self.pipeline:
                return await self.engine.forward(batch)
            return fold_steps(await self.engine.forward(expanded(batch)), len(batch.requests))

    async def _land(self, flight: Flight, after: Flight | None) -> None:
        """Wait for a batch and hand its results back (`after`: the batch chained behind it, if any)."""
        batch, chunks = flight.batch, flight.chunks
        t0 = time.perf_counter()
        asyncio.get_running_loop().call_soon(self._tick)  # runs only if the loop turns while we await
        num_tokens = flight.num_tokens
        steps = batch.steps
        step_errors: list[BaseException | None] | None = None
        try:
            try:
                result = await flight.task
                outputs: list[list[OutputValue] | BaseException] = list(result.outputs)
            except BatchError:  # the host validates passes, so this is rare: find the culprit, run the rest
                log.warning("engine rejected a batch of %d requests; retrying them one by one", len(chunks))
                outputs, result, step_errors = await self._fire_singly(flight)
            except Exception:  # a request the checks missed, or an engine bug: never fail the batch for everyone
                log.exception("engine failed on a batch of %d requests; retrying them one by one", len(chunks))
                outputs, result, step_errors = await self._fire_singly(flight)
            finally:
                if batch.page_copies and self.space.host is not None:  # the copy sources pinned in `_admit`
                    self.space.pool.decref(src for src, _ in batch.page_copies)
        except BaseException:  # cancelled (shutdown): nothing lands, the contexts are out of the batch
            self._out_of_batch(flight)
            raise
        elapsed = time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.tokens_processed += num_tokens
        self.stats.last_batch_ms = elapsed * 1e3
        if self.on_batch is not None:
            self.on_batch(batch, result, elapsed)
        if flight.lane is not None:  # the streams' steps: landed as arrays
            assert steps is not None and result.steps is not None
            members, gens = flight.lane
            if step_errors is not None:
                self.lane.land_failed(members, gens, steps.positions, step_errors)
            self.lane.land(flight.id, members, gens, steps.positions, result.steps)
        fid = flight.id
        for chunk, out in zip(chunks, outputs, strict=True):
            job = chunk.job
            ctx = job.ctx
            if ctx.in_batch == fid:  # not in the batch chained behind this one
                ctx.in_batch = 0
            if isinstance(out, BaseException):
                self._fail(job, out)
            else:
                self._finish_chunk(chunk, out)

    def _out_of_batch(self, flight: Flight) -> None:
        """The batch's contexts are free for the next one (except those already in the batch behind it)."""
        fid = flight.id
        for chunk in flight.chunks:
            ctx = chunk.job.ctx
            if ctx.in_batch == fid:
                ctx.in_batch = 0

    async def _fire_singly(self, flight: Flight) -> tuple[list[list[OutputValue] | BaseException], BatchResult,
                                                           list[BaseException | None] | None]:
        """The batch's passes one by one, so only the culprit fails: (each request's outputs or error, a
        result holding the steps' tokens, each step's error or None)."""
        batch = flight.batch
        steps = batch.steps
        num_steps = len(steps) if steps is not None else 0
        if batch.page_copies or batch.swap_out or batch.swap_in or batch.state_copies:
            try:
                await self.engine.forward(ForwardBatch([], batch.page_copies, batch.swap_out, batch.swap_in,
                                                       validated=batch.validated, state_copies=batch.state_copies))
            except Exception as error:  # a runtime bug: the runtime chose these pages and slots
                log.error("engine failed on a batch's page operations: %r", error)
                failed = HostError(f"the engine failed on this batch's page operations: {error}")
                return ([failed] * len(batch.requests), BatchResult([], steps=np.zeros(num_steps, np.int64)),
                        [failed] * num_steps if steps is not None else None)
        outs: list[list[OutputValue] | BaseException] = [await self._fire_one(req, batch.validated)
                                                          for req in batch.requests]
        if steps is None or flight.lane is None:
            return outs, BatchResult([]), None
        # A chained block's source has landed (or failed): the inputs are in the members' rings now.
        alive = self.lane.inputs(steps, *flight.lane)
        tokens = np.zeros(num_steps, np.int64)
        errors: list[BaseException | None] = []
        for i, req in enumerate(steps.requests()):
            out = await self._fire_one(req, batch.validated) if alive[i] else HostError("the stream stopped")
            if isinstance(out, BaseException):
                errors.append(out)
            else:
                errors.append(None)
                tokens[i] = out[0]
        return outs, BatchResult([], steps=tokens), errors

    async def _fire_one(self, req: Request, validated: bool) -> list[OutputValue] | BaseException:
        try:
            return (await self.engine.forward(ForwardBatch([req], validated=validated))).outputs[0]
        except BatchError as error:
            return HostError(f"the engine rejected this forward pass: {error}")
        except Exception as error:
            log.exception("engine failed on a single forward pass")
            return HostError(f"the engine failed on this forward pass: {error!r}")

    def _finish_chunk(self, chunk: Chunk, values: list[OutputValue]) -> None:
        job = chunk.job
        if job.settled or job.ctx.closed:  # withdrawn while in flight
            self._drop(job)
            return
        job.ctx.mark_computed(chunk.end)
        for i, v in zip(chunk.output_ids, values, strict=True):
            job.results[i] = v
        if chunk.end == job.end:
            self._complete(job)
        else:
            self._enqueue(job)  # its next chunk waits at the back of the queue

    def _complete(self, job: Job) -> None:
        if job.settled:  # cancelled meanwhile: the pass never happened
            self._drop(job)
            return
        self._unqueue(job)
        self._release_key(job)
        ctx = job.ctx
        ctx.pending = False
        ctx.last_used = self.space.tick()
        if job.owner is not None:
            job.owner.completed(job, job.results)  # type: ignore[arg-type]  # may submit its next pass now
        else:
            job.future.set_result(job.results)  # type: ignore[union-attr,arg-type]
            self._woken += 1

    def _fail(self, job: Job, error: BaseException) -> None:
        future = job.future
        if future is None:
            if not job.cancelled and job.owner is not None:
                job.cancelled = True
                self._drop(job)
                job.owner.failed(job, error)  # the owner rolls the context back
                return
        elif not future.done():
            future.set_exception(error)
            self._woken += 1
        self._drop(job)

    def _drop(self, job: Job) -> None:
        """Forget a job that will not complete; its context goes back to before the pass (an owner's job:
        the owner does that)."""
        ctx = job.ctx
        self._release_key(job)
        if self._jobs.get(ctx.id) is not job:  # forgotten already (`forget`), or another pass took its place
            return
        self._unqueue(job)
        ctx.pending = False
        if job.owner is None and not ctx.closed and ctx.kv_len >= job.end:
            ctx.rollback(job.start)

    def _release_key(self, job: Job) -> None:
        if job.computing is not None and self._computing.get(job.computing) is job:
            del self._computing[job.computing]
        job.computing = None
