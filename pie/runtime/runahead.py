"""Run-ahead token streams: the runtime keeps a plain sampling loop going without the inferlet.

`Host.ctx_generate_start(ctx, spec)` hands the runtime a decode loop whose next pass depends on nothing but
the token just sampled: the buffered tokens, one sampler, stop tokens, a token limit and optionally a fixed
logit mask, seed and adapter. The first pass (the buffered tokens) is an ordinary pass; once it lands the
stream enters its scheduler's lane (`pie.runtime.lane`), where every following step is one row of the next
batch, built, chained and landed with the other streams' as array operations, whether or not the
inferlet's task has woken.

The inferlet reads the tokens with `stream_next` (every token produced so far, at least `batch`) and ends the
stream with `stream_stop(consumed)`: the runtime drops what it ran ahead and cuts the context back to
exactly the state of the step-by-step loop after `consumed` steps (`TokenStream.stop`).

Bounds: a stream runs at most `depth` steps ahead of what `stream_next` delivered (then it leaves the lane
and pauses; the next delivery resumes it), and stops by itself after a stop token or `max_tokens` tokens,
so it never computes far past the end. Pages come from the context's own reservation, grown one page at a
time under the instance's page limit as the step-by-step loop's `_reserve_for` would; the token budget is
charged per step and refunded for discarded steps. A step the lane cannot place (a page to copy, a short
pool, a limit reached) takes the long way: an ordinary one-row pass (`long_way`), after which the stream
enters the lane again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from inferlet._host import HostError
from pie.engine.batch import OutputSpec, OutputValue, Sampler
from pie.runtime.context import Context
from pie.runtime.jobs import Job

if TYPE_CHECKING:
    from pie.runtime.scheduler import Scheduler

DEFAULT_DEPTH = 8


class TokenStream:
    """One run-ahead loop on one context. Implements `pie.runtime.jobs.JobOwner` for its ordinary passes."""

    def __init__(self, ctx: Context, scheduler: Scheduler, job: Job, sampler: Sampler, *, stop: frozenset[int],
                 max_tokens: int, depth: int, base_len: int, base_pages: int, batch: int = 1,
                 grow: Callable[[Context, int], None], charge: Callable[[int], None] | None) -> None:
        """`job`: the first pass (the buffered tokens, already recorded on `ctx`, sampling at its last row).
        `grow(ctx, n)`: make room for n more slots (reserve under the instance's limits, or raise HostError);
        `charge(n)`: count n sampled tokens against the token budget (negative: refund), or raise; None
        when the instance has no budget (nothing to count)."""
        self.ctx = ctx
        self._scheduler = scheduler
        self._lane = scheduler.lane
        self._job = job
        self._step_outputs = [OutputSpec(0, sampler=sampler)]
        self.sampler = sampler
        self.stop_tokens = stop
        self.max_tokens = max_tokens
        self.depth = max(1, depth)
        self.batch = min(max(1, batch), self.depth)  # tokens per delivery (fewer only at the end)
        self._base_len = base_len  # kv_len before the stream's first pass
        self._prompt_len = job.end - job.start
        self.first_slot = job.end  # the slot of the input of the first sampled token
        self._base_pages = base_pages  # pages reserved before the stream: never released by stop
        self.grow = grow
        self.charge = charge or _no_budget
        self.budgeted = charge is not None
        self.adapter = job.adapter
        # What the lane's rows carry besides the sampler (None: nothing).
        self.extras = None if job.seed is None and job.logit_mask is None and job.adapter is None else (
            job.seed, job.logit_mask, job.adapter)
        self.tokens: list[int] = []  # token sampled at each step, in order (the lane appends at each sync)
        self.delivered = 0  # tokens handed out by `next`
        self.charged = 1  # tokens charged: the first pass's
        self.member = -1  # index in the lane while a member
        self._error: BaseException | None = None
        self._ended = False  # no more steps will be produced (stop token, limit, error or stop())
        self._waiter: asyncio.Future[None] | None = None
        job.owner = self
        if self._first_in_lane(job):
            scheduler.notify()
        else:
            scheduler.submit(job)

    def _first_in_lane(self, job: Job) -> bool:
        """Run a first pass of one plain token as the stream's first lane row (no ordinary pass, no
        Request: streams that start together step together at once); its token was charged as the
        pass's, and the lane charges rows itself, so the charge moves there."""
        if job.end - job.start != 1 or job.attention_mask is not None or job.zo_seed is not None:
            return False
        if not self._lane.enter_first(self, job.start, self.ctx.tokens[job.start]):
            return False
        if self.budgeted:
            self.charge(-1)
            self.charged = 0
        return True

    # -- the scheduler's side (JobOwner, for the stream's ordinary passes) ----------------------

    def completed(self, job: Job, results: list[OutputValue]) -> None:
        token = results[0]
        assert type(token) is int, "a stream samples one token per step"
        tokens = self.tokens
        tokens.append(token)
        if token in self.stop_tokens or len(tokens) >= self.max_tokens:
            self.end()
        elif len(tokens) - self.delivered < self.depth:
            self._lane.enter(self)
        if self._waiter is not None and len(tokens) - self.delivered >= self.batch:
            self.wake()

    def failed(self, job: Job, error: BaseException) -> None:
        """The pass failed (engine error, shutdown): undo its input; deliver the error after the tokens
        produced before it."""
        if not self.ctx.closed and self.ctx.kv_len > job.start:
            self.ctx.rollback(job.start)
        self.end_with(error)

    # -- the lane's side ------------------------------------------------------------------------

    def long_way(self) -> None:
        """The next step as an ordinary one-row pass (the lane could not place it, or the stream paused)."""
        ctx, token, job = self.ctx, self.tokens[-1], self._job
        slot = len(ctx.tokens)
        try:
            if slot >= ctx.num_pages * ctx.space.page_size:
                self.grow(ctx, 1)
            self.charge(1)
        except HostError as error:
            self.end_with(error)
            return
        self.charged += 1
        position = ctx.next_position
        if job.adapter is None:  # sequential positions, base-model KV: nothing for `append` to mark
            ctx.tokens.append(token)
            ctx.positions.append(position)
        else:
            ctx.append((token,), (position,), custom_kv=True)
        job.reset(slot, slot + 1, self._step_outputs)
        self._scheduler.submit(job)

    def end(self) -> None:
        self._ended = True
        self.wake()

    def end_with(self, error: BaseException) -> None:
        self._ended = True
        if self._error is None:
            self._error = error
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the inferlet's side --------------------------------------------------------------------

    async def next(self) -> list[int]:
        """Every token produced since the last call (at least `batch`, or what is left at the end, waiting
        for them); [] once the stream ended and everything was delivered; raises the error that ended it
        after its tokens."""
        lane = self._lane
        while self._available() < self.batch:
            if self._ended:
                if self._available():
                    break
                if self._error is not None:
                    raise self._error
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            lane.set_waiting(self, True)
            try:
                await self._waiter
            finally:
                self._waiter = None
                lane.set_waiting(self, False)
        out = lane.deliver(self)
        if not self._ended and not self.ctx.pending:  # paused at its depth: go on
            self.long_way()
        return out

    @property
    def waiting(self) -> bool:
        """The inferlet waits in `next` for tokens."""
        return self._waiter is not None

    def _available(self) -> int:
        """Tokens produced and not delivered yet."""
        m = self.member
        return (int(self._lane.count[m]) if m >= 0 else len(self.tokens)) - self.delivered

    def stop(self, consumed: int) -> None:
        """End the stream; leave the context as the step-by-step loop leaves it after `consumed` steps:
        the buffered tokens and the first `consumed - 1` sampled tokens in the record and KV (the last
        consumed token stays in the SDK's buffer), the pages it reserved beyond that released."""
        self._lane.leave(self)
        if not 0 <= consumed <= len(self.tokens):
            raise HostError(f"stream_stop: consumed {consumed} steps, but the stream produced {len(self.tokens)}")
        self._ended = True
        self._scheduler.forget(self._job)
        ctx = self.ctx
        self.charge(consumed - self.charged)
        self.charged = consumed
        self.wake()
        if ctx.closed:
            return
        keep = self._base_len if consumed == 0 else self._base_len + self._prompt_len + consumed - 1
        if ctx.kv_len > keep:
            ctx.rollback(keep)
        ps = ctx.space.page_size
        extra = ctx.num_pages - max(self._base_pages, -(-keep // ps))
        if extra > 0:
            ctx.release(extra)

    def close(self) -> None:
        """End the stream without touching the context (it is being destroyed with its instance)."""
        self._lane.leave(self, sync=False)
        self._ended = True
        self._scheduler.forget(self._job)
        self.wake()


def _no_budget(n: int) -> None:
    """The charge of an instance without a token budget: nothing to count."""
